"""Segmentation augmentations: per sample on numpy arrays (resize, random scale, crop with ignore padding,
flip, photometric jitter) and per batch on tensors (ClassMix).

Images are ``[H, W, 3]`` uint8 RGB and labels ``[H, W]`` uint8 with ignore = ``ignore_index``. Every
random choice is drawn from the generator passed in, so a seeded generator gives the same sample on any
machine and in any worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from ..datasets import IGNORE_INDEX
from ..evaluation.inference import resized_shape

__all__ = ["Augment", "resize_short_side", "random_scale", "random_crop", "random_flip", "photometric", "class_mix"]


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


def class_mix(images: Tensor, labels: Tensor, generator: torch.Generator, p: float = 0.5,
              num_classes: int | None = None, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """ClassMix (Olsson et al., WACV 2021) within a batch: each sample, with probability ``p``, receives the
    pixels of a random half of the classes of the next sample in the batch (image and label alike).

    Args:
        images: ``[B, C, H, W]`` (any dtype); labels: ``[B, H, W]`` long, ``ignore_index`` for void.
        generator: the source of every random choice.
        num_classes: K; None = ``labels.max() + 1`` over the non-void pixels.
    Returns:
        ``([B, C, H, W], [B, H, W])`` new tensors; void pixels of the partner are never pasted.
    """
    batch = labels.shape[0]
    if batch < 2 or p <= 0:
        return images, labels
    valid = labels != ignore_index
    k = num_classes if num_classes is not None else int(labels[valid].max()) + 1 if valid.any() else 1
    partner_images, partner_labels = images.roll(1, dims=0), labels.roll(1, dims=0)
    # a random half of the classes per sample (one extra, never chosen, column for void)
    chosen = torch.rand(batch, k, generator=generator) < 0.5
    chosen &= (torch.rand(batch, 1, generator=generator) < p)
    chosen = torch.cat([chosen, chosen.new_zeros(batch, 1)], dim=1).to(labels.device)
    index = torch.where(partner_labels == ignore_index, k, partner_labels.clamp(0, k - 1))
    paste = torch.gather(chosen, 1, index.flatten(1)).view_as(labels)
    mixed_images = torch.where(paste[:, None], partner_images, images)
    mixed_labels = torch.where(paste, partner_labels, labels)
    return mixed_images, mixed_labels
