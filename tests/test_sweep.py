"""τ sweep: mIoU equal to an independent computation, token bookkeeping, config restored, CLI outputs."""

import csv
import dataclasses
import importlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz import algm_state, apply_algm
from algm_viz.cli import main
from algm_viz.datasets import open_dataset
from algm_viz.evaluation.inference import predict_logits, prepare, resized_shape
from algm_viz.evaluation.rows import SweepRow
from algm_viz.evaluation.sweep import SweepConfig, parse_taus, sweep
from algm_viz.models import create_segmenter, save_segmenter
from algm_viz.plots import pareto_figure, rows_to_csv, threshold_figure

sweep_module = importlib.import_module("algm_viz.evaluation.sweep")

CLASSES = ["a", "b", "c"]
NET = {"backbone": "vit_tiny_patch16_384", "d_model": 64, "n_heads": 2, "n_layers": 6, "patch_size": 16, "image_size": 64,
       "n_cls": 3, "normalization": "vit", "d_ff": 256, "layer_norm_eps": 1e-6, "decoder": {"name": "mask_transformer", "n_layers": 2}}


def _model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64,
                            layer_norm_eps=1e-6, mlp_ratio=4.0).eval()


def make_data(root: Path, sizes=((64, 80), (64, 80), (48, 64), (64, 80), (64, 80))) -> Path:
    """Piecewise-constant images with labels (some ignored pixels) in the folder layout."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        cells = rng.integers(0, 3, (4, 4))
        label = cv2.resize(cells.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        palette = rng.integers(0, 256, (3, 3))
        image = (palette[label] + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
        label[:3, :5] = 255
        for folder, array in (("images", image[..., ::-1]), ("labels", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), array)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return open_dataset("folder", make_data(tmp_path_factory.mktemp("data")), class_names=CLASSES)


def _independent_confusion(model, dataset):
    """Hand-built confusion matrix (numpy) from per-image predictions at the original size."""
    confusion = np.zeros((3, 3), np.int64)
    for i in range(len(dataset)):
        image, label = dataset[i]
        pred = predict_logits(model, image).argmax(0).numpy()
        keep = label != 255
        np.add.at(confusion, (label[keep].astype(int), pred[keep]), 1)
    return confusion


def test_baseline_miou_equals_independent_computation(data):
    model = _model()
    rows = sweep(model, data, SweepConfig(taus=[1.0, -2.0], methods=["baseline", "algm"], warmup=0, flops_images=2),
                 progress=False)
    confusion = _independent_confusion(model, data)
    base, no_merge, all_merge = rows
    assert np.array_equal(np.array(base["confusion"]), confusion)
    present = confusion.sum(0) + confusion.sum(1) > 0
    iou = 100 * np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion)).clip(1)
    assert base["miou"] == pytest.approx(iou[present].mean(), abs=1e-12)
    assert base["images"] == len(data) and base["images_per_s"] > 0
    p25, p75 = base["images_per_s_spread"]
    assert p25 <= base["images_per_s"] <= p75
    # τ = 1 merges nothing: identical predictions and all tokens kept
    assert no_merge["confusion"] == base["confusion"]
    assert no_merge["tokens"] == base["tokens"]
    patches = (4 * 20 + 12) / 5
    assert base["tokens"] == {"patches": patches, "local": patches, "global": patches, "final": patches}
    assert no_merge["gflops"] == pytest.approx(base["gflops"], rel=0.01)  # + similarity bookkeeping
    # τ = -2 merges every window and every A token
    assert all_merge["tokens"]["local"] < all_merge["tokens"]["patches"]
    assert all_merge["tokens"]["final"] == all_merge["tokens"]["global"] < all_merge["tokens"]["local"]
    assert all_merge["gflops"] < base["gflops"]


def test_methods_limit_and_restored_config(data):
    model = _model()
    apply_algm(model, local_threshold=0.7, global_threshold=0.8)
    config = algm_state(model).config
    rows = sweep(model, data, SweepConfig(taus=[-2.0], methods=["clap", "gbm"], warmup=0, flops_images=0, limit=2),
                 progress=False)
    assert algm_state(model).config == config
    clap, gbm = rows
    assert (clap["local_threshold"], clap["global_threshold"]) == (-2.0, None)
    assert (gbm["local_threshold"], gbm["global_threshold"]) == (None, -2.0)
    assert clap["tokens"]["global"] == clap["tokens"]["local"] < clap["tokens"]["patches"]
    assert gbm["tokens"]["local"] == gbm["tokens"]["patches"] > gbm["tokens"]["global"]
    assert clap["images"] == 2 and np.isnan(clap["gflops"])


def test_each_image_is_decoded_once_for_all_configurations(data, monkeypatch):
    reads = []
    read = type(data).__getitem__
    monkeypatch.setattr(type(data), "__getitem__", lambda self, index: reads.append(index) or read(self, index))
    rows = sweep(_model(), data, SweepConfig(taus=[0.7, 0.9], methods=["baseline", "algm"], warmup=0, flops_images=0),
                 progress=False)
    assert len(rows) == 3 and sorted(reads) == list(range(len(data)))  # baseline + 2 τ, one read per image


def test_algm_prop_sweeps_with_proportional_attention(data, monkeypatch):
    model = _model()
    seen = []
    original = sweep_module.evaluate
    monkeypatch.setattr(sweep_module, "evaluate", lambda m, *a, **k: seen.append(algm_state(m).prop_attn) or original(m, *a, **k))
    rows = sweep(model, data, SweepConfig(taus=[0.5], methods=["algm", "algm_prop"], warmup=0, flops_images=0, limit=2),
                 progress=False)
    assert seen == [False, True]
    assert [(r["method"], r["local_threshold"], r["global_threshold"]) for r in rows] == [("algm", 0.5, 0.5), ("algm_prop", 0.5, 0.5)]


def test_other_engine_methods_sweep_their_own_knob(data):
    model = _model()
    config = SweepConfig(taus=[0.9], methods=["baseline", "tome"], values={"tome": [0, 3]}, warmup=0, flops_images=1,
                         limit=2)
    assert config.runs() == [("baseline", None), ("tome", 0.0), ("tome", 3.0)]
    base, r0, r3 = sweep(model, data, config, progress=False)
    assert (r3["knob"], r3["value"], r3["local_threshold"], r3["global_threshold"]) == ("r", 3.0, None, None)
    assert r0["tokens"]["final"] == base["tokens"]["final"]
    assert r3["tokens"]["final"] < r0["tokens"]["final"]  # r = 3 tokens fewer in each of the 6 layers
    # no CLAP/GBM stage: no local/global count, but the real count after each of the 6 ToMe layers
    assert r3["tokens"]["local"] is None and r3["tokens"]["global"] is None
    assert [(s["name"], s["layer"]) for s in r3["stages"]] == [(f"tome{layer}", layer) for layer in range(1, 7)]
    counts = [s["tokens"] for s in r3["stages"]]
    assert counts == sorted(counts, reverse=True) and counts[0] < r3["tokens"]["patches"]
    assert counts[-1] == r3["tokens"]["final"]
    assert base["stages"] == [] and base["tokens"]["local"] == base["tokens"]["patches"]
    assert algm_state(model) is None


def test_auto_sweeps_the_calibrated_threshold_pair(data):
    model = _model()
    model.info = dataclasses.replace(model.info, thresholds={"local": 0.5, "global": -2.0})
    (row,) = sweep(model, data, SweepConfig(taus=parse_taus("auto"), methods=["algm"], warmup=0, flops_images=0, limit=2),
                   progress=False)
    assert (row["value"], row["local_threshold"], row["global_threshold"]) == ("auto", 0.5, -2.0)
    assert row["tokens"]["global"] < row["tokens"]["local"]


def test_every_algm_variant_sweeps_the_calibrated_pair(data):
    model = _model()
    model.info = dataclasses.replace(model.info, thresholds={"local": 0.5, "global": -2.0})
    rows = sweep(model, data, SweepConfig(taus=["auto"], methods=["clap", "gbm", "gbm1"], warmup=0, flops_images=0,
                                          limit=2), progress=False)
    assert [(r["method"], r["local_threshold"], r["global_threshold"]) for r in rows] == [
        ("clap", 0.5, None), ("gbm", None, -2.0), ("gbm1", None, -2.0)]
    gbm1 = rows[2]["tokens"]
    assert gbm1["local"] == gbm1["patches"] > gbm1["global"]


def test_parse_taus_and_config_errors():
    assert parse_taus("auto") == ["auto"] and parse_taus("0.9,auto,0.8") == [0.8, 0.9, "auto"]
    # 7 values, exact decimals (0.96 is not on this grid: 0.70 + 7 * 0.04 = 0.98 > 0.96)
    assert parse_taus("0.70:0.96:0.04") == [0.7, 0.74, 0.78, 0.82, 0.86, 0.9, 0.94]
    assert parse_taus("0.60:0.96:0.04")[-1] == 0.96 and len(parse_taus("0.60:0.96:0.04")) == 10
    assert parse_taus("0.1:0.3:0.1") == [0.1, 0.2, 0.3] and parse_taus("0.5:0.55:0.1") == [0.5]
    taus = parse_taus("0.80:0.98:0.02")
    assert len(taus) == 10 and taus[0] == 0.8 and taus[-1] == pytest.approx(0.98)
    assert parse_taus("0.9, 0.8") == [0.8, 0.9]
    for bad in ("", "a:b:c", "0.9:0.8:0", "nan"):
        with pytest.raises(ValueError):
            parse_taus(bad)
    with pytest.raises(ValueError, match="unknown methods"):
        SweepConfig(methods=["nosuch"])
    with pytest.raises(ValueError):
        SweepConfig(batch_size=0)


def test_every_row_carries_its_difference_to_the_baseline_with_an_interval(data):
    model = _model()
    config = SweepConfig(taus=[1.0, -2.0], methods=["baseline", "algm"], warmup=0, bootstrap=200, seed=1)
    base, no_merge, all_merge = sweep(model, data, config, progress=False)
    assert base["flops_images"] == base["images"] == len(data)  # GFLOPs over every image by default
    assert (base["delta_miou"], base["delta_miou_ci"]) == (0.0, [0.0, 0.0])
    assert (no_merge["delta_miou"], no_merge["delta_miou_ci"]) == (0.0, [0.0, 0.0])  # identical predictions
    low, high = all_merge["delta_miou_ci"]
    assert low <= all_merge["delta_miou"] <= high and low < high
    assert all_merge["delta_miou"] == pytest.approx(all_merge["miou"] - base["miou"])
    assert base["miou_ci"][0] <= base["miou"] <= base["miou_ci"][1]
    assert all_merge["bootstrap"] == {"resamples": 200, "seed": 1, "confidence": 0.95, "paired_with": "baseline"}
    again = sweep(model, data, config, progress=False)[2]
    assert again["delta_miou_ci"] == all_merge["delta_miou_ci"]  # seeded
    (alone,) = sweep(model, data, SweepConfig(taus=[-2.0], methods=["algm"], warmup=0, bootstrap=0, limit=3), progress=False)
    assert alone["delta_miou"] is None and alone["miou_ci"] is None and alone["images"] == 3


def test_progress_lines_off_a_terminal(data, caplog, monkeypatch):
    monkeypatch.setattr(sweep_module.sys.stdout, "isatty", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="algm_viz.evaluation.sweep"):
        sweep(_model(), data, SweepConfig(taus=[0.5], methods=["baseline", "algm"], warmup=0, flops_images=0,
                                          bootstrap=0, log_every_s=0.0), progress=True)
    lines = [r.getMessage() for r in caplog.records if "images/s, ETA" in r.getMessage()]
    assert any(line.startswith(f"baseline: 1/{2 * len(data)} images") for line in lines)
    assert lines[-1].startswith(f"algm τ=0.5 done (2/2 configurations): {2 * len(data)}/{2 * len(data)} images")
    assert lines[-1].endswith("ETA 0 s")


def test_cli_writes_json_csv_and_html(tmp_path):
    root = make_data(tmp_path / "data")
    folder = save_segmenter(_model(), tmp_path / "model", NET)
    out = tmp_path / "out" / "results.json"
    code = main(["sweep", "--model", str(folder), "--data", str(root), "--dataset", "folder", "--classes", "a,b,c",
                 "--taus", "0.5,1.0", "--methods", "baseline,algm,gbm,pool2d", "--values", "pool2d=2", "--batch-size", "2", "--warmup", "1",
                 "--flops-images", "1", "--limit", "3", "--threads", "1", "--bootstrap", "50", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["method"], r["local_threshold"], r["global_threshold"]) for r in rows] == [
        ("baseline", None, None), ("algm", 0.5, 0.5), ("algm", 1.0, 1.0), ("gbm", None, 0.5), ("gbm", None, 1.0),
        ("pool2d", None, None)]
    assert rows[-1]["tokens"]["final"] < rows[0]["tokens"]["final"]
    assert result["class_names"] == CLASSES and result["inference"] == "whole image"
    with out.with_suffix(".csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and float(table[0]["miou"]) == pytest.approx(rows[0]["miou"])
    assert [float(table[2][k]) for k in ("delta_miou", "delta_miou_low", "delta_miou_high")] == pytest.approx(
        [rows[2]["delta_miou"], *rows[2]["delta_miou_ci"]])
    assert table[-1]["tokens_local"] == "" and table[-1]["tokens_by_stage"].startswith("pool2d1:")
    assert rows[0]["flops_images"] == 2 and rows[0]["images"] == 3 and result["images"] == 3  # whole batches of 2
    assert torch.get_num_threads() == 1
    assert "iou_c" in table[0]
    assert "plotly" in out.with_suffix(".html").read_text()[:5_000_000]


def test_figures_from_rows(tmp_path):
    rows = [
        {"method": "baseline", "local_threshold": None, "global_threshold": None, "miou": 50.0, "per_class_iou": [50.0, None],
         "images_per_s": 10.0, "images_per_s_spread": [9.0, 11.0], "gflops": 4.0, "tokens": {"patches": 10, "local": 10, "global": 10}},
        *({"method": "algm", "local_threshold": t, "global_threshold": t, "miou": 40 + 10 * t, "per_class_iou": [1.0, 2.0],
           "images_per_s": 20 - 5 * t, "images_per_s_spread": [18 - 5 * t, 21 - 5 * t], "gflops": 2 + t,
           "tokens": {"patches": 10, "local": 8, "global": 6}} for t in (0.9, 0.8)),
    ]
    calibrated = {**rows[1], "value": "auto", "local_threshold": 0.95, "global_threshold": 0.7, "miou": 45.0, "gflops": 2.5}
    no_intervals = threshold_figure(rows)
    assert no_intervals.data[0].error_y.array is None
    for row, delta in zip(rows, (0.0, -1.0, -2.0)):
        row.update(delta_miou=delta, delta_miou_ci=[delta - 0.5, delta + 0.25])
    figure = threshold_figure(rows + [calibrated], current=0.85)
    assert list(figure.data[0].error_y.array) == pytest.approx([0.25, 0.25])  # upper: high - Δ
    assert list(figure.data[0].error_y.arrayminus) == pytest.approx([0.5, 0.5])
    assert figure.data[0].text[0] == "ΔmIoU -2.00 [-2.50, -1.75]"
    assert [trace.name for trace in figure.data] == [
        "ALGM (CLAP + GBM): mIoU (%)", "ALGM (CLAP + GBM): images/s",
        "ALGM (CLAP + GBM) at the calibrated τ: local 0.950, global 0.700"]
    assert list(figure.data[0].x) == [0.8, 0.9]  # the calibrated pair is a star of its own, not a line point
    assert (list(figure.data[2].x), list(figure.data[2].y)) == ([0.95], [45.0])
    assert list(figure.data[1].error_y.array) == pytest.approx([1.0, 1.0])
    shapes = figure.layout.shapes
    assert len(shapes) == 3  # two baseline lines, one current-τ marker
    pareto = pareto_figure(rows + [calibrated], "gflops")
    assert [t.name for t in pareto.data] == ["ALGM (CLAP + GBM)", "baseline"] and list(pareto.data[0].x) == [2.5, 2.8, 2.9]
    assert pareto.data[0].text[0] == "calibrated τ (0.95, 0.7)"
    with pytest.raises(ValueError):
        pareto_figure(rows, "tokens")
    path = rows_to_csv(rows, tmp_path / "rows.csv", ["x", "y"])
    lines = path.read_text().splitlines()
    assert lines[0].endswith("iou_x,iou_y") and len(lines) == 4


def test_sliding_window_averages_overlapping_windows():
    model = _model()
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    from algm_viz.evaluation.inference import prepare

    x = prepare(model, image)
    with torch.no_grad():
        left, right = model(x[..., :64]), model(x[..., 32:])
    expected = torch.zeros(1, 3, 64, 96)
    expected[..., :32], expected[..., 64:] = left[..., :32], right[..., 32:]
    expected[..., 32:64] = (left[..., 32:] + right[..., :32]) / 2
    result = predict_logits(model, image, window=64, stride=32)
    assert result.shape == (3, 64, 96)
    assert torch.allclose(result, expected[0], atol=1e-5)
    whole = predict_logits(model, image)
    assert torch.allclose(predict_logits(model, image, window=128), whole, atol=1e-5)
    resized = predict_logits(model, image, short_side=32)
    assert resized.shape == (3, 64, 96) and not torch.allclose(resized, whole, atol=1e-3)


def test_every_command_takes_threads_and_shows_its_defaults():
    from algm_viz.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"sweep", "calibrate", "analyze", "balance", "train", "bench", "compare"} <= set(commands)
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        assert "--threads THREADS" in text, name
        assert "(default: " in text, name
    sweep_help = " ".join(commands["sweep"].format_help().split())
    for default in ("(default: 0.80:0.98:0.02)", "(default: results.json)", "(default: 1000)", "(default: -1)"):
        assert default in sweep_help


def test_rows_read_back_the_shipped_sweep_exactly():
    stored = json.loads((Path(__file__).resolve().parents[1] / "assets" / "models" / "camvid-vit-tiny" / "sweep.json").read_text())
    rows = stored["rows"] if isinstance(stored, dict) else stored
    again = [SweepRow.from_dict(row).to_dict() for row in rows]
    assert again == rows and [list(r) for r in again] == [list(r) for r in rows], "the same keys, in the same order"
    assert SweepRow.from_dict({**rows[0], "new_key": 1}).to_dict()["new_key"] == 1, "unknown keys survive"
    row = SweepRow.from_dict(rows[0])
    assert row.method == "baseline" and row.tokens["patches"] > 0


def test_confusions_from_labels_equal_the_resized_logits_formula(data, monkeypatch):
    """Resized inputs (short side 40 against labels of 48-64 rows), batches of two: the sweep's label path
    (:func:`resized_argmax`, never the label-size logits) scores exactly as arg-max of the logits resized with
    ``F.interpolate``, per image and pooled, baseline and ALGM alike; the label-size logits are never made."""
    import torch.nn.functional as F

    model = _model()
    config = SweepConfig(taus=[0.5], methods=["baseline", "algm"], warmup=0, bootstrap=0, short_side=40, batch_size=2)
    resizes: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()  # (from, to) of every F.interpolate
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate",
                        lambda x, *a, **k: resizes.add((tuple(x.shape[-2:]), tuple(k.get("size") or a[0]))) or interpolate(x, *a, **k))
    rows = sweep(model, data, config, progress=False)
    monkeypatch.undo()
    label_sizes = {tuple(data[i][1].shape) for i in range(len(data))}
    input_sizes = {resized_shape(*size, 40) for size in label_sizes}
    assert not {(a, b) for a in input_sizes for b in label_sizes} & resizes, "logits were resized to the label size"
    for row in rows:
        sweep_module.configure_method(model, row["method"], row["value"], config)
        expected = np.zeros((3, 3), np.int64)
        for i in range(len(data)):
            image, label = data[i]
            with torch.inference_mode():
                logits = model(prepare(model, image, 40))
            assert logits.shape[-2:] != label.shape, "the test must exercise the resize"
            pred = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
            keep = label != 255
            np.add.at(expected, (label[keep].astype(int), pred[keep]), 1)
        assert np.array_equal(np.array(row["confusion"]), expected), row["method"]


@pytest.mark.parametrize("shape,size", [((2, 5, 7, 9), (30, 41)), ((3, 4, 6), (5, 4)), ((1, 3, 20, 20), (20, 20))])
def test_resized_argmax_is_argmax_of_interpolate_batched(shape, size):
    import torch.nn.functional as F

    from algm_viz.evaluation.inference import resized_argmax

    torch.manual_seed(0)
    logits = torch.randn(*shape)
    batched = logits if logits.dim() == 4 else logits[None]
    expected = F.interpolate(batched, size=size, mode="bilinear", align_corners=False).argmax(1)
    for tile_elements in (1, 1 << 20):
        labels = resized_argmax(logits, size, tile_elements)
        assert labels.shape == (*shape[:-3], *size) and labels.dtype == torch.long
        assert torch.equal(labels if logits.dim() == 4 else labels[None], expected)
