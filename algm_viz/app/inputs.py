"""Uploaded files in, arrays out: images and label maps read with clear errors, and the resize policy."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..preprocess import MAX_PIXELS, ImageError, read_image, read_label

__all__ = ["read_image_file", "read_label_file", "resize_for_model"]


def read_image_file(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An uploaded image -> ``[H, W, 3]`` uint8 RGB, upright (see :func:`algm_viz.preprocess.read_image`).

    Raises :class:`ImageError` for files that are no image and for images over ``max_pixels``
    (checked from the header, before decoding).
    """
    return read_image(path, max_pixels)


def read_label_file(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An uploaded label map (class id per pixel: gray, palette or 16-bit PNG) -> ``[H, W]`` class ids as
    stored (uint8 or uint16; :func:`algm_viz.preprocess.check_label` then reports values outside the model).

    Raises :class:`ImageError` as :func:`algm_viz.preprocess.read_label` does (the pixel limit is
    checked from the header, before decoding).
    """
    return read_label(path, max_pixels)


def resize_for_model(image: np.ndarray, short_side: int, max_side: int, min_side: int) -> np.ndarray:
    """Resize ``[H, W, C]`` so its short side is ``short_side``, its long side at most ``max_side``.

    Raises :class:`ImageError` for images whose short side is under ``min_side`` (one patch).
    """
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(f"the image is {width}×{height} pixels; it needs at least {min_side} pixels on each side (one patch)")
    scale = min(short_side / min(height, width), max_side / max(height, width))
    size = (max(min_side, round(width * scale)), max(min_side, round(height * scale)))
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
