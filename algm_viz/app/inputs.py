"""Uploaded files in, arrays out: images and label maps read with clear errors, and the resize policy."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import PIL.Image

from ..preprocess import ImageError, to_rgb_uint8

__all__ = ["read_image_file", "read_label_file", "resize_for_model"]


def read_image_file(path: str | Path, max_pixels: int = 64_000_000) -> np.ndarray:
    """Any image file cv2 reads (8/16-bit, gray, RGB, RGBA) -> ``[H, W, 3]`` uint8 RGB.

    Raises :class:`ImageError` for files that are no image and for images over ``max_pixels``
    (checked from the header, before decoding).
    """
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None or data.size == 0:
        raise ImageError(f"{Path(path).name}: no such file or an empty file")
    try:
        with PIL.Image.open(path) as header:
            width, height = header.size
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        width = height = 0  # not for PIL to judge: cv2 decides below
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}×{height} pixels; at most {max_pixels // 1_000_000} megapixels are accepted")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{Path(path).name} is not an image this app can read (corrupt or unsupported format)")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return to_rgb_uint8(image)


def read_label_file(path: str | Path) -> np.ndarray:
    """A label-map image (class id per pixel, single channel or the first channel) -> ``[H, W]`` int64."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    if label is None:
        raise ImageError(f"{Path(path).name} is not a label map this app can read (use a PNG of class ids)")
    return (label if label.ndim == 2 else label[..., 0]).astype(np.int64)


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
