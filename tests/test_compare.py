"""`algm-viz compare`: every method on one image, Pareto data and merge maps."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from algm_viz.cli import main
from algm_viz.evaluation.compare import MATCH, compare, merge_maps, parse_spec, resolve_specs
from algm_viz.evaluation.inference import prepare
from algm_viz.flops import count_gflops
from algm_viz.methods import apply_method
from algm_viz.models import create_segmenter
from algm_viz.patch import merging_restored

#: A matched map's GFLOPs lie within this fraction of the first map's (ToMe's r moves them in steps of ~1 %
#: on the test image).
MATCH_WITHIN = 0.02


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
    assert maps.shape == (64 + 46, 2 * 96, 3)  # two title lines
    left, right = maps[46:, :96], maps[46:, 96:]
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


def gflops(model: torch.nn.Module, image: np.ndarray, method: str, value: float) -> float:
    with merging_restored(model):
        apply_method(model, method, value)
        return count_gflops(model, prepare(model, image, None))


@pytest.mark.parametrize("first, method", [(("algm", 0.9), "tome"), (("tome", 8.0), "cts"), (("tome", 8.0), "grid")])
def test_a_matched_map_spends_the_first_maps_gflops(first, method):
    model, image = tiny_model(), scene(192, 288)
    assert parse_spec(f" {method}:match") == (method, MATCH)
    resolved = resolve_specs(model, image, [first, (method, MATCH)])
    assert resolved[0] == first and resolved[1][0] == method
    target, matched = gflops(model, image, *first), gflops(model, image, *resolved[1])
    assert abs(matched - target) <= MATCH_WITHIN * target, (resolved, matched, target)
    assert gflops(model, image, method, 0.0) - target > 0.1 * target  # at its knob's zero it spends far more


@pytest.mark.parametrize("spec, message", [("tome:matchx", "finite number"), ("tome:inf", "finite number"),
                                           ("pool2d:match", "not offered"), ("tome:", "finite number")])
def test_a_bad_spec_is_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_bad_maps_are_refused_before_any_forward(tmp_path, monkeypatch, caplog):
    import algm_viz.cli.compare as command

    monkeypatch.setattr(command, "load_model", lambda name: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):  # argparse: a spec that is no spec
        main(["compare", "--image", "x.png", "--maps", "algm:0.9", "tome:matchx"])
    assert main(["compare", "--image", "x.png", "--maps", "tome:match", "algm:0.9"]) == 2  # nothing to match
    assert "cannot be the first" in caplog.text
    model = tiny_model()
    model.forward = lambda *args: pytest.fail("a forward ran")
    with pytest.raises(ValueError, match="cannot be the first"):
        merge_maps(model, scene(), [("tome", MATCH), ("algm", 0.9)])


def test_compare_help_offers_match(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "METHOD:match" in help_text and "algm:0.9 tome:match" in help_text
