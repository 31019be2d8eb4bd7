"""Turning arbitrary arrays into model inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algm_viz.preprocess import ImageError, normalize, to_rgb_uint8


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
