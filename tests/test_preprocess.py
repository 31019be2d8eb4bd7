"""Turning arbitrary arrays into model inputs; checking label maps against a model's classes."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from algm_viz.preprocess import ImageError, check_label, normalize, to_rgb_uint8


@pytest.mark.parametrize(
    "array, expected_pixel",
    [
        (np.full((4, 5), 7, np.uint8), (7, 7, 7)),  # grayscale
        (np.dstack([np.full((4, 5), 9, np.uint8), np.zeros((4, 5), np.uint8)]), (9, 9, 9)),  # gray + alpha
        (np.dstack([np.full((4, 5, 3), 200, np.uint8), np.zeros((4, 5), np.uint8)]), (200, 200, 200)),  # RGBA
        (np.full((4, 5, 3), 65535, np.uint16), (255, 255, 255)),  # 16-bit
        (np.full((4, 5, 3), 0.5, np.float32), (128, 128, 128)),  # float in [0, 1]
        (np.full((4, 5, 3), 300, np.int32), (255, 255, 255)),  # out-of-range integers clip
    ],
)
def test_images_become_rgb_uint8(array, expected_pixel):
    rgb = to_rgb_uint8(array)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == expected_pixel


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 5, 3), np.uint8), "expected"),
        (np.zeros((4, 5, 7), np.uint8), "expected"),
        (np.zeros((2, 3, 4, 5), np.uint8), "expected"),
        (np.full((4, 5, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 5, 3), np.complex64), "unsupported"),
    ],
)
def test_non_images_are_rejected(array, message):
    with pytest.raises(ImageError, match=message):
        to_rgb_uint8(array)


def test_normalize_uses_mean_and_std():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255
    tensor = normalize(image, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tensor.shape == (1, 3, 2, 3)
    assert torch.allclose(tensor[0, 0], torch.ones(2, 3)) and torch.allclose(tensor[0, 1], -torch.ones(2, 3))


@pytest.mark.parametrize("dtype, ignore, expected", [(np.uint8, 255, np.uint8), (np.uint16, 255, np.uint16),
                                                     (np.int32, 255, np.int32), (np.uint8, -1, np.int16)])
def test_checked_label_keeps_a_compact_type(dtype, ignore, expected):
    label = np.array([[0, 3, 4, 7], [1, 2, 200, 4]], dtype)
    cleaned, note = check_label(label, 5, ignore)
    assert cleaned.dtype == expected
    assert cleaned.tolist() == [[0, 3, 4, ignore], [1, 2, ignore, 4]]
    assert "25.0 %" in note and "values 7, 200" in note


def test_checking_a_label_map_costs_a_few_bytes_a_pixel():
    """A map at the pixel limit is a few hundred KB on disk; int64 copies of it took 1 GB at 64 MP."""
    label = np.random.default_rng(0).integers(0, 5, (1500, 2000), dtype=np.uint8)
    label[:15] = 9  # 1 % of the pixels outside the model's classes
    tracemalloc.start()
    try:
        cleaned, note = check_label(label, 5, 255)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert note and "1.0 %" in note and (cleaned[:15] == 255).all() and np.array_equal(cleaned[15:], label[15:])
    assert peak < 4 * label.size, f"{peak / label.size:.1f} bytes per pixel"
