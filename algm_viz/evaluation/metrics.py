"""Segmentation quality from a confusion matrix: mIoU and per-class IoU (ignore index respected), and a
paired bootstrap over images of the difference in pooled mIoU between two methods."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..datasets import IGNORE_INDEX

__all__ = ["confusion_matrix", "confusion_matrices", "miou", "miou_batch", "bootstrap_weights",
           "paired_bootstrap"]


def _valid_pairs(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened ``(target, pred, position)`` of the non-ignored pixels, checked to lie in ``0..K-1``."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long().to(target.device)
    position = torch.nonzero(target != ignore_index).squeeze(1)
    target, pred = target[position], pred[position]
    for name, values in (("target", target), ("prediction", pred)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{name} has values outside 0..{num_classes - 1} (ignore index {ignore_index})")
    return target, pred, position


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
    target, pred, _ = _valid_pairs(pred, target, num_classes, ignore_index)
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_matrices(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """One confusion matrix per image: ``pred``/``target`` ``[B, ...]`` -> ``[B, K, K]`` long (rows = target);
    ``.sum(0)`` is :func:`confusion_matrix` of the whole batch. Same checks as :func:`confusion_matrix`."""
    if target.ndim < 1:
        raise ValueError("per-image confusion matrices need a leading batch dimension")
    batch, cells = target.shape[0], num_classes * num_classes
    target_v, pred_v, position = _valid_pairs(pred, target, num_classes, ignore_index)
    image = position // max(target[0].numel(), 1)
    counts = torch.bincount(image * cells + target_v * num_classes + pred_v, minlength=batch * cells)
    return counts.view(batch, num_classes, num_classes)


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


def miou_batch(confusions: Tensor) -> Tensor:
    """:func:`miou` of each of ``[R, K, K]`` confusion matrices -> ``[R]`` float64 mIoU in % (NaN where no
    class occurs); classes absent from both target and prediction of a matrix are left out of its mean."""
    if confusions.ndim != 3 or confusions.shape[-1] != confusions.shape[-2]:
        raise ValueError(f"confusion matrices must be [R, K, K], got {tuple(confusions.shape)}")
    confusions = confusions.double()
    hits = confusions.diagonal(dim1=-2, dim2=-1)
    union = confusions.sum(-2) + confusions.sum(-1) - hits
    present = union > 0
    iou = torch.where(present, 100 * hits / union.clamp_min(1), torch.zeros_like(hits))
    return iou.sum(-1) / present.sum(-1)  # 0 / 0 = NaN where no class occurs


def bootstrap_weights(num_images: int, resamples: int, seed: int) -> Tensor:
    """``[R, N]`` how often each of ``N`` images is drawn in each of ``R`` resamples of ``N`` images with
    replacement (seeded, so that every method is resampled with the same draws)."""
    if num_images <= 0 or resamples <= 0:
        raise ValueError(f"need at least one image and one resample, got {num_images} and {resamples}")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(num_images, (resamples, num_images), generator=generator)
    weights = torch.zeros(resamples, num_images, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(weights))


def paired_bootstrap(reference: Tensor, other: Tensor, resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                     chunk: int = 250) -> dict[str, float | list[float]]:
    """Paired bootstrap over images of the pooled-mIoU difference ``other - reference``.

    Args:
        reference, other: ``[N, K, K]`` per-image confusion matrices of the same ``N`` images.
        resamples: bootstrap resamples ``R``; seed: seeds the draws (the same for every call with the same
            ``N``, so rows of one sweep share their resamples); confidence: level of the percentile interval.
        chunk: resamples pooled at a time (bounds memory at ``chunk * K * K``).
    Returns:
        ``{"delta": point difference (% points), "delta_ci": [low, high], "ci": [low, high] of other's mIoU,
        "resamples": R}``. Each resample pools the drawn images' matrices before taking the mIoU, so the
        interval is of the pooled mIoU, not of a mean of per-image mIoUs.
    """
    if reference.shape != other.shape or reference.ndim != 3:
        raise ValueError(f"need two [N, K, K] stacks of the same shape, got {tuple(reference.shape)} and {tuple(other.shape)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    num_images, k = reference.shape[0], reference.shape[-1]
    weights = bootstrap_weights(num_images, resamples, seed)
    flat_ref, flat_other = (c.reshape(num_images, k * k).double().cpu() for c in (reference, other))
    deltas, values = [], []
    for part in weights.split(chunk):
        ref_miou = miou_batch((part @ flat_ref).view(-1, k, k))
        other_miou = miou_batch((part @ flat_other).view(-1, k, k))
        deltas.append(other_miou - ref_miou)
        values.append(other_miou)
    tail = (1 - confidence) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)

    def interval(samples: Tensor) -> list[float]:
        return [float(v) for v in torch.nanquantile(samples, quantiles)]

    point = float(miou_batch(other.sum(0, keepdim=True))[0] - miou_batch(reference.sum(0, keepdim=True))[0])
    return {"delta": point, "delta_ci": interval(torch.cat(deltas)), "ci": interval(torch.cat(values)),
            "resamples": resamples}
