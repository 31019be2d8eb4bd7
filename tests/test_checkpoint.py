"""Loading the official Segmenter checkpoint format, from a folder, a file:// URL and a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import pickle
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

from algm_viz.models import KNOWN_MODELS, CheckpointError, load_segmenter
from algm_viz.models.checkpoint import fetch_checkpoint

D, LAYERS, HEADS, PATCH, SIZE, CLASSES, DEC_LAYERS = 32, 2, 2, 16, 64, 5, 1


def official_state_dict() -> dict[str, torch.Tensor]:
    """Parameter names and shapes as the official Segmenter code (segm/model/{vit,decoder,blocks}.py) saves them."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.cls_token": (1, 1, D),
        "encoder.pos_embed": (1, 1 + (SIZE // PATCH) ** 2, D),
        "encoder.patch_embed.proj.weight": (D, 3, PATCH, PATCH),
        "encoder.patch_embed.proj.bias": (D,),
        "encoder.norm.weight": (D,),
        "encoder.norm.bias": (D,),
        "encoder.head.weight": (CLASSES, D),
        "encoder.head.bias": (CLASSES,),
        "decoder.cls_emb": (1, CLASSES, D),
        "decoder.proj_dec.weight": (D, D),
        "decoder.proj_dec.bias": (D,),
        "decoder.decoder_norm.weight": (D,),
        "decoder.decoder_norm.bias": (D,),
        "decoder.mask_norm.weight": (CLASSES,),
        "decoder.mask_norm.bias": (CLASSES,),
        "decoder.proj_patch": (D, D),
        "decoder.proj_classes": (D, D),
    }
    for prefix, depth in (("encoder", LAYERS), ("decoder", DEC_LAYERS)):
        for i in range(depth):
            block = f"{prefix}.blocks.{i}"
            shapes.update({
                f"{block}.norm1.weight": (D,), f"{block}.norm1.bias": (D,),
                f"{block}.attn.qkv.weight": (3 * D, D), f"{block}.attn.qkv.bias": (3 * D,),
                f"{block}.attn.proj.weight": (D, D), f"{block}.attn.proj.bias": (D,),
                f"{block}.norm2.weight": (D,), f"{block}.norm2.bias": (D,),
                f"{block}.mlp.fc1.weight": (4 * D, D), f"{block}.mlp.fc1.bias": (4 * D,),
                f"{block}.mlp.fc2.weight": (D, 4 * D), f"{block}.mlp.fc2.bias": (D,),
            })
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def variant() -> dict:
    return {
        "net_kwargs": {
            "backbone": "vit_tiny_patch16_384", "d_model": D, "n_heads": HEADS, "n_layers": LAYERS,
            "patch_size": PATCH, "image_size": [SIZE, SIZE], "n_cls": CLASSES, "normalization": "vit",
            "distilled": False, "dropout": 0.0, "drop_path_rate": 0.1,
            "decoder": {"name": "mask_transformer", "n_layers": DEC_LAYERS, "drop_path_rate": 0.0, "dropout": 0.1},
        },
        "dataset_kwargs": {"dataset": "ade20k", "crop_size": SIZE},
        "inference_kwargs": {"im_size": SIZE, "window_size": SIZE, "window_stride": SIZE},
    }


@pytest.fixture
def official(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "seg_test_mask"
    folder.mkdir()
    state = official_state_dict()
    torch.save({"model": state, "epoch": 63}, folder / "checkpoint.pth")
    (folder / "variant.yml").write_text(yaml.safe_dump(variant()))
    return folder, state


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("encoder.head.")}
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name


def test_round_trip_from_folder_and_file(official):
    folder, state = official
    for source in (folder, folder / "checkpoint.pth", str(folder)):
        model = load_segmenter(source)
        assert_loaded(model, state)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 80))
    assert out.shape == (1, CLASSES, 48, 80) and not model.training
    assert model.encoder.norm.eps == 1e-5  # the official code's LayerNorm


def test_download_from_file_url_is_cached(official, tmp_path, monkeypatch):
    folder, state = official
    monkeypatch.setenv("ALGM_VIZ_CACHE", str(tmp_path / "cache"))
    assert_loaded(load_segmenter(folder.as_uri()), state)
    cached = fetch_checkpoint(folder.as_uri(), progress=False)
    assert cached.parent == tmp_path / "cache" and (cached / "checkpoint.pth").is_file()
    (folder / "checkpoint.pth").unlink()  # the cache now serves it
    assert_loaded(load_segmenter(folder.as_uri()), state)


def test_download_over_http(official, tmp_path, monkeypatch):
    folder, state = official
    monkeypatch.setenv("ALGM_VIZ_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{folder.name}/"
        assert_loaded(load_segmenter(url), state)
    finally:
        server.shutdown()


def test_unreachable_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_VIZ_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match="could not download"):
        load_segmenter(f"http://127.0.0.1:{port}/seg_tiny_mask")
    assert not any((tmp_path / "cache").iterdir())  # no empty cache folder left behind


def test_silent_server_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_VIZ_CACHE", str(tmp_path / "cache"))
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/seg_tiny_mask"
        with pytest.raises(CheckpointError, match="timed out"):
            fetch_checkpoint(url, progress=False, timeout=0.5)


def test_registry_points_at_the_official_files():
    assert set(KNOWN_MODELS) >= {"seg_tiny_mask", "seg_small_mask", "seg_base_mask"}
    assert all(entry["url"].startswith("https://") for entry in KNOWN_MODELS.values())


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "variant.yml").unlink(), "missing variant.yml"),
        (lambda f: (f / "variant.yml").write_text("net_kwargs: [1, 2"), "not valid YAML"),
        (lambda f: (f / "checkpoint.pth").write_bytes(b"not a checkpoint"), "could not be read"),
        (lambda f: (f / "checkpoint.pth").write_bytes(pickle.dumps({"model": Exploit()})), "could not be read"),
        (lambda f: torch.save({"model": {"encoder.cls_token": torch.zeros(1)}}, f / "checkpoint.pth"), "does not fit"),
        (lambda f: (f / "variant.yml").write_text(yaml.safe_dump({"net_kwargs": {"backbone": "resnet50"}})), "does not describe"),
    ],
)
def test_wrong_checkpoints_are_rejected(official, damage, message, capsys):
    folder, _ = official
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        load_segmenter(folder)
    assert "must never run" not in capsys.readouterr().out


def test_official_style_variant_with_tuples_loads(official):
    """The official training script writes variant.yml with ``yaml.dump``: tuples get a !!python/tuple tag."""
    folder, state = official
    written = variant()
    written["net_kwargs"]["image_size"] = (SIZE, SIZE)
    written["dataset_kwargs"]["crop_size"] = (SIZE, SIZE)
    written["algorithm_kwargs"] = {"batch_size": 8, "start_epoch": 0, "eval_freq": 4}
    text = yaml.dump(written)
    assert "!!python/tuple" in text
    (folder / "variant.yml").write_text(text)
    assert_loaded(load_segmenter(folder), state)
    (folder / "variant.yml").write_text(text.replace("!!python/tuple", "!!python/object/apply:builtins.tuple"))
    with pytest.raises(CheckpointError, match="python/object/apply:builtins.tuple, which is not accepted"):
        load_segmenter(folder)


def test_calibration_thresholds_in_the_variant_are_used(official):
    folder, _ = official
    (folder / "variant.yml").write_text(yaml.safe_dump({**variant(), "algm_thresholds": {"local": 0.8, "global": 0.7}}))
    assert load_segmenter(folder).info.thresholds == {"local": 0.8, "global": 0.7}
    (folder / "variant.yml").write_text(yaml.safe_dump({**variant(), "algm_thresholds": {"local": "high"}}))
    with pytest.raises(CheckpointError, match="algm_thresholds must map 'local'/'global' to numbers"):
        load_segmenter(folder)
