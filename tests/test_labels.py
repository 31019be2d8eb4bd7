"""The label-only prediction path equals arg-max of the full-resolution logits, without holding them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import algm_viz
from algm_viz.evaluation.inference import class_argmax, predict_labels, predict_logits, resize_matrix, upsampled_argmax
from algm_viz.models import create_segmenter


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=7, depth=3, embed_dim=64, num_heads=2, image_size=64).eval()


@pytest.mark.parametrize("length_in,length_out", [(5, 5), (4, 13), (13, 4), (1, 6), (22, 360)])
def test_resize_matrix_is_torchs_bilinear_resize(length_in, length_out):
    signal = torch.randn(3, length_in)
    expected = F.interpolate(signal[None, :, :, None], size=(length_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0]
    assert torch.allclose(signal @ resize_matrix(length_in, length_out).T, expected, atol=1e-6)


def test_tiles_do_not_change_the_answer():
    torch.manual_seed(1)
    logits, rows, cols = torch.randn(4, 6, 9), resize_matrix(6, 37), resize_matrix(9, 50)
    full = torch.einsum("ry,kyx,Xx->krX", rows, logits, cols).argmax(0)
    for tile_elements in (1, 4 * 50 * 3, 1 << 20):  # one row a tile, three rows, everything at once
        assert torch.equal(upsampled_argmax(logits, rows, cols, tile_elements), full)


@pytest.mark.parametrize("shape,short_side", [((50, 77), 40), ((64, 64), None), ((33, 100), 70), ((90, 31), 48)])
@pytest.mark.parametrize("tau", [None, 0.5])
def test_labels_equal_argmax_of_logits(model, shape, short_side, tau):
    algm_viz.remove_algm(model)
    if tau is not None:
        algm_viz.apply_algm(model, local_layer=1, global_layer=2, local_threshold=tau, global_threshold=tau)
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    logits = predict_logits(model, image, short_side=short_side)
    labels = predict_labels(model, image, short_side=short_side)
    assert labels.shape == shape and labels.dtype == torch.long
    top2 = logits.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > 1e-4  # away from exact ties, the answers are the same
    assert torch.equal(labels[decided], logits.argmax(0)[decided])
    assert decided.float().mean() > 0.99
    algm_viz.remove_algm(model)


def test_sliding_window_falls_back_to_the_logits_path(model):
    image = np.random.default_rng(3).integers(0, 256, (40, 96, 3), dtype=np.uint8)
    expected = predict_logits(model, image, window=32, stride=16).argmax(0)
    assert torch.equal(predict_labels(model, image, window=32, stride=16), expected)


@pytest.mark.parametrize("shape", [(11, 7, 9), (2, 5, 3, 4), (1, 1, 6, 6)])
def test_class_argmax_is_argmax_with_its_ties(shape):
    logits = torch.randn(*shape)
    assert torch.equal(class_argmax(logits), logits.argmax(-3))
    tied = logits.round()  # many equal maxima: the first one wins, as in argmax
    assert torch.equal(class_argmax(tied), tied.argmax(-3))
