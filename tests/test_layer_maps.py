"""Merge maps after any layer: composed stages on a hand-built record, and each method's groups per layer
against its own forward."""

import numpy as np
import pytest
import torch

from algm_viz.layer_maps import groups_after, layer_maps, layer_picture, representative_specs
from algm_viz.merging import Merge
from algm_viz.methods import METHODS
from algm_viz.models import create_segmenter
from algm_viz.patch import MergeRecord

from conftest import APP_TINY as TINY, tiny_registry


def merge(groups):
    groups = torch.tensor([groups])
    count = int(groups.max()) + 1
    return Merge(groups, torch.tensor([count]), count)


def test_groups_after_compose_the_stages_up_to_the_layer():
    record = MergeRecord((2, 2), stages=[("local", 1, merge([0, 0, 1, 2])), ("global", 3, merge([0, 1, 0]))])
    assert groups_after(record, 1).tolist() == [[0, 0], [1, 2]]
    assert groups_after(record, 2).tolist() == [[0, 0], [1, 2]]
    assert groups_after(record, 3).tolist() == [[0, 0], [1, 0]] == groups_after(record, 6).tolist()
    assert groups_after(MergeRecord((2, 2)), 4).tolist() == [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", **TINY).eval()


def test_each_method_after_each_layer(model):
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    maps = layer_maps(model, image, [("algm", 0.0), ("tome", 4)], short_side=48)
    assert maps.depth == 6 and maps.image.shape == (48, 80, 3)
    algm, tome = maps.groups
    assert algm.shape == tome.shape == (6, 6, 10)
    tokens = [[len(np.unique(g)) for g in groups] for groups in (algm, tome)]
    assert tokens[0][0] < 60 and tokens[0][0] == tokens[0][3] > tokens[0][4] == tokens[0][5]  # CLAP in 1, GBM in 5
    assert tokens[1] == [60 - 4 * layer for layer in range(1, 7)]  # ToMe: r fewer tokens in every layer
    picture = layer_picture(maps, 5)
    assert picture.shape == (28 + 48, 2 * 80, 3)
    with pytest.raises(ValueError, match="1..6"):
        layer_picture(maps, 7)
    with pytest.raises(ValueError):
        layer_maps(model, image, [])


def test_representative_specs_keep_the_chosen_values():
    specs = representative_specs(["algm", "tome", "pool2d"], [("tome", 8)])
    values = METHODS["algm"].values
    assert specs == [("tome", 8), ("algm", values[len(values) // 2]), ("pool2d", METHODS["pool2d"].values[1])]


def test_the_panel_redraws_from_its_cache(tmp_path):
    gr = pytest.importorskip("gradio")
    from PIL import Image

    from algm_viz.app.layer_maps import LayerMapsPanel
    from algm_viz.app.session import SessionCache
    from algm_viz.app.ui import Handlers
    registry = tiny_registry(48)
    handlers = Handlers(registry, SessionCache(max_side=128), thresholds=(0.6, 1.0), with_gflops=False)
    with gr.Blocks():
        panel = LayerMapsPanel(handlers, 6)
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    first = panel.show("untrained", str(path), None, ["algm", "tome", "pool2d"], "algm:0.9", "tome:8", 1)
    last = panel.show("untrained", str(path), None, ["algm", "tome", "pool2d"], "algm:0.9", "tome:8", 6)
    assert len(panel._maps) == 1  # one set of forwards for both layers
    shapes = {np.asarray(Image.open(p)).shape[:2] for p in (first, last)}
    assert len(shapes) == 1
    with pytest.raises(gr.Error, match="1..6"):
        panel.show("untrained", str(path), None, ["algm"], "algm:0.9", "tome:8", 9)
    with pytest.raises(gr.Error):
        panel.show("untrained", None, None, ["algm"], "algm:0.9", "tome:8", 1)
