"""The app's comparison of token reducers on one image (issue 6)."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from algm_viz.app.ui import Handlers
from conftest import scene, tiny_registry, write


@pytest.fixture(scope="module")
def handlers():
    return Handlers(tiny_registry())


def test_compare_gives_two_pareto_plots_and_side_by_side_maps(handlers, tmp_path):
    image = write(tmp_path, "scene.png", scene())
    gflops, speed, maps = handlers.compare("untrained", image, None, ["algm", "pool2d", "cts"], "algm:0.5", "pool2d:2")
    names = {trace.name for trace in gflops.data}
    assert names == {"ALGM (CLAP + GBM)", "Segformer++ 2-D pooling", "CTS-style sharing (stand-in policy)", "baseline"}
    assert {trace.name for trace in speed.data} == names
    assert speed.layout.xaxis.title.text.startswith("throughput")
    assert gflops.layout.yaxis.title.text == "agreement with baseline (mIoU %)"
    picture = np.asarray(Image.open(maps))
    assert picture.shape[1] >= 2 * 64  # two panels side by side


@pytest.mark.parametrize(
    "methods, map_a, message",
    [([], "algm:0.9", "at least one method"), (["algm"], "magic:3", "METHOD:VALUE"), (["algm"], "tome:x", "METHOD:VALUE")],
)
def test_compare_refuses_bad_requests_clearly(handlers, tmp_path, methods, map_a, message):
    image = write(tmp_path, "scene.png", scene())
    with pytest.raises(gr.Error, match=message):
        handlers.compare("untrained", image, None, methods, map_a, "tome:8")


def test_the_maps_open_on_tome_at_algms_gflops(handlers, tmp_path):
    from algm_viz.app.layer_maps import LayerMapsPanel

    image = write(tmp_path, "scene.png", scene(96, 144))
    _, _, maps = handlers.compare("untrained", image, methods=["tome"])  # maps A, B: algm:0.9, tome:match
    height, width = np.asarray(Image.open(maps)).shape[:2]
    assert width * (64 + 46) == height * 2 * 96  # two 64×96 panels under two-line titles (enlarged for display)
    with gr.Blocks():
        panel = LayerMapsPanel(handlers, 6)
    after = panel.show("untrained", image, layer=6)  # the panel's opening methods and maps, B matched
    assert np.asarray(Image.open(after)).shape[1] == 6 * 96  # six methods (A and B among them) on the 64×96 input
    with pytest.raises(gr.Error, match="cannot be the first"):
        handlers.compare("untrained", image, None, ["tome"], "tome:match", "algm:0.9")
