"""Segmentation augmentations on numpy arrays: resize, random scale, crop with ignore padding, flip,
photometric jitter.

Images are ``[H, W, 3]`` uint8 RGB and labels ``[H, W]`` uint8 with ignore = ``ignore_index``. Every
random choice is drawn from the ``numpy.random.Generator`` passed in, so a seeded generator gives the
same sample on any machine and in any worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..datasets import IGNORE_INDEX
from ..evaluation.inference import resized_shape

__all__ = ["Augment", "resize_short_side", "random_scale", "random_crop", "random_flip", "photometric"]


def resize_short_side(image: np.ndarray, label: np.ndarray | None, short_side: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so that ``min(H, W) == short_side`` (bilinear image, nearest label)."""
    height, width = image.shape[:2]
    new_height, new_width = resized_shape(height, width, short_side)
    size = (new_width, new_height)  # cv2 order
    if size == (width, height):
        return image, label
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = None if label is None else cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    return image, label


def random_scale(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Rescale both by one factor drawn uniformly from ``scale_range``."""
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
    scale = rng.uniform(low, high)
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int],
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``size = (h, w)`` at a random position; pad first (image 0, label ``ignore_index``) where smaller."""
    crop_h, crop_w = size
    height, width = image.shape[:2]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=ignore_index)
        height, width = image.shape[:2]
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return image[top : top + crop_h, left : left + crop_w], label[top : top + crop_h, left : left + crop_w]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip with probability ``p``."""
    if rng.random() < p:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def photometric(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.25,
    contrast: float = 0.25,
    saturation: float = 0.25,
    hue: float = 0.05,
) -> np.ndarray:
    """Colour jitter: brightness, contrast and saturation factors drawn from ``1 ± value``, a hue shift
    from ``± hue`` of a full turn. A value of 0 switches that part off."""
    out = image.astype(np.float32)
    if brightness:
        out *= rng.uniform(1 - brightness, 1 + brightness)
    if contrast:
        mean = out.mean()
        out = (out - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    out = np.clip(out, 0, 255).astype(np.uint8)
    if saturation or hue:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
        if hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue) * 256) % 256
        if saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - saturation, 1 + saturation), 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)
    return out


@dataclass(frozen=True)
class Augment:
    """The standard training pipeline: random scale -> crop (ignore padding) -> flip -> colour jitter.

    Attributes:
        crop_size: ``(h, w)`` of the output.
        scale_range: random rescale factors (relative to the stored, already resized image).
        flip_p: horizontal flip probability.
        jitter: brightness/contrast/saturation strength (hue uses a fifth of it); 0 = off.
    """

    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_p: float = 0.5
    jitter: float = 0.25
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``([H, W, 3]`` uint8, ``[H, W]`` uint8``)`` -> same types at ``crop_size``."""
        image, label = random_scale(image, label, rng, self.scale_range)
        image, label = random_crop(image, label, rng, self.crop_size, self.ignore_index)
        image, label = random_flip(image, label, rng, self.flip_p)
        if self.jitter:
            image = photometric(image, rng, self.jitter, self.jitter, self.jitter, self.jitter / 5)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)
