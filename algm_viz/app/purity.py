"""Merge purity and error attribution of one image and setting, from the session's cached forwards.

Classes come from the uploaded label map, else from the baseline prediction (a stand-in, said so in the
readout). See :mod:`algm_viz.evaluation.purity` for the definitions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import render
from ..datasets import IGNORE_INDEX
from ..evaluation.purity import attribution_counts, mixed_groups, purity_counts, stage_merges, summarize
from ..evaluation.tokens import patch_class_counts, token_classes
from ..patch import group_map
from .inspector import STAGE_LABELS
from .session import ImageSession, Settings

__all__ = ["purity", "purity_markdown"]


def purity(session: ImageSession, settings: Settings) -> tuple[np.ndarray, dict[str, Any]]:
    """-> (``[H, W, 3]`` uint8 map of the final groups, mixed ones in red, pure merged ones in green;
    the summary of :func:`~algm_viz.evaluation.purity.summarize` plus ``classes_from``)."""
    entry, image, p = session.entry, session.image, session.entry.patch_size
    base, algm = session.baseline(), session.algm(settings)
    record = algm.capture.record
    from_label = session.label is not None
    classes = session.label if from_label else base.prediction
    device = record.stages[0][2].groups.device
    labels = torch.from_numpy(np.asarray(classes, dtype=np.int64))[None].to(device)
    counts = patch_class_counts(labels, p, entry.model.num_classes, IGNORE_INDEX)
    merges = stage_merges(record)
    final = merges[record.stages[-1][0]]
    mixed = mixed_groups(token_classes(counts), final, entry.model.num_classes)
    changed = torch.from_numpy(base.prediction != algm.prediction)[None].to(device)
    summary = summarize(purity_counts(counts, merges), attribution_counts(changed, mixed, record.grid, p),
                        entry.class_names)
    summary["classes_from"] = "label map" if from_label else "baseline prediction: no label map uploaded"
    groups = group_map(record, final)
    merged = np.bincount(groups.ravel())[groups] > 1
    picture = render.purity_overlay(image, merged, mixed[0].cpu().numpy().reshape(record.grid), groups, p)
    return picture, summary


def _percent(share: float | None) -> str:
    return "–" if share is None or share != share else f"{100 * share:.1f} %"


def purity_markdown(summary: dict[str, Any]) -> str:
    """The purity readout as a few lines of Markdown."""
    stages = []
    for name, stage in summary["stages"].items():
        stages.append(f"{STAGE_LABELS.get(name, name)}: {stage['mixed_groups']} of {stage['merged_groups']} merged groups "
                      f"mix classes ({_percent(stage['mixed_group_share'])}; {_percent(stage['mixed_patch_share'])} of "
                      f"the patches inside merged groups)")
    last = list(summary["stages"].values())[-1]
    names = summary.get("class_names") or [str(c) for c in range(len(last["class_mixed_share"]))]
    per_class = sorted(((share, names[c]) for c, share in enumerate(last["class_mixed_share"]) if share is not None),
                       reverse=True)
    changes = summary["attribution"]
    lines = [
        f"**Merge purity** (classes from the {summary['classes_from']}): " + " · ".join(stages),
        "**Mixed share per class** (patches of the class in merged groups that lie in mixed ones): "
        + (", ".join(f"{name} {_percent(share)}" for share, name in per_class) or "no merged patches"),
        f"**Error attribution**: {changes['changed']} pixels changed under merging; "
        f"{_percent(changes['changed_in_mixed_share'])} of them lie in mixed groups, which cover "
        f"{_percent(changes['pixels_in_mixed_share'])} of the image.",
    ]
    return "\n\n".join(lines)
