"""The app's figures: the data-set curve on a ΔmIoU axis, plain method names, the per-image curves' marks."""

import pytest

from algm_viz.evaluation.rows import SweepRow
from algm_viz.plots import delta_figure, image_tau_figure, method_label


def _row(method, tau, miou, speed, gflops=1.0, tokens=None):
    return SweepRow(method=method, local_threshold=tau, global_threshold=tau, miou=miou, per_class_iou=[],
                    images_per_s=speed, gflops=gflops, tokens=tokens or {"patches": 100, "local": 80, "global": 50}).to_dict()


def test_delta_figure_plots_the_drop_against_the_baseline_with_plain_names():
    rows = [_row("baseline", None, 37.0, 10.0), _row("algm", 0.9, 36.0, 15.0), _row("algm", 0.8, 35.0, 20.0),
            _row("algm_prop", 0.9, 36.5, 14.0)]
    figure = delta_figure(rows, current=0.85)
    lines = {t.name: t for t in figure.data if t.showlegend is not False}
    assert "ALGM + proportional attention" in lines and "ALGM (CLAP + GBM)" in lines and "algm_prop" not in lines
    algm = lines["ALGM (CLAP + GBM)"]
    assert list(algm.x) == [0.8, 0.9] and list(algm.y) == pytest.approx([-2.0, -1.0]), "ΔmIoU, not mIoU"
    speed = next(t for t in figure.data if t.name == "ALGM (CLAP + GBM): speed-up")
    assert list(speed.y) == pytest.approx([2.0, 1.5])
    assert figure.layout.yaxis.title.text == "ΔmIoU (points)"
    assert not any(shape.label.text for shape in figure.layout.shapes), "no text written over the lines"
    assert not figure.layout.annotations
    with pytest.raises(ValueError, match="baseline"):
        delta_figure(rows[1:])


def test_image_tau_figure_marks_the_current_setting_in_each_curve():
    base = _row("baseline", None, 100.0, 10.0, gflops=2.0, tokens={"patches": 100, "local": 100, "global": 100})
    local = [base, {**_row("algm", 0.6, 80.0, 20.0, gflops=1.0), "global_threshold": 0.7},
             {**_row("algm", 0.9, 95.0, 15.0, gflops=1.5), "global_threshold": 0.7}]
    global_ = [base, {**_row("algm", 0.7, 95.0, 15.0, gflops=1.5), "local_threshold": 0.9},
               {**_row("algm", 1.0, 99.0, 12.0, gflops=1.8), "local_threshold": 0.9}]
    figure = image_tau_figure(local, global_, {"local": 0.9, "global": 0.7})
    stars = [t for t in figure.data if t.name == "current setting"]
    assert [(t.x[0], t.y[0]) for t in stars] == [(0.9, 95.0), (0.7, 95.0)]
    gflops = [t for t in figure.data if t.name == "GFLOPs (% of baseline)"]
    assert list(gflops[0].y) == pytest.approx([50.0, 75.0])
    assert "τ global = 0.700" in figure.layout.annotations[0].text


def test_method_label():
    assert method_label("algm_prop") == "ALGM + proportional attention"
    assert method_label("something_else") == "something_else"
