"""Token bookkeeping shared by the analyses: which class each (merged) token depicts, and (from the merge
record, :func:`~algm_viz.patch.merge_before_layer`) which patches -> tokens merge holds before a given layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..datasets import IGNORE_INDEX
from ..merging import Merge
from ..patch import merge_before_layer

__all__ = ["patch_class_counts", "token_class_counts", "token_classes", "merge_before_layer"]


def patch_class_counts(labels: Tensor, patch_size: int, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixels of each class per patch.

    Args:
        labels: ``[B, H, W]`` pixel classes (``ignore_index`` skipped); padded with ignore at the
            right/bottom to a multiple of ``patch_size``, as the model pads the image.
    Returns:
        ``[B, N, K]`` long, ``N = ceil(H/p) * ceil(W/p)`` in raster order.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    height, width = labels.shape[-2:]
    labels = F.pad(labels.long(), (0, -width % patch_size, 0, -height % patch_size), value=ignore_index)
    batch, height, width = labels.shape
    valid = labels != ignore_index
    if bool((labels[valid] >= num_classes).any()) or bool((labels[valid] < 0).any()):
        raise ValueError(f"labels have values outside 0..{num_classes - 1} (ignore index {ignore_index})")
    grid_w = width // patch_size
    rows = torch.arange(height, device=labels.device) // patch_size
    cols = torch.arange(width, device=labels.device) // patch_size
    patch = (rows[:, None] * grid_w + cols[None, :]).expand(batch, -1, -1)
    num_patches = (height // patch_size) * grid_w
    image = torch.arange(batch, device=labels.device)[:, None, None].expand_as(labels)
    index = (image * num_patches + patch) * num_classes + labels
    counts = torch.bincount(index[valid], minlength=batch * num_patches * num_classes)
    return counts.view(batch, num_patches, num_classes)


def token_class_counts(patch_counts: Tensor, merge: Merge | None) -> Tensor:
    """``[B, N, K]`` per-patch class counts -> ``[B, N', K]`` per token (summed over each token's patches)."""
    if merge is None:
        return patch_counts
    batch, _, num_classes = patch_counts.shape
    out = patch_counts.new_zeros(batch, merge.num_out + 1, num_classes)
    out.scatter_add_(1, merge.groups[..., None].expand(-1, -1, num_classes), patch_counts)
    return out[:, : merge.num_out]


def token_classes(class_counts: Tensor) -> Tensor:
    """``[B, T, K]`` counts -> ``[B, T]`` majority class, -1 for tokens without labelled pixels."""
    return torch.where(class_counts.sum(-1) > 0, class_counts.argmax(-1), torch.full_like(class_counts[..., 0], -1))
