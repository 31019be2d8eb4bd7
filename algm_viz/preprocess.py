"""Images in, model inputs out: validation, resizing and normalisation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_rgb_uint8", "normalize", "ImageError"]


class ImageError(ValueError):
    """An input that cannot be used as an image, with the reason."""


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D numeric array (gray, gray+alpha, RGB, RGBA; 8/16-bit or float in [0, 1]) -> ``[H, W, 3]`` uint8."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) == 0:
        raise ImageError(f"expected an H×W, H×W×3 or H×W×4 image, got shape {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("image has NaN or infinite values")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        array = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"unsupported pixel type {array.dtype}")
    channels = array.shape[2]
    if channels in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> Tensor:
    """``[H, W, 3]`` uint8 -> ``[1, 3, H, W]`` float, ``(x / 255 - mean) / std``."""
    tensor = torch.from_numpy(to_rgb_uint8(image)).to(device).permute(2, 0, 1)[None].float().div_(255)
    mean_t = torch.tensor(mean, device=tensor.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=tensor.device).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t
