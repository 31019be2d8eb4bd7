"""The app's handlers and per-image cache, without a server (a tiny untrained model)."""

import csv
import json
import math
import os
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
import torch

from algm_viz import algm_state, render
from algm_viz.app import analysis
from algm_viz.app.gpu import gpu
from algm_viz.app.inputs import read_image_file, resize_for_model
from algm_viz.app.models import ModelRegistry
from algm_viz.app.session import LATENCY_ROUNDS, ImageSession, SessionCache, Settings
from algm_viz.app.ui import Handlers
from algm_viz.evaluation.rows import SweepRow
from algm_viz.models import KNOWN_MODELS, create_segmenter, save_segmenter
from algm_viz.models.bundled import save_bundled
from algm_viz.preprocess import ImageError

from conftest import APP_TINY as TINY, scene, tiny_registry, write  # noqa: F401 (other tests import them from here)

@pytest.fixture(scope="module")
def registry():
    return tiny_registry()


@pytest.fixture()
def handlers(registry):
    return Handlers(registry, SessionCache(max_side=128), thresholds=(0.6, 0.8, 1.0))


def test_resize_policy_and_tiny_images():
    image = np.zeros((100, 400, 3), np.uint8)
    assert resize_for_model(image, 64, 1024, 8).shape[:2] == (64, 256)
    assert resize_for_model(image, 64, 128, 8).shape[:2] == (32, 128), "long side capped"
    with pytest.raises(ImageError, match="at least 8 pixels"):
        resize_for_model(np.zeros((5, 50, 3), np.uint8), 64, 1024, 8)


def test_read_image_file_handles_16bit_gray_rgba_and_rejects_corrupt(tmp_path):
    rgb = scene()
    assert (read_image_file(write(tmp_path, "rgb.png", rgb)) == rgb).all()
    gray16 = (np.arange(60 * 90).reshape(60, 90) * 10).astype(np.uint16)
    out = read_image_file(write(tmp_path, "g16.png", gray16))
    assert out.shape == (60, 90, 3) and out.dtype == np.uint8 and (out[..., 0] == gray16 // 257).all()
    rgba = np.dstack([rgb, np.full((60, 90), 128, np.uint8)])
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert (read_image_file(path) == rgb).all()
    with pytest.raises(ImageError, match="megapixels"):
        read_image_file(write(tmp_path, "big.png", np.zeros((3000, 2000), np.uint8)), max_pixels=5_000_000)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="not an image"):
        read_image_file(corrupt)


@pytest.mark.parametrize("bad, message", [
    (dict(local_threshold=float("nan")), "local_threshold"),
    (dict(global_threshold=1.5), "global_threshold"),
    (dict(window=0), "window"),
    (dict(global_layer=0), "global_layer"),
    (dict(local_layer=3, global_layer=2), "must not come before"),
    (dict(window=2.5), "whole number"),
    (dict(prop_attn="yes"), "prop_attn"),
])
def test_settings_reject_bad_values_when_built(bad, message):
    values = dict(local_threshold=0.9, global_threshold=0.9, window=2, global_layer=5) | bad
    with pytest.raises(ValueError, match=message):
        Settings(**values)


def test_settings_are_plain_numbers_and_the_model_refuses_a_layer_it_lacks(registry):
    settings = Settings(np.float32(0.9000001), 0.8, window=2.0, global_layer=np.int64(5), prop_attn=np.bool_(True))
    assert settings == Settings(0.9, 0.8, 2, 5, prop_attn=True) and type(settings.global_layer) is int
    session = ImageSession(registry.get("untrained"), scene())  # 6 layers
    with pytest.raises(ValueError, match="outside the ViT's layers 1..6"):
        session.algm(Settings(0.9, 0.9, global_layer=7))


def test_baseline_runs_once_and_tau_reruns_only_algm(registry, monkeypatch):
    entry = registry.get("untrained")
    calls = []
    original = entry.model.forward
    monkeypatch.setattr(entry.model, "forward", lambda images: calls.append(1) or original(images))
    session = ImageSession(entry, scene())
    readouts = [analysis.analyze(session, Settings(tau, tau), with_gflops=False).readout for tau in (0.7, 0.8, 0.7)]
    timing = 2 * LATENCY_ROUNDS  # per new τ: baseline and ALGM in interleaved rounds, as bench times them
    assert len(calls) == 1 + 2 * (1 + timing), "one baseline forward, one ALGM forward and its timing per new τ, " \
                                               "none for a repeated τ"
    assert readouts[2] == readouts[0]
    latency = readouts[1]["latency_ms"]
    assert readouts[1]["timing"] == {"rounds": LATENCY_ROUNDS, "interleaved": True, "how": readouts[1]["timing"]["how"]}
    assert all(t["p25"] <= t["median"] <= t["p75"] for t in latency.values())
    assert readouts[1]["speedup"] == pytest.approx(latency["baseline"]["median"] / latency["algm"]["median"])
    assert f"median and quartiles of {LATENCY_ROUNDS} rounds" in analysis.readout_markdown(readouts[1])


def test_latency_interleaves_baseline_and_setting(registry, monkeypatch):
    entry = registry.get("untrained")
    session = ImageSession(entry, scene())
    order = []
    original = entry.model.forward
    monkeypatch.setattr(entry.model, "forward",
                        lambda images: order.append(algm_state(entry.model) is not None) or original(images))
    latency = session.latency(Settings(0.8, 0.8), rounds=3)
    assert order == [False, True] * 3, "baseline, then the setting, in every round"
    assert latency.baseline.repeats == latency.algm.repeats == 3
    assert session.latency(Settings(0.8, 0.8), rounds=3) is latency and len(order) == 6, "cached per setting"


def test_curve_rows_are_the_sweeps_measurement_computed_once_per_curve(registry, monkeypatch):
    import algm_viz.app.session as session_module

    session = ImageSession(registry.get("untrained"), scene())
    calls = []
    original = session_module.evaluate
    monkeypatch.setattr(session_module, "evaluate", lambda *args, **kwargs: calls.append(kwargs["method"]) or original(*args, **kwargs))
    first = session.curve_rows([0.6, 0.8], 2, 5)
    assert calls == ["baseline", "algm", "algm"], "the baseline row and one per τ, by the sweep's evaluate"
    assert session.curve_rows([0.6, 0.8], 2, 5) is first and len(calls) == 3
    assert session.curve_rows([0.6, 0.8], 2, 5, prop_attn=True)[1]["method"] == "algm_prop" and len(calls) == 6
    assert [SweepRow.from_dict(row).to_dict() for row in first] == first, "rows of the one row type"
    baseline, merged = first[0], first[1]
    assert baseline["miou"] == pytest.approx(100.0) and baseline["images"] == merged["images"] == 1
    assert merged["miou"] == pytest.approx(session.agreement(session.algm(Settings(0.6, 0.6)).prediction)[0])
    assert merged["gflops"] == pytest.approx(session.gflops(Settings(0.6, 0.6)), rel=1e-6)
    assert merged["gflops"] < baseline["gflops"]
    assert merged["tokens"]["global"] == session.algm(Settings(0.6, 0.6)).maps.tokens["global"]


def test_readout_matches_the_merge(registry):
    session = ImageSession(registry.get("untrained"), scene())
    none = analysis.analyze(session, Settings(1.0, 1.0))
    tokens = none.readout["tokens"]
    assert tokens["patches"] == tokens["local"] == tokens["global"] == session.num_patches
    assert none.readout["agreement_miou"] == pytest.approx(100.0)
    assert (none.local_overlay == session.image).all() and (none.global_overlay == session.image).all()
    merged = analysis.analyze(session, Settings(0.0, 0.0))
    tokens = merged.readout["tokens"]
    assert tokens["global"] < tokens["local"] < tokens["patches"]
    assert merged.readout["gflops"]["algm"] < merged.readout["gflops"]["baseline"]
    assert not (merged.local_overlay == session.image).all()
    assert merged.readout["kept_percent"]["global"] == pytest.approx(100 * tokens["global"] / tokens["patches"])


def test_proportional_attention_is_a_setting_of_its_own(registry):
    entry = registry.get("untrained")
    session = ImageSession(entry, scene())
    plain = analysis.analyze(session, Settings(0.3, 0.3), with_gflops=False)
    weighted = analysis.analyze(session, Settings(0.3, 0.3, prop_attn=True), with_gflops=False)
    assert algm_state(entry.model).prop_attn is True
    assert (plain.readout["proportional_attention"], weighted.readout["proportional_attention"]) == (False, True)
    assert "proportional attention" in analysis.readout_markdown(weighted.readout)
    assert plain.readout["tokens"]["local"] == weighted.readout["tokens"]["local"]  # CLAP runs before any weighting
    _, rows = analysis.curve(session, Settings(0.3, 0.3, prop_attn=True), [0.3])
    assert [r["method"] for r in rows] == ["baseline", "algm_prop", "algm_prop"]
    assert rows[1]["miou"] == rows[2]["miou"] == pytest.approx(weighted.readout["agreement_miou"])


def test_image_curve_varies_one_stage_with_the_other_at_its_slider_and_passes_through_the_setting(registry):
    session = ImageSession(registry.get("untrained"), scene())
    settings = Settings(0.99, 0.4)
    readout = analysis.analyze(session, settings, with_gflops=False).readout
    figure, rows = analysis.curve(session, settings, [0.6, 1.0])
    local = [r for r in rows if r.get("varied") == "local"]
    global_ = [r for r in rows if r.get("varied") == "global"]
    assert [r["local_threshold"] for r in local] == [0.6, 0.99, 1.0] and {r["global_threshold"] for r in local} == {0.4}
    assert [r["global_threshold"] for r in global_] == [0.4, 0.6, 1.0] and {r["local_threshold"] for r in global_} == {0.99}
    here = [r["miou"] for r in rows[1:] if (r["local_threshold"], r["global_threshold"]) == (0.99, 0.4)]
    assert here == pytest.approx([readout["agreement_miou"]] * 2), "both curves pass through the readout's setting"
    stars = [t for t in figure.data if t.name == "current setting"]
    assert [t.x[0] for t in stars] == [0.99, 0.4]
    assert [t.y[0] for t in stars] == pytest.approx([readout["agreement_miou"]] * 2)
    with pytest.raises(ValueError, match="vary"):
        session.curve_rows([0.6], 2, 5, vary="local")


def test_label_map_gives_real_miou(registry):
    entry = registry.get("untrained")
    image = scene(64, 96)  # already the model's input size: the label needs no resizing
    label = ImageSession(entry, image).baseline().prediction.astype(np.uint8)
    label[:8, :8] = 255  # ignored
    session = ImageSession(entry, image, label)
    readout = analysis.analyze(session, Settings(0.8, 0.8), with_gflops=False).readout
    assert readout["miou"]["baseline"] == pytest.approx(100.0)
    assert readout["miou"]["algm"] == pytest.approx(_miou_of(session, readout))
    with pytest.raises(ImageError, match="label map"):
        ImageSession(entry, image, label[:10])


def test_views_show_tokens_as_superpixels_and_the_ground_truth(registry):
    entry = registry.get("untrained")
    image = scene(64, 96)
    label = np.zeros(image.shape[:2], np.uint8)
    label[32:] = 3
    labelled = analysis.analyze(ImageSession(entry, image, label), Settings(0.5, 0.5), with_gflops=False)
    plain = analysis.analyze(ImageSession(entry, image), Settings(0.5, 0.5), with_gflops=False)
    assert plain.ground_truth is None and labelled.ground_truth.shape == image.shape
    session = ImageSession(entry, image, label)
    assert (labelled.ground_truth == render.segmentation_overlay(session.image, session.label, entry.colors)).all()
    assert plain.mean_colors.shape == image.shape
    groups = plain.readout["tokens"]["global"]
    assert len(np.unique(plain.mean_colors.reshape(-1, 3), axis=0)) <= groups + 1, "one colour per token (+ outline)"
    assert plain.legend.shape[1] == analysis.LEGEND_WIDTH


def _no_nan(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def _miou_of(session, readout):
    """mIoU of the cached ALGM prediction against the stored label, computed here independently."""
    settings = Settings(readout["thresholds"]["local"], readout["thresholds"]["global"])
    prediction, label = session.algm(settings).prediction.astype(int), session.label
    valid = label != 255
    ious = [((prediction == c) & (label == c) & valid).sum() / (((prediction == c) | (label == c)) & valid).sum()
            for c in range(5) if (((prediction == c) | (label == c)) & valid).any()]
    return 100 * float(np.mean(ious))


def test_a_file_is_decoded_once_until_it_changes(handlers, tmp_path, monkeypatch):
    import algm_viz.app.ui as ui_module
    reads = []
    monkeypatch.setattr(ui_module, "read_image_file", lambda path: reads.append(path) or read_image_file(path))
    path = write(tmp_path, "scene.png", scene())
    handlers.analyze("untrained", path, None, 0.8, 0.8, 2, 5)
    handlers.curve("untrained", path, None, 0.8, 0.8, 2, 5)
    handlers.balance("untrained", path, None, 0.9, 0.9, 2, 5)
    assert len(reads) == 1
    first = handlers._session("untrained", path, None)
    write(tmp_path, "scene.png", scene(seed=1)[:, ::-1].copy())  # new content, new size/mtime
    os.utime(path, ns=(1, 1))
    assert handlers._session("untrained", path, None) is not first and len(reads) == 2


def test_handlers_answer_bad_input_with_clear_errors(handlers, tmp_path):
    good = write(tmp_path, "ok.png", scene())
    cases = [
        (("untrained", good, None, math.nan, 0.9, 2, 5), "local_threshold"),
        (("untrained", good, None, 0.9, 0.9, 2, 99), "layer 99 is outside the ViT's layers 1..6"),
        (("untrained", write(tmp_path, "tiny.png", scene(4, 4)), None, 0.9, 0.9, 2, 5), "at least"),
        (("no-such-model", good, None, 0.9, 0.9, 2, 5), "unknown model"),
    ]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    cases.append((("untrained", str(broken), None, 0.9, 0.9, 2, 5), "not an image"))
    for args, message in cases:
        with pytest.raises(gr.Error, match=message):
            handlers.analyze(*args)
    assert handlers.analyze("untrained", None, None, 0.9, 0.9, 2, 5)[0] is None


def test_concurrent_requests_get_their_own_answers(handlers, tmp_path):
    jobs = [(write(tmp_path, f"im{i}.png", scene(seed=i)), 0.6 + 0.1 * (i % 4), 2 + i % 2) for i in range(6)]
    run = lambda job: handlers.analyze("untrained", job[0], None, job[1], job[1], job[2], 5)[6]  # noqa: E731
    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, reversed(jobs)))[::-1]
    key = lambda r: (r["tokens"], r["thresholds"], r["window"], r["agreement_miou"])  # noqa: E731
    assert [key(r) for r in together] == [key(r) for r in alone]


def test_curve_balance_and_export(handlers, tmp_path):
    args = ("untrained", write(tmp_path, "ok.png", scene()), None, 0.8, 0.8, 2, 5)
    figure, dataset = handlers.curve(*args)
    assert dataset is None
    assert sum(abs(shape["x0"] - 0.8) < 1e-9 for shape in figure.layout.shapes) == 4, "current τ marked, both rows of both curves"
    balance_plot, summary = handlers.balance(*args)
    assert "entropy" in summary.lower() and balance_plot is not None
    files = {p.rsplit("/", 1)[-1]: p for p in handlers.export(*args)}
    assert set(files) == {"readout.json", "tau_curve.json", "tau_curve.csv", "attention_balance.json"}
    rows = json.loads(Path(files["tau_curve.json"]).read_text(), parse_constant=_no_nan)  # strict JSON
    assert all(len(r["per_class_iou"]) == 5 for r in rows)
    assert [r["local_threshold"] for r in rows] == [None, 0.6, 0.8, 1.0, 0.8, 0.8, 0.8]
    assert [r["global_threshold"] for r in rows] == [None, 0.8, 0.8, 0.8, 0.6, 0.8, 1.0]
    with open(files["tau_curve.csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_local_checkpoint_loads_and_a_wrong_one_is_refused(handlers, tmp_path):
    torch.manual_seed(1)
    model = handlers.registry.get("untrained").model
    net = {"backbone": "vit_tiny_patch16_384", "image_size": [64, 64], "patch_size": 8, "d_model": 64, "n_heads": 2,
           "n_layers": 6, "n_cls": 5, "decoder": {"name": "linear"}}
    save_segmenter(model, tmp_path / "good", net)
    dropdown = handlers.load_checkpoint(str(tmp_path / "good"), None)
    assert dropdown.value == f"path:{tmp_path / 'good'}"
    save_segmenter(model, tmp_path / "wrong", {**net, "n_layers": 4})
    with pytest.raises(gr.Error, match="does not fit"):
        handlers.load_checkpoint(str(tmp_path / "wrong"), None)
    uploads = [str(tmp_path / "good" / "checkpoint.pth"), str(tmp_path / "good" / "variant.yml")]
    with pytest.raises(gr.Error, match="exactly"):
        handlers.load_checkpoint(None, uploads[:1])
    locked = Handlers(tiny_registry(allow_paths=False))
    with pytest.raises(gr.Error, match="disabled"):
        locked.load_checkpoint(str(tmp_path / "good"), None)
    assert locked.load_checkpoint(None, uploads).value.startswith("path:"), "uploads still load"


def test_select_model_sets_auto_tau_and_offline_downloads_fail_clearly(handlers, monkeypatch, tmp_path):
    local, global_, layer, status, dataset = handlers.select_model("untrained")
    auto = handlers.registry.get("untrained").auto_thresholds
    assert (local.value, global_.value) == (round(auto["local"], 3), round(auto["global"], 3)), "shown rounded"
    assert layer.maximum == TINY["depth"]
    assert "untrained" in status and dataset.visible is False
    monkeypatch.setenv("ALGM_VIZ_CACHE", str(tmp_path))
    monkeypatch.setitem(KNOWN_MODELS, "seg_tiny_mask", {**KNOWN_MODELS["seg_tiny_mask"], "url": "http://127.0.0.1:9/seg_tiny_mask"})
    with pytest.raises(gr.Error, match="could not download") as refused:
        handlers.select_model("official:seg_tiny_mask")
    message = refused.value.message
    assert message.startswith("offline: cannot reach 127.0.0.1 (") and "<" not in message, message
    assert message.endswith("seg_tiny_mask/checkpoint.pth"), "the real cause, not a message ending in ':'"
    with pytest.raises(gr.Error, match="offline: cannot reach 127.0.0.1"):
        handlers.check_model("official:seg_tiny_mask")
    handlers.check_model("untrained")


def test_compare_inputs_are_checked_before_any_work(handlers):
    with pytest.raises(gr.Error, match="upload an image"):
        handlers.check_compare(None, ["algm"], "algm:0.9", "tome:8")
    with pytest.raises(gr.Error, match="at least one method"):
        handlers.check_compare("x.png", [], "algm:0.9", "tome:8")
    with pytest.raises(gr.Error) as typo:
        handlers.check_compare("x.png", ["algm"], "algm:0.9", "tome8")
    assert "tome8" in typo.value.message
    assert len(handlers.check_compare("x.png", ["algm"], "algm:0.9", "tome:8")) == 2


def test_bundled_model_brings_classes_input_size_thresholds_and_dataset_curve(tmp_path):
    config = dict(TINY)
    model = create_segmenter(**config)
    names, colours = [f"c{i}" for i in range(5)], [(i * 40, 0, 0) for i in range(5)]
    folder = save_bundled(model, tmp_path / "tiny-bundle", config=config, class_names=names, colors=colours,
                          thresholds={"local": 0.8, "global": 0.7}, input_size=48)
    rows = [{"method": "baseline", "local_threshold": None, "global_threshold": None, "miou": 50.0, "per_class_iou": [],
             "images_per_s": 10.0, "images_per_s_spread": [9.0, 11.0], "gflops": 1.0, "tokens": {}},
            {"method": "algm", "local_threshold": 0.8, "global_threshold": 0.8, "miou": 51.0, "per_class_iou": [],
             "images_per_s": 14.0, "images_per_s_spread": [13.0, 15.0], "gflops": 0.6, "tokens": {}}]
    (folder / "sweep.json").write_text(json.dumps({"rows": rows}))
    handlers = Handlers(ModelRegistry(device="cpu", include_bundled=False), SessionCache())
    local, global_, _, status, dataset = handlers.select_model(f"bundled:{folder}")
    assert (local.value, global_.value) == (0.8, 0.7) and dataset.visible is True
    assert "48px" in status
    image = write(tmp_path, "ok.png", scene(96, 144))
    readout = handlers.analyze(f"bundled:{folder}", image, None, 0.8, 0.7, 2, 5)[6]
    assert readout["image_size"] == [72, 48], "short side resized to the model's input size"
    assert handlers.curve(f"bundled:{folder}", image, None, 0.8, 0.7, 2, 5)[1] is not None


@pytest.mark.parametrize("training, warnings", [
    ({"train_split": "train+val"}, ["images the model was trained on"]),
    ({"train_split": "train", "val_split": "val"}, ["chose its best epoch"]),
    ({"train_split": "train", "val_split": "val", "shared_sequences": ["0016E5"]},
     ["chose its best epoch", "from sequence 0016E5 it also trained on"]),
    ({"train_split": "train"}, [])])
def test_dataset_curve_says_what_it_was_measured_on(tmp_path, training, warnings):
    config = dict(TINY)
    folder = save_bundled(create_segmenter(**config), tmp_path / "tiny-bundle", config=config,
                          class_names=[f"c{i}" for i in range(5)], colors=[(i * 40, 0, 0) for i in range(5)],
                          input_size=48, training=training)
    rows = [{"method": "baseline", "local_threshold": None, "global_threshold": None, "miou": 50.0, "images": 101,
             "images_per_s": 10.0, "gflops": 1.0},
            {"method": "algm", "local_threshold": 0.8, "global_threshold": 0.8, "miou": 49.0, "images": 101,
             "images_per_s": 14.0, "gflops": 0.6}]
    (folder / "sweep.json").write_text(json.dumps({"dataset": "camvid", "split": "val", "rows": rows}))
    handlers = Handlers(ModelRegistry(device="cpu", include_bundled=False), SessionCache())
    title = json.loads(handlers.select_model(f"bundled:{folder}")[4].value["plot"])["layout"]["title"]["text"]
    assert "measured on camvid val, 101 images" in title
    for text in ("images the model was trained on", "chose its best epoch", "it also trained on"):
        assert (text in title) is any(text in warning for warning in warnings), title


def test_gpu_shim_is_a_no_op_without_spaces_and_uses_spaces_gpu_with_it(monkeypatch):
    def handler():
        return 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails: not on a Space
    assert gpu()(handler) is handler
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda fn: ("on gpu", duration, fn))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert gpu(30)(handler) == ("on gpu", 30, handler)


def test_official_ade20k_models_name_their_150_classes(monkeypatch, tmp_path):
    import algm_viz.models.checkpoint as checkpoint

    net = {"backbone": "vit_tiny_patch16_384", "image_size": [64, 64], "patch_size": 8, "d_model": 64, "n_heads": 2,
           "n_layers": 6, "n_cls": 150, "decoder": {"name": "linear"}}
    save_segmenter(create_segmenter(**{**TINY, "num_classes": 150}), tmp_path / "official", net)
    monkeypatch.setattr(checkpoint, "fetch_checkpoint", lambda url: tmp_path / "official")  # no download
    registry = tiny_registry()
    entry = registry.get("official:seg_tiny_mask")
    assert len(entry.class_names) == 150 and entry.class_names[:3] == ("wall", "building", "sky")
    assert entry.class_names[-1] == "flag" and "class 0" not in entry.class_names
    assert entry.label == "seg_tiny_mask" and entry.short_side == 64, "no short side stated: the registry's"
    path = registry.get(f"path:{tmp_path / 'official'}")  # the same weights, not an official name
    assert path.class_names[:2] == ("class 0", "class 1") and path.colors.shape == (150, 3)


def test_a_new_image_drops_a_label_map_of_another_size(handlers, tmp_path):
    image = write(tmp_path, "image.png", scene(60, 90))
    fitting = write(tmp_path, "fits.png", np.zeros((60, 90), np.uint8))
    other = write(tmp_path, "other.png", np.zeros((30, 40), np.uint8))
    assert handlers.fit_label(image, fitting) == fitting
    assert handlers.fit_label(image, other) is None
    assert handlers.fit_label(image, None) is None and handlers.fit_label(None, other) == other
