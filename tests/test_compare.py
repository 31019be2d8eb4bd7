"""`algm-viz compare`: every method on one image, Pareto data and merge maps."""

from __future__ import annotations

import json

import cv2
import numpy as np
import torch

from algm_viz.cli import main
from algm_viz.evaluation.compare import compare, merge_maps
from algm_viz.models import create_segmenter


def scene(height: int = 64, width: int = 96) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (90, 140, 220)  # sky
    image[height // 2 :] = (80, 80, 80)  # road
    cv2.rectangle(image, (10, 20), (40, 50), (200, 30, 30), -1)
    return image


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=3, image_size=64, depth=6, embed_dim=64, num_heads=2).eval()


def test_compare_rows_cover_every_method_and_knob():
    model = tiny_model()
    rows = compare(model, scene(), ["algm", "tome", "cts"], taus=[0.5, 1.0], values={"tome": [0, 4], "cts": [0.5]}, repeats=2)
    runs = [(r["method"], r["value"]) for r in rows]
    assert runs == [("baseline", None), ("algm", 0.5), ("algm", 1.0), ("tome", 0.0), ("tome", 4.0), ("cts", 0.5)]
    by_run = dict(zip(runs, rows))
    assert by_run[("baseline", None)]["miou"] == 100.0  # agreement of the baseline with itself
    assert by_run[("algm", 1.0)]["miou"] == 100.0 and by_run[("tome", 0.0)]["miou"] == 100.0  # nothing merged
    assert by_run[("tome", 4.0)]["gflops"] < by_run[("baseline", None)]["gflops"]
    assert all(r["images_per_s"] > 0 for r in rows)


def test_compare_logs_agreement_without_a_label_and_miou_with_one(caplog):
    model, image = tiny_model(), scene()
    with caplog.at_level("INFO", logger="algm_viz"):
        compare(model, image, ["algm"], taus=[0.5], repeats=1)
    assert "agreement with the baseline" in caplog.text and "mIoU" not in caplog.text
    caplog.clear()
    label = np.zeros(image.shape[:2], np.uint8)
    with caplog.at_level("INFO", logger="algm_viz"):
        compare(model, image, ["algm"], label=label, taus=[0.5], repeats=1)
    assert "mIoU" in caplog.text and "agreement" not in caplog.text


def test_merge_maps_are_side_by_side():
    model = tiny_model()
    maps = merge_maps(model, scene(), [("algm", -2.0), ("kv_grid", 0.5)])
    assert maps.shape == (64 + 28, 2 * 96, 3)
    left, right = maps[28:, :96], maps[28:, 96:]
    assert not np.array_equal(left, scene())  # ALGM at τ = -2 merges, so groups are painted
    np.testing.assert_array_equal(right, scene())  # key/value merging keeps every token: nothing painted


def test_compare_command_writes_json_csv_html_png(tmp_path):
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), scene()[..., ::-1])
    out = tmp_path / "cmp.json"
    code = main(["compare", "--model", "untrained:vit_tiny_patch16_384", "--image", str(image), "--methods", "algm,pool2d",
                 "--taus", "0.9", "--values", "pool2d=2", "--maps", "algm:0.9", "pool2d:2", "--repeats", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["baseline", "algm", "pool2d"]
    assert result["quality"].startswith("agreement")
    for suffix in (".csv", ".html", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0


def test_compare_and_merge_maps_leave_the_models_merging_as_it_was():
    from algm_viz import algm_state, apply_algm

    model = apply_algm(tiny_model(), local_threshold=0.7, global_threshold=0.8)
    config = algm_state(model).config
    compare(model, scene(), ["tome"], taus=[0.5], values={"tome": [2]}, repeats=1)
    merge_maps(model, scene(), [("tome", 2.0), ("cts", 0.5)])
    assert algm_state(model).config == config
