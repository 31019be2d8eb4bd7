"""Hostile model uploads: YAML bombs, oversized and malicious variants, absurd sizes, backbone names that
reach out, checkpoints that do not fit, and the app's model-side limits (server paths, eviction, controls).

The variant cases run in one subprocess that records, per case, the refusal message, its time and the
growth of peak resident memory (VmHWM reset through ``/proc/self/clear_refs`` before each case).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
import torch
import yaml

from algm_viz.app.models import ALLOW_SERVER_PATHS_ENV, ModelRegistry, server_paths_allowed
from algm_viz.app.session import SessionCache
from algm_viz.app.ui import Handlers
from algm_viz.models import CheckpointError, create_segmenter, load_segmenter, save_segmenter
from algm_viz.models import checkpoint as checkpoint_module
from algm_viz.models.variant import (EXCERPT_CHARS, MAX_VARIANT_BYTES, NetSpec, VariantLoader, check_budget,
                                     estimate_activation_bytes, estimate_parameters)

REPO = Path(__file__).resolve().parents[1]
NET = {"backbone": "vit_tiny_patch16_384", "d_model": 32, "n_heads": 2, "n_layers": 2, "patch_size": 16,
       "image_size": 64, "n_cls": 5, "decoder": {"name": "linear"}}
MAX_RSS_GROWTH = 300 * 2**20
#: An error message never repeats more of the upload than this.
MAX_MESSAGE_CHARS = 400

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "net_kwargs: {backbone: *i}\n"


def _variant(**net) -> str:
    return yaml.safe_dump({"net_kwargs": {**NET, **net}})


#: name -> (variant.yml text, refusal the message must contain)
CASES: dict[str, tuple[str, str]] = {
    "yaml_bomb": (BILLION_LAUGHS, "anchors or aliases"),
    "yaml_bomb_merge_key": ("base: &b {n_cls: 5}\nnet_kwargs:\n  <<: *b\n", "anchors or aliases"),
    "oversized": (_variant() + "# padding\n" * 4_000_000, f"larger than {MAX_VARIANT_BYTES} bytes"),
    "python_object": ("net_kwargs: !!python/object/apply:os.system ['touch PWNED']\n", "python/object/apply:os.system"),
    "python_name": ("net_kwargs: {backbone: !!python/name:os.system ''}\n", "python/name:os.system"),
    "custom_tag": ("net_kwargs: !custom {}\n", "the tag !custom"),
    "deep_nesting": ("net_kwargs: " + "[" * 200 + "]" * 200 + "\n", "nests deeper"),
    "long_bad_line": ("net_kwargs: {backbone: '" + "x" * 10_000 + "'\n", "not valid YAML"),
    "long_value": (_variant(backbone="y" * 10_000), "plain timm model name"),
    "not_utf8": ("net_kwargs: {backbone: \udcff}\n", "not UTF-8"),
    "huge_integer": ("net_kwargs: {d_model: " + "9" * 5000 + "}\n", "cannot be read"),
    "no_net_kwargs": ("- 1\n- 2\n", "no net_kwargs mapping"),
    "d_model_huge": (_variant(d_model=100_000), "d_model must be a whole number in 8..2048, got 100000"),
    "d_model_text": (_variant(d_model="abc"), "d_model must be a whole number in 8..2048, got abc"),
    "d_model_bool": (_variant(d_model=True), "d_model must be a whole number"),
    "image_size_huge": (_variant(image_size=[100_000, 100_000]), "image_size must be a whole number in 16..2048"),
    "image_size_three": (_variant(image_size=[64, 64, 64]), "image_size must be a whole number"),
    "n_cls_huge": (_variant(n_cls=10_000_000), "n_cls must be a whole number in 1..1024, got 10000000"),
    "n_layers_huge": (_variant(n_layers=1000), "n_layers must be a whole number in 1..48"),
    "n_heads_zero": (_variant(n_heads=0), "n_heads must be a whole number in 1..64"),
    "n_heads_indivisible": (_variant(n_heads=3), "d_model 32 is not divisible by n_heads 3"),
    "patch_zero": (_variant(patch_size=0), "patch_size must be a whole number in 2..64"),
    "patch_over_image": (_variant(patch_size=64, image_size=32), "smaller than patch_size"),
    "d_ff_huge": (_variant(d_ff=10**9), "d_ff must be a whole number in 1..256"),
    "decoder_layers_huge": (_variant(decoder={"name": "mask_transformer", "n_layers": 500}), "decoder n_layers"),
    "decoder_unknown": (_variant(decoder={"name": "os.system"}), "decoder name must be one of"),
    "parameter_budget": (_variant(d_model=2048, n_heads=16, n_layers=12, d_ff=8192, image_size=512),
                         "too large for this server: about 608 M parameters"),
    "activation_budget": (_variant(n_cls=1024, image_size=2048, patch_size=32), "GiB of activations at 2048×2048"),
    "backbone_hf_hub": (_variant(backbone="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"), "plain timm model name"),
    "backbone_local_dir": (_variant(backbone="local-dir:/etc"), "plain timm model name"),
    "backbone_path": (_variant(backbone="/etc/passwd"), "plain timm model name"),
    "backbone_url": (_variant(backbone="https://example.com/vit.pth"), "plain timm model name"),
    "backbone_not_vit": (_variant(backbone="resnet50"), "is not a timm plain ViT"),
    "backbone_list": (_variant(backbone=["vit_tiny_patch16_384"]), "plain timm model name"),
}

PROBE = """
import json, sys, time
from pathlib import Path
from algm_viz.models import load_segmenter

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

root = Path(sys.argv[1])
load_segmenter(root / "valid")  # warm-up: lazy imports and allocator pools do not count
results = {}
for folder in sorted(p for p in root.iterdir() if p.name != "valid"):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set (VmHWM)
    before, start = status("VmRSS"), time.perf_counter()
    try:
        load_segmenter(folder)
        message = None
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    results[folder.name] = {"message": message, "seconds": time.perf_counter() - start,
                            "rss_growth": status("VmHWM") - before}
print(json.dumps(results))
"""


def _tiny_checkpoint(folder: Path, **net) -> Path:
    """A random model matching ``NET`` (with ``net`` overrides) saved in the official format."""
    spec = {**NET, **net}
    torch.manual_seed(0)
    model = create_segmenter(spec["backbone"], decoder=spec["decoder"]["name"], num_classes=spec["n_cls"],
                             image_size=spec["image_size"], patch_size=spec["patch_size"], embed_dim=spec["d_model"],
                             depth=spec["n_layers"], num_heads=spec["n_heads"], layer_norm_eps=1e-5)
    return save_segmenter(model, folder, spec)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, dict]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak resident memory of each case")
    root = tmp_path_factory.mktemp("hostile")
    valid = _tiny_checkpoint(root / "valid")
    for name, (text, _) in CASES.items():
        folder = root / name
        folder.mkdir()
        (folder / "checkpoint.pth").symlink_to(valid / "checkpoint.pth")
        (folder / "variant.yml").write_bytes(text.encode("utf-8", "surrogateescape"))
    done = subprocess.run([sys.executable, "-c", PROBE, str(root)], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (root / "PWNED").exists(), "a python tag was executed"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_variant_is_refused_clearly_in_bounded_memory(probe, case):
    result = probe[case]
    message = result["message"]
    assert message is not None, f"{case} loaded"
    assert message.startswith("CheckpointError: "), message[:MAX_MESSAGE_CHARS]
    assert CASES[case][1] in message, message[:MAX_MESSAGE_CHARS]
    assert len(message) <= MAX_MESSAGE_CHARS, f"{len(message)} characters: {message[:200]}"
    assert result["rss_growth"] < MAX_RSS_GROWTH, f"peak memory grew {result['rss_growth'] / 2**20:.0f} MiB"


@pytest.mark.parametrize("case", ["parameter_budget", "activation_budget", "yaml_bomb", "oversized", "n_cls_huge"])
def test_budget_and_bombs_are_refused_within_a_second(probe, case):
    assert probe[case]["seconds"] < 1.0, f"{case} took {probe[case]['seconds']:.2f} s to refuse"


def test_variants_are_parsed_by_libyaml_where_installed():
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    assert issubclass(VariantLoader, yaml.CSafeLoader), "the C parser reads a bounded document in milliseconds"


def test_error_excerpts_are_short():
    assert EXCERPT_CHARS < MAX_MESSAGE_CHARS < len(CASES["long_value"][0])


def test_a_checkpoint_that_does_not_fit_is_refused_before_building(tmp_path, monkeypatch):
    folder = _tiny_checkpoint(tmp_path / "model", n_layers=2)
    built = []
    monkeypatch.setattr(checkpoint_module, "create_segmenter", lambda **kw: built.append(kw))
    for net, message in (({"n_layers": 4}, "2 encoder blocks, n_layers is 4"),
                         ({"d_model": 64}, "encoder.patch_embed.proj.weight has shape (32, 3, 16, 16), variant.yml implies (64, 3, 16, 16)"),
                         ({"image_size": 128}, "encoder.pos_embed has shape (1, 17, 32), variant.yml implies (1, 65, 32)"),
                         ({"n_cls": 7}, "decoder.head.weight has shape (5, 32)")):
        (folder / "variant.yml").write_text(yaml.safe_dump({"net_kwargs": {**NET, **net}}))
        with pytest.raises(CheckpointError, match="does not fit variant.yml") as error:
            load_segmenter(folder)
        assert message in str(error.value)
    torch.save({"model": {"encoder.blocks.0.x": "not a tensor"}}, folder / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="non-tensor entry"):
        load_segmenter(folder)
    assert built == [], "no network is built for a checkpoint that does not fit"


def test_checkpoint_larger_than_the_limit_is_not_read(tmp_path, monkeypatch):
    folder = _tiny_checkpoint(tmp_path / "model")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not run"))
    with pytest.raises(CheckpointError, match="MiB accepted here"):
        load_segmenter(folder, max_checkpoint_bytes=1000)
    registry = ModelRegistry(device="cpu", include_bundled=False, untrained=dict(depth=2, embed_dim=32, num_heads=2),
                             max_checkpoint_bytes=1000)
    with pytest.raises(CheckpointError, match="MiB accepted here"):
        registry.get(registry.add_folder(folder))


def _deflated(source: Path, target: Path, **extra: torch.Tensor) -> Path:
    """``source``'s state dict (plus ``extra`` entries) saved by torch, then repacked with every member deflated
    (torch writes them stored; it reads deflated ones too)."""
    state = torch.load(source, weights_only=True)
    state["model"].update(extra)
    plain = target.with_suffix(".plain")
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member.filename))
    plain.unlink()
    return target


def test_a_zip_bomb_checkpoint_is_refused_before_unpacking(tmp_path, monkeypatch):
    folder = _tiny_checkpoint(tmp_path / "model")
    _deflated(folder / "checkpoint.pth", tmp_path / "small.pth")
    (tmp_path / "small.pth").replace(folder / "checkpoint.pth")
    assert len(load_segmenter(folder, max_checkpoint_bytes=2**20).encoder.blocks) == NET["n_layers"], \
        "a deflated checkpoint within the limit loads"
    _deflated(folder / "checkpoint.pth", tmp_path / "bomb.pth", pad=torch.zeros(2_000_000))  # 8 MB of zeros
    (tmp_path / "bomb.pth").replace(folder / "checkpoint.pth")
    assert (folder / "checkpoint.pth").stat().st_size < 2**20, "the file itself is under the limit"
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not unpack a zip bomb"))
    with pytest.raises(CheckpointError, match=r"unpacks to 8 MiB, more than the 1 MiB accepted here"):
        load_segmenter(folder, max_checkpoint_bytes=2**20)
    registry = ModelRegistry(device="cpu", include_bundled=False, untrained=dict(depth=2, embed_dim=32, num_heads=2),
                             max_checkpoint_bytes=2**20)
    with pytest.raises(CheckpointError, match="unpacks to 8 MiB"):
        registry.get(registry.add_folder(folder))


def test_an_upload_never_asks_timm_for_pretrained_weights(tmp_path, monkeypatch):
    import timm

    folder = _tiny_checkpoint(tmp_path / "model")
    (folder / "variant.yml").write_text(yaml.safe_dump({"net_kwargs": {**NET, "backbone": "vit_tiny_patch16_384.augreg_in21k_ft_in1k"}}))
    calls, create = [], timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append((a, k)) or create(*a, **k))
    load_segmenter(folder)
    assert [(a[0], k["pretrained"]) for a, k in calls] == [("vit_tiny_patch16_384.augreg_in21k_ft_in1k", False)]


@pytest.mark.parametrize("host, share, explicit, allowed", [
    ("127.0.0.1", False, False, True), ("localhost", False, False, True), ("::1", False, False, True),
    ("0.0.0.0", False, False, False), ("192.168.1.4", False, False, False), ("example.org", False, False, False),
    ("127.0.0.1", True, False, False), ("0.0.0.0", False, True, True), ("127.0.0.1", True, True, True),
])
def test_server_paths_only_on_loopback_unless_allowed(host, share, explicit, allowed, monkeypatch):
    monkeypatch.delenv(ALLOW_SERVER_PATHS_ENV, raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert server_paths_allowed(host, share, explicit) is allowed
    monkeypatch.setenv(ALLOW_SERVER_PATHS_ENV, "1")
    assert server_paths_allowed(host, share, explicit) is True
    monkeypatch.setenv(ALLOW_SERVER_PATHS_ENV, "0")
    monkeypatch.setenv("SPACE_ID", "user/space")
    assert server_paths_allowed(host, share, explicit) is explicit


APP_STARTUP = """
import json, runpy, sys
import algm_viz.app

seen = []

class Demo:
    def queue(self, **options):
        return self

    def launch(self, **options):
        seen[-1]["max_file_size"] = options.get("max_file_size")

def build_demo(handlers, **options):
    seen.append({"allow_paths": handlers.registry.allow_paths})
    return Demo()

algm_viz.app.build_demo = build_demo
for argv in json.loads(sys.argv[1]):
    sys.argv = ["app.py", *argv]
    runpy.run_path("app.py", run_name="__main__")
print(json.dumps(seen))
"""


def test_app_py_limits_uploads_and_allows_server_paths_only_on_loopback(tmp_path):
    """What ``python app.py`` passes on: the upload size limit, and server-side folders only on a loopback host
    without ``--share`` unless ``--allow-server-paths``."""
    from algm_viz.app.models import MAX_UPLOAD_BYTES

    argvs = [[], ["--host", "0.0.0.0"], ["--share"], ["--host", "0.0.0.0", "--allow-server-paths"], ["--host", "::1"]]
    env = {k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "SPACES_ZERO_GPU", ALLOW_SERVER_PATHS_ENV)}
    env.update(ALGM_VIZ_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(tmp_path),
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    done = subprocess.run([sys.executable, "-c", APP_STARTUP, json.dumps(argvs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [run["allow_paths"] for run in seen] == [True, False, False, True, True]
    assert {run["max_file_size"] for run in seen} == {MAX_UPLOAD_BYTES} and MAX_UPLOAD_BYTES <= 2**30


def test_the_page_removes_gradios_stored_files_by_age():
    from algm_viz.app.ui import build_demo

    registry = ModelRegistry(device="cpu", default_short_side=32, include_bundled=False,
                             untrained=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, image_size=32))
    demo = build_demo(Handlers(registry, thresholds=(0.9,), with_gflops=False), prerun=False)
    every, age = demo.delete_cache
    assert 0 < every <= age <= 3600, "uploads and copies older than an hour at most are removed"


def test_locked_registry_refuses_server_folders_for_checkpoints_and_bundled_models(tmp_path):
    folder = _tiny_checkpoint(tmp_path / "model")
    registry = ModelRegistry(device="cpu", include_bundled=False, untrained=dict(depth=2, embed_dim=32, num_heads=2),
                             allow_paths=False)
    with pytest.raises(ValueError, match="server-side folders is disabled"):
        registry.get(f"path:{folder}")
    for name in (str(tmp_path), "..", "../assets"):
        with pytest.raises(ValueError, match="server-side folders is disabled"):
            registry.get(f"bundled:{name}")
    assert registry.get(registry.add_folder(folder)).depth == NET["n_layers"], "an upload still loads"


def _image(tmp_path: Path) -> str:
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    return str(path)


def test_least_recently_used_models_are_dropped_and_their_memory_freed(tmp_path):
    registry = ModelRegistry(device="cpu", default_short_side=64, include_bundled=False,
                             untrained=dict(depth=2, embed_dim=32, num_heads=2), max_models=2)
    handlers = Handlers(registry, SessionCache(), thresholds=(0.9,), with_gflops=False)
    keys = [registry.add_folder(_tiny_checkpoint(tmp_path / f"m{i}")) for i in range(3)]
    image = _image(tmp_path)
    handlers.analyze(keys[0], image, None, 0.9, 0.9, 2, 2)  # a cached session now holds model 0
    first = weakref.ref(registry.get(keys[0]).model)
    registry.get("untrained")
    registry.get(keys[1])
    assert registry.loaded() == ["untrained", keys[1]], "model 0 was least recently used"
    gc.collect()
    assert first() is None, "the dropped model is freed (no cache keeps it)"
    registry.get(keys[2])
    assert registry.loaded() == ["untrained", keys[2]], "the default model stays"
    small = ModelRegistry(device="cpu", include_bundled=False, untrained=dict(depth=2, embed_dim=32, num_heads=2),
                          max_model_bytes=1)
    for key in ("untrained", keys[0], keys[1]):
        small.get(key)
    assert small.loaded() == ["untrained", keys[1]], "over the memory budget only the default and the last stay"
    assert handlers.analyze(keys[0], image, None, 0.9, 0.9, 2, 2)[6]["tokens"], "a dropped model loads again"


def test_controls_follow_a_two_layer_model(tmp_path):
    registry = ModelRegistry(device="cpu", default_short_side=32, include_bundled=False,
                             untrained=dict(depth=6, embed_dim=32, num_heads=2))
    handlers = Handlers(registry, SessionCache(), thresholds=(0.9,), with_gflops=False)
    key = handlers.load_checkpoint(str(_tiny_checkpoint(tmp_path / "two-layers")), None).value
    local, global_, layer, status, _ = handlers.select_model(key)
    assert (layer.minimum, layer.maximum, layer.value) == (1, 2, 2)
    assert "2 layers" in status
    window = handlers.select_window(key, 4)
    assert [value for _, value in window.choices] == [1, 2] and window.value == 2, "a 2×2 grid takes windows up to 2"
    readout = handlers.analyze(key, _image(tmp_path), None, local.value, global_.value, window.value, layer.value)[6]
    assert readout["tokens"]
    untrained_layer = handlers.select_model("untrained")[2]
    assert (untrained_layer.maximum, untrained_layer.value) == (6, 5)
    with pytest.raises(gr.Error, match="layer 5 is outside the ViT's layers 1..2"):
        handlers.analyze(key, _image(tmp_path), None, 0.9, 0.9, 2, 5)


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer", "atm", "setr_naive", "setr_pup"])
def test_parameter_estimate_is_the_built_count(decoder):
    spec = NetSpec.from_net_kwargs({**NET, "image_size": [64, 96], "patch_size": 8, "d_ff": 96, "n_cls": 7,
                                    "decoder": {"name": decoder, "n_layers": 2}})
    model = create_segmenter(**spec.create_kwargs())
    assert estimate_parameters(spec) == sum(p.numel() for p in model.parameters())
    assert estimate_activation_bytes(spec) > 4 * spec.num_classes * 64 * 96, "at least the full-resolution logits"


def test_refused_keys_leave_no_state_behind():
    registry = ModelRegistry(device="cpu", include_bundled=False, untrained=dict(depth=2, embed_dim=32, num_heads=2),
                             allow_paths=False)
    for i in range(50):
        with pytest.raises(ValueError):
            registry.get(f"path:/nowhere/{i}")
    assert registry._key_locks == {} and registry.loaded() == []


def test_the_activation_budget_holds_at_the_size_the_app_runs(tmp_path):
    """A variant may state a small image_size (64 here) while the app runs every model at its own input size
    (short side 512, long side up to 1024): 1024 classes there are 4 GiB of logits."""
    folder = _tiny_checkpoint(tmp_path / "model", n_cls=1024)
    assert load_segmenter(folder).num_classes == 1024, "the library estimates at the variant's image_size"
    tiny = dict(depth=2, embed_dim=32, num_heads=2)
    registry = ModelRegistry(device="cpu", include_bundled=False, untrained=tiny)
    with pytest.raises(CheckpointError, match="GiB of activations at 512×1024"):
        registry.get(registry.add_folder(folder))
    small = ModelRegistry(device="cpu", default_short_side=64, max_input_side=128, include_bundled=False, untrained=tiny)
    assert small.get(small.add_folder(folder)).model.num_classes == 1024


@pytest.mark.parametrize("net", [
    {"backbone": "vit_large_patch16_384", "d_model": 1024, "n_heads": 16, "n_layers": 24, "image_size": 640},
    {"backbone": "vit_base_patch16_384", "d_model": 768, "n_heads": 12, "n_layers": 12, "image_size": 512},
])
def test_official_sizes_pass_the_budget_at_the_size_the_app_runs(net):
    spec = NetSpec.from_net_kwargs({**NET, **net, "n_cls": 150, "decoder": {"name": "mask_transformer", "n_layers": 2}})
    check_budget(spec, ModelRegistry(device="cpu", include_bundled=False).limits)
