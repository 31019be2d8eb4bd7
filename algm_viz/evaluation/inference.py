"""Segmenter-style single-scale inference: resize the short side, normalise, predict at the original size.

Two modes (as in the official Segmenter code): the whole (resized) image in one forward, or a sliding
window of the training crop size. The sweep defaults to the whole image at the model's
``info.short_side`` when it states one, else at the image's own size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.description import describe
from ..patch import merging_disabled
from ..preprocess import normalize

__all__ = ["DTYPES", "autocast", "prepare", "prepare_labelled", "predict_logits", "predict_labels", "resize_matrix", "upsampled_argmax", "resized_argmax", "class_argmax", "sliding_window_logits",
           "default_short_side", "merging_disabled", "resized_shape"]

#: Command-line names of the precisions the tools run in.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Float elements of one tile of upsampled logits in :func:`upsampled_argmax` (16 M = 64 MB in fp32).
TILE_ELEMENTS = 1 << 24


def default_short_side(model: nn.Module) -> int | None:
    """The short side ``model`` was trained at (``model.info.short_side``), or None."""
    return describe(model).short_side


def resized_shape(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """``(h, w)`` with the short side scaled to ``short_side`` (aspect kept); unchanged for None."""
    if short_side is None:
        return height, width
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> ContextManager:
    """Mixed precision on ``device`` in ``dtype`` (``torch.float16``/``torch.bfloat16``); float32 or None: off.
    The merge arithmetic accumulates in float32 either way (:mod:`algm_viz.merging`)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def prepare(model: nn.Module, image: np.ndarray, short_side: int | None = None, device: torch.device | str = "cpu") -> Tensor:
    """``[H, W, 3]`` uint8 image -> ``[1, 3, h, w]`` float on ``device``, normalised with ``model.mean_std``
    and (bilinearly) resized so that its short side is ``short_side`` (None: not resized)."""
    mean, std = model.mean_std
    tensor = normalize(image, mean, std, device)
    size = resized_shape(*tensor.shape[-2:], short_side)
    if size != tuple(tensor.shape[-2:]):
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return tensor


def prepare_labelled(model: nn.Module, image: np.ndarray, label: np.ndarray | None, short_side: int | None,
                     device: torch.device | str, what: str) -> tuple[Tensor, Tensor]:
    """:func:`prepare` for an image with its label map ``[H, W]``: ``([1, 3, h, w], [1, h, w] long)``, the label
    map resized to the model input by nearest neighbour; ``ValueError`` naming ``what`` when it is missing."""
    if label is None:
        raise ValueError(f"{what} needs label maps")
    x = prepare(model, image, short_side, device)
    height, width = x.shape[-2:]
    label = cv2.resize(np.asarray(label, dtype=np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return x, torch.from_numpy(label).long().to(x.device)[None]


def _anchors(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, plus one flush with the end (official Segmenter)."""
    if length <= window:
        return [0]
    return [a for a in range(0, length - window, stride)] + [length - window]


def sliding_window_logits(model: nn.Module, images: Tensor, window: int, stride: int | None = None, batch_size: int = 4) -> Tensor:
    """Segmenter's sliding-window inference on ``[1, 3, H, W]`` normalised images -> ``[1, K, H, W]``.

    Windows are ``window``×``window`` (clamped to the image where it is smaller), ``stride`` apart
    (default ``window``), the last one flush with the border; overlapping logits are averaged.
    Windows run ``batch_size`` at a time.
    """
    if images.shape[0] != 1:
        raise ValueError(f"sliding-window inference takes one image at a time, got a batch of {images.shape[0]}")
    if window <= 0 or (stride is not None and stride <= 0) or batch_size <= 0:
        raise ValueError(f"window, stride and batch_size must be positive, got {window}, {stride}, {batch_size}")
    stride = stride or window
    height, width = images.shape[-2:]
    wh, ww = min(window, height), min(window, width)
    boxes = [(top, left) for top in _anchors(height, wh, stride) for left in _anchors(width, ww, stride)]
    crops = torch.cat([images[..., t : t + wh, l : l + ww] for t, l in boxes])
    logits = torch.cat([model(chunk) for chunk in crops.split(batch_size)])
    total = logits.new_zeros(1, logits.shape[1], height, width)
    count = logits.new_zeros(1, 1, height, width)
    for (top, left), crop_logits in zip(boxes, logits):
        total[..., top : top + wh, left : left + ww] += crop_logits
        count[..., top : top + wh, left : left + ww] += 1
    return total / count


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    image: np.ndarray,
    *,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Class logits ``[K, H, W]`` (float32) at the original resolution of ``image`` (``[H, W, 3]`` uint8).

    The image is resized to ``short_side`` (None: kept), run whole (``window`` None) or with a sliding
    window, in ``dtype`` autocast (None: float32), and the logits are resized back bilinearly.
    """
    height, width = np.asarray(image).shape[:2]
    x = prepare(model, image, short_side, device)
    with autocast(x.device, dtype):
        logits = (model(x) if window is None else sliding_window_logits(model, x, window, stride)).float()
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits[0]


def resize_matrix(length_in: int, length_out: int, device: torch.device | str = "cpu") -> Tensor:
    """``[length_out, length_in]``: the linear map of a 1-D bilinear resize (``align_corners=False``), read
    off ``F.interpolate`` itself so that its coordinates and edge clamping are torch's own."""
    basis = torch.eye(length_in, device=device).reshape(1, length_in, length_in, 1)
    return F.interpolate(basis, size=(length_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T


def _taps(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``[out, in]`` matrix with few nonzeros a row -> ``(index, weight)`` ``[n, out]``: each row's nonzero
    columns in ascending order and their weights, ``n`` the most in any row (shorter rows padded with their first
    column and weight 0, so that a tap never reaches outside the row's band)."""
    nonzero = matrix != 0
    count = max(1, int(nonzero.sum(1).max()))
    index = torch.argsort((~nonzero).to(torch.uint8), dim=1, stable=True)[:, :count]
    weight = matrix.gather(1, index)
    index = torch.where(weight != 0, index, index[:, :1])
    return index.T.contiguous(), weight.T.contiguous()


def upsampled_argmax(logits: Tensor, rows: Tensor, cols: Tensor, tile_elements: int = TILE_ELEMENTS) -> Tensor:
    """Class ids ``[*, H, W]`` of ``rows @ logits @ cols.T`` per class, without the ``[*, K, H, W]`` tensor.

    ``logits`` ``[*, K, h, w]`` (any leading batch dimensions); ``rows`` ``[H, h]`` and ``cols`` ``[W, w]`` are
    (compositions of) :func:`resize_matrix` and crops, so the product is a separable bilinear resize and each
    row of a matrix has a few nonzeros: they are applied as taps (gathers), width first as ``F.interpolate``
    does, at the cost of the resize itself. Output rows are done a tile at a time, each tile (and the band of
    input rows it reads, resized to width ``W``) about ``tile_elements`` floats.
    """
    logits = logits.float()
    height, width = rows.shape[0], cols.shape[0]
    row_index, row_weight = _taps(rows)
    col_index, col_weight = _taps(cols)
    per_row = logits[..., :1, :1].numel() * width  # floats of one output row: [*, K, 1, W]
    tile = max(1, tile_elements // (per_row * max(1, math.ceil(logits.shape[-2] / height))))
    labels = torch.empty(*logits.shape[:-3], height, width, dtype=torch.long, device=logits.device)
    for start in range(0, height, tile):
        index, weight = row_index[:, start : start + tile], row_weight[:, start : start + tile]
        low, high = int(index.min()), int(index.max()) + 1
        band = _apply_taps(logits[..., low:high, :], col_index, col_weight, -1)  # [*, K, band, W]
        labels[..., start : start + tile, :] = class_argmax(_apply_taps(band, index - low, weight[..., None], -2))
    return labels


def class_argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-3)`` for ``[*, K, H, W]`` (the first maximum on ties) as a running maximum over the K
    classes: on the CPU about 5× faster than an arg-max across the strided class dimension. NaN scores are never
    chosen (``argmax`` would choose them)."""
    best = logits[..., 0, :, :].clone()
    index = torch.zeros(best.shape, dtype=torch.long, device=logits.device)
    for k in range(1, logits.shape[-3]):
        scores = logits[..., k, :, :]
        index.masked_fill_(scores > best, k)
        torch.maximum(best, scores, out=best)
    return index


def _apply_taps(x: Tensor, index: Tensor, weight: Tensor, dim: int) -> Tensor:
    """``sum_j weight[j] * x.index_select(dim, index[j])``: ``index`` ``[n, out]``, ``weight`` ``[n, out]``
    (``[n, out, 1]`` for ``dim=-2``) broadcast against ``x``'s trailing dimensions."""
    out = x.index_select(dim, index[0]) * weight[0]
    for tap_index, tap_weight in zip(index[1:], weight[1:]):
        out.addcmul_(x.index_select(dim, tap_index), tap_weight)
    return out


def resized_argmax(logits: Tensor, size: tuple[int, int], tile_elements: int = TILE_ELEMENTS) -> Tensor:
    """Class ids ``[*, H, W]`` of ``F.interpolate(logits, size, mode="bilinear").argmax(-3)`` for ``logits``
    ``[*, K, h, w]`` and ``size = (H, W)``, without the ``[*, K, H, W]`` resized logits (:func:`upsampled_argmax`)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return class_argmax(logits)
    rows, cols = (resize_matrix(n, m, logits.device) for n, m in zip(logits.shape[-2:], size))
    return upsampled_argmax(logits, rows, cols, tile_elements)


def _crop_matrix(length_in: int, length_out: int, device: torch.device | str) -> Tensor:
    """``[length_out, length_in]``: keep the first ``length_out`` entries."""
    return torch.eye(length_in, device=device)[:length_out]


@torch.inference_mode()
def predict_labels(
    model: nn.Module,
    image: np.ndarray,
    *,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Class ids ``[H, W]`` (long) of ``predict_logits(...).argmax(0)``, with the same arguments, but never
    holding the full-resolution ``[K, H, W]`` logits: the model's token-grid logits are resized (to the
    padded input, cropped, back to the image, as :func:`predict_logits` does) and arg-maxed in tiles.
    Models without ``decoder_logits`` and the sliding window take the logits path."""
    height, width = np.asarray(image).shape[:2]
    if window is not None or not hasattr(model, "decoder_logits"):
        return predict_logits(model, image, short_side=short_side, window=window, stride=stride, device=device,
                              dtype=dtype).argmax(0)
    x = prepare(model, image, short_side, device)
    with autocast(x.device, dtype):
        masks = model.decoder_logits(x)[0].float()  # [K, h/p, w/p]
    axes = []
    for grid, size, full in zip(masks.shape[-2:], x.shape[-2:], (height, width)):
        padded = size + (-size % model.patch_size)
        to_input = _crop_matrix(padded, size, x.device) @ resize_matrix(grid, padded, x.device)
        axes.append(resize_matrix(size, full, x.device) @ to_input)
    return upsampled_argmax(masks, *axes)
