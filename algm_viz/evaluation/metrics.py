"""Segmentation quality from a confusion matrix: mIoU and per-class IoU (ignore index respected)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..datasets import IGNORE_INDEX

__all__ = ["confusion_matrix", "miou", "pixel_accuracy"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Count (target, prediction) pairs.

    Args:
        pred: predicted class per pixel, any shape, values ``0..num_classes-1``.
        target: ground-truth class per pixel, same shape; ``ignore_index`` pixels are skipped.
    Returns:
        ``[K, K]`` long on ``target``'s device; rows = target class, columns = predicted class.
    Raises:
        ValueError: shapes differ, or a (non-ignored) value is outside ``0..K-1``.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long().to(target.device)
    valid = target != ignore_index
    target, pred = target[valid], pred[valid]
    for name, values in (("target", target), ("prediction", pred)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{name} has values outside 0..{num_classes - 1} (ignore index {ignore_index})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou(confusion: Tensor) -> tuple[float, Tensor]:
    """Mean intersection-over-union from a ``[K, K]`` confusion matrix (rows = target).

    Returns:
        ``(mIoU in %, per-class IoU [K] in %)``. The mean is over classes that occur in the target or
        the prediction; the IoU of a class that occurs in neither is NaN (and mIoU is NaN when no
        class occurs).
    """
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square [K, K], got {tuple(confusion.shape)}")
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, 100 * hits / union.clamp_min(1), torch.full_like(hits, math.nan))
    present = union > 0
    mean = float(iou[present].mean()) if bool(present.any()) else math.nan
    return mean, iou


def pixel_accuracy(confusion: Tensor) -> float:
    """Share of labelled pixels classified correctly, in % (NaN without labelled pixels)."""
    total = int(confusion.sum())
    return 100 * float(confusion.diagonal().sum()) / total if total else math.nan
