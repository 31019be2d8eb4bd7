"""Tokens and GFLOPs per encoder layer."""

import pytest
import torch

import algm_viz
from algm_viz.evaluation.flow import layer_flow
from algm_viz.flops import count_gflops
from algm_viz.methods import apply_method
from algm_viz.models import create_segmenter


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=5, depth=6, embed_dim=64, num_heads=2, decoder="linear",
                            patch_size=8, image_size=64).eval()


def test_baseline_layers_are_equal_and_sum_below_the_whole_forward(model):
    images = torch.randn(1, 3, 64, 96)
    flow = layer_flow(model, images)
    assert flow["attention_tokens"] == flow["mlp_tokens"] == [1 + 96] * 6
    assert max(flow["gflops"]) == pytest.approx(min(flow["gflops"]))
    assert 0 < sum(flow["gflops"]) < count_gflops(model, images)  # patch embedding and decoder are outside the layers
    # one layer by hand: qkv + proj + MLP (C → 4C → C) on T tokens, and QKᵀ, AV (T² C each), in multiply-adds
    tokens, channels = 97, 64
    expected = (4 * tokens * channels ** 2 + 2 * tokens * channels * 4 * channels + 2 * tokens ** 2 * channels) / 1e9
    assert flow["gflops"][0] == pytest.approx(expected, rel=1e-6)


def test_algm_steps_and_tome_declines(model):
    images = torch.randn(1, 3, 64, 96)
    algm_viz.apply_algm(model, 1, 3, (2, 2), -2.0, -2.0)  # merge every window, then every GBM source
    flow = layer_flow(model, images)
    record = algm_viz.algm_state(model).record
    local, final = int(record.stage("local").counts[0]), int(record.final.counts[0])
    assert flow["attention_tokens"] == [97, 1 + local, 1 + local, 1 + final, 1 + final, 1 + final]
    assert flow["mlp_tokens"] == [1 + local, 1 + local, 1 + final, 1 + final, 1 + final, 1 + final]
    assert flow["gflops"][0] > flow["gflops"][1] > flow["gflops"][3] == pytest.approx(flow["gflops"][5])
    apply_method(model, "tome", 8)
    flow = layer_flow(model, images)
    assert flow["mlp_tokens"] == [97 - 8 * layer for layer in range(1, 7)], "ToMe merges r tokens in every layer"
    algm_viz.remove_algm(model)


def test_app_flow_compares_baseline_algm_and_tome():
    import numpy as np

    from algm_viz.app.flow import flow, flow_figure
    from algm_viz.app.models import ModelRegistry
    from algm_viz.app.session import ImageSession, Settings

    tiny = dict(num_classes=5, depth=6, embed_dim=64, num_heads=2, decoder="linear", patch_size=8, image_size=64)
    registry = ModelRegistry(device="cpu", default_short_side=64, untrained=tiny, include_bundled=False)
    entry = registry.get(registry.default_key())
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, 48:] = 200
    session = ImageSession(entry, image)
    result = flow(session, Settings(0.5, 0.5, 2, 3))
    assert algm_viz.algm_state(entry.model) is None, "the model is left as it was"
    final = result["algm"]["mlp_tokens"][-1]
    tome, r = result["tome"]["mlp_tokens"], result["tome_r"]
    assert r == round((97 - final) / 6) > 0 and tome[0] == 97 - r, "r per layer, chosen from ALGM's final tokens"
    assert all(a >= b for a, b in zip(tome, tome[1:])) and tome[-1] >= 97 - 6 * r  # a layer merges at most half
    assert sum(result["algm"]["gflops"]) < sum(result["baseline"]["gflops"])
    assert len(flow_figure(result).data) == 6
