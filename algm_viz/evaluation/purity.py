"""Merge purity and error attribution: do merged tokens share a class, and do merging's errors come from
the groups that mix classes?

A patch's class is the majority of its labelled pixels (ground truth, or a prediction used as a stand-in);
patches without labelled pixels take part in no count. A **merged group** is a group of two or more
patches after a stage (CLAP: its merged windows; GBM: the final groups, CLAP's merges included); it is
**mixed** when its labelled patches hold more than one class. Per stage and per class, the counts say
how many merged groups and how many patches inside merged groups are mixed. **Error attribution**: of
the pixels whose prediction changed under merging, the share that lies in patches of mixed final groups,
beside the share of all pixels that lies there (the rate at which changes would fall there by chance).

Counts are sums, so they add over images (:func:`add_counts`); :func:`summarize` turns them into shares.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..datasets import IGNORE_INDEX
from ..merging import Merge
from ..patch import MergeRecord, algm_state, apply_algm, find_vit, merging_restored, remove_algm
from .inference import class_argmax, prepare_labelled
from .tokens import patch_class_counts, token_classes

__all__ = ["stage_merges", "mixed_groups", "purity_counts", "attribution_counts", "add_counts", "summarize",
           "purity_analysis"]


def stage_merges(record: MergeRecord) -> dict[str, Merge]:
    """``{stage name: patches -> groups after that stage}`` (the stages composed up to each one)."""
    merges, total = {}, None
    for name, _, merge in record.stages:
        total = merge if total is None else total.then(merge)
        merges[name] = total
    return merges


def _group_class_counts(classes: Tensor, merge: Merge, num_classes: int) -> tuple[Tensor, Tensor]:
    """``([B, G]`` patches per group, ``[B, G, K]`` labelled patches per group and class``)``; slot ``G - 1``
    collects padding."""
    batch, _ = classes.shape
    slots = merge.num_out + 1
    groups = merge.groups
    sizes = torch.zeros(batch, slots, dtype=torch.long, device=classes.device).scatter_add_(1, groups, torch.ones_like(groups))
    labelled = classes >= 0
    onehot = F.one_hot(classes.clamp_min(0), num_classes).long() * labelled[..., None]  # [B, N, K]
    per_class = torch.zeros(batch, slots, num_classes, dtype=torch.long, device=classes.device)
    per_class.scatter_add_(1, groups[..., None].expand(-1, -1, num_classes), onehot)
    sizes[:, -1] = 0  # padding
    return sizes, per_class


def mixed_groups(classes: Tensor, merge: Merge, num_classes: int) -> Tensor:
    """``[B, N]`` bool: patches whose group (two or more patches) holds labelled patches of several classes.

    classes: ``[B, N]`` patch classes, -1 for unlabelled patches."""
    sizes, per_class = _group_class_counts(classes, merge, num_classes)
    mixed = (sizes > 1) & ((per_class > 0).sum(-1) > 1)  # [B, G]
    return mixed.gather(1, merge.groups)


def purity_counts(patch_counts: Tensor, merges: dict[str, Merge]) -> dict[str, dict[str, Any]]:
    """Per stage, the counts of merged and mixed groups and of the labelled patches inside them.

    Args:
        patch_counts: ``[B, N, K]`` labelled pixels of each class per patch
            (:func:`~algm_viz.evaluation.tokens.patch_class_counts`).
        merges: ``{stage: patches -> groups}`` (:func:`stage_merges`).
    Returns:
        ``{stage: {"merged_groups", "mixed_groups", "patches_merged", "patches_mixed": int,
        "class_merged", "class_mixed": [K] list}}``: groups of two or more patches, those that mix classes,
        labelled patches inside them, and per class the labelled patches inside merged and mixed groups.
    """
    num_classes = patch_counts.shape[-1]
    classes = token_classes(patch_counts)  # [B, N]
    labelled = classes >= 0
    counts = {}
    for name, merge in merges.items():
        sizes, per_class = _group_class_counts(classes, merge, num_classes)
        merged = sizes > 1
        mixed = merged & ((per_class > 0).sum(-1) > 1)
        in_merged = merged.gather(1, merge.groups) & labelled  # [B, N]
        in_mixed = mixed.gather(1, merge.groups) & labelled
        onehot = F.one_hot(classes.clamp_min(0), num_classes).long()
        counts[name] = {
            "merged_groups": int(merged.sum()),
            "mixed_groups": int(mixed.sum()),
            "patches_merged": int(in_merged.sum()),
            "patches_mixed": int(in_mixed.sum()),
            "class_merged": (onehot * in_merged[..., None]).sum((0, 1)).tolist(),
            "class_mixed": (onehot * in_mixed[..., None]).sum((0, 1)).tolist(),
        }
    return counts


def attribution_counts(changed: Tensor, mixed: Tensor, grid: tuple[int, int], patch_size: int) -> dict[str, int]:
    """How many of the changed pixels lie in patches of mixed groups.

    Args:
        changed: ``[B, H, W]`` bool, pixels whose predicted class changed under merging.
        mixed: ``[B, N]`` bool, patches in mixed groups (:func:`mixed_groups`), raster order on ``grid``,
            which covers the image padded to a multiple of ``patch_size``.
    Returns:
        ``{"changed", "changed_in_mixed", "pixels", "pixels_in_mixed"}``.
    """
    batch, height, width = changed.shape
    mixed_grid = mixed.reshape(batch, *grid)
    pixel_mixed = mixed_grid.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, :height, :width]
    return {
        "changed": int(changed.sum()),
        "changed_in_mixed": int((changed & pixel_mixed).sum()),
        "pixels": int(changed.numel()),
        "pixels_in_mixed": int(pixel_mixed.sum()),
    }


def add_counts(total: dict[str, Any] | None, counts: dict[str, Any]) -> dict[str, Any]:
    """Element-wise sum of two nested count dicts of the same layout (``total`` None: ``counts``)."""
    if total is None:
        return counts
    out = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            out[key] = add_counts(total[key], value)
        elif isinstance(value, list):
            out[key] = [a + b for a, b in zip(total[key], value)]
        else:
            out[key] = total[key] + value
    return out


def _share(part: float, whole: float) -> float:
    return part / whole if whole else math.nan


def summarize(purity: dict[str, dict[str, Any]], attribution: dict[str, int] | None = None,
              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Shares from the counts: per stage the share of merged groups that mix classes, of patches inside
    merged groups that lie in mixed ones (overall and per class, None where a class has no merged patch),
    and, with ``attribution``, the share of changed pixels inside mixed groups beside the share of all pixels."""
    stages = {}
    for name, c in purity.items():
        per_class = [None if merged == 0 else mixed / merged for merged, mixed in zip(c["class_merged"], c["class_mixed"])]
        stages[name] = {
            **c,
            "mixed_group_share": _share(c["mixed_groups"], c["merged_groups"]),
            "mixed_patch_share": _share(c["patches_mixed"], c["patches_merged"]),
            "class_mixed_share": per_class,
        }
    out: dict[str, Any] = {"stages": stages}
    if class_names is not None:
        out["class_names"] = list(class_names)
    if attribution is not None:
        out["attribution"] = {
            **attribution,
            "changed_in_mixed_share": _share(attribution["changed_in_mixed"], attribution["changed"]),
            "pixels_in_mixed_share": _share(attribution["pixels_in_mixed"], attribution["pixels"]),
        }
    return out


@torch.inference_mode()
def purity_analysis(
    model: nn.Module,
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    taus: Sequence[float],
    *,
    local_layer: int = 1,
    global_layer: int = 5,
    window: tuple[int, int] = (2, 2),
    short_side: int | None = None,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Merge purity (against the label maps) and error attribution (changes against the unmerged
    prediction) of ALGM at each τ (both stages) over ``samples`` (``[H, W, 3]`` uint8 image, ``[H, W]``
    label), images resized to ``short_side`` and labels with them (nearest).

    Returns ``{"images", "rows": [{"tau", "tokens": {stage: mean per image}, **summarize(...)}]}``; the
    model is left as it was.
    """
    taus = [float(t) for t in taus]
    if not taus:
        raise ValueError("give at least one τ")
    patch = int(find_vit(model).patch_embed.patch_size[0])
    totals: list[dict[str, Any] | None] = [None] * len(taus)
    count = 0
    with merging_restored(model):
        for image, label in tqdm(samples, total=total, desc="purity", disable=not progress or None):
            x, labels = prepare_labelled(model, image, label, short_side, device, "merge purity")
            patch_counts = patch_class_counts(labels, patch, num_classes, ignore_index)
            remove_algm(model)
            baseline = class_argmax(model(x))
            for index, tau in enumerate(taus):
                apply_algm(model, local_layer, global_layer, window, tau, tau)
                merged = class_argmax(model(x))
                record = algm_state(model).record
                merges = stage_merges(record)
                final = merges[record.stages[-1][0]]
                mixed = mixed_groups(token_classes(patch_counts), final, num_classes)
                counts = {
                    "purity": purity_counts(patch_counts, merges),
                    "attribution": attribution_counts(baseline != merged, mixed, record.grid, patch),
                    "tokens": {name: int(value.sum()) for name, value in record.token_counts().items()},
                }
                totals[index] = add_counts(totals[index], counts)
            count += 1
    if count == 0:
        raise ValueError("no samples to analyse")
    rows = [{"tau": tau, "tokens": {name: value / count for name, value in total["tokens"].items()},
             **summarize(total["purity"], total["attribution"], class_names)} for tau, total in zip(taus, totals)]
    return {"images": count, "local_layer": local_layer, "global_layer": global_layer, "window": list(window), "rows": rows}
