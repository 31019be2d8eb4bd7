"""The merge record: what one forward merged, per image, and the composition of its stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from ..merging import Merge

__all__ = ["MergeRecord", "compose", "group_map", "merge_before_layer"]


def compose(merges: Iterable[Merge]) -> Merge | None:
    """Patches -> tokens of ``merges`` run in order (each on the previous one's outputs); None for none."""
    total = None
    for merge in merges:
        total = merge if total is None else total.then(merge)
    return total


@dataclass
class MergeRecord:
    """What one forward merged, per image, for visualization and statistics.

    Attributes:
        grid: ``(H, W)`` patch grid.
        stages: ``(name, layer, merge)`` of the token-reducing stages, in order: the first acts on the
            ``H*W`` patches, each later one on the previous one's outputs.
        kv_stages: ``(name, layer, merge)`` of key/value-only merges (the tokens they act on are the
            ones present at that layer).
        restored: True when the encoder already unmerged its output (a decoder must not unmerge again).
    """

    grid: tuple[int, int]
    stages: list[tuple[str, int, Merge]] = field(default_factory=list)
    kv_stages: list[tuple[str, int, Merge]] = field(default_factory=list)
    restored: bool = False

    def stage(self, name: str) -> Merge | None:
        return next((m for n, _, m in self.stages if n == name), None)

    @property
    def final(self) -> Merge | None:
        """Patches -> final tokens, all stages composed (None when nothing ran)."""
        return compose(merge for _, _, merge in self.stages)

    def thresholds(self) -> dict[str, Tensor]:
        """``{"<stage>": [B] fp32}``: the similarity threshold each image was merged with, for the stages
        a threshold decides (CLAP, GBM; the official online rule sets one per image)."""
        return {name: merge.threshold.cpu() for name, _, merge in self.stages if merge.threshold is not None}

    def token_counts(self) -> dict[str, Tensor]:
        """``{"patches": [B], "<stage>": [B], ...}`` real tokens per image after each stage."""
        batch = self.stages[0][2].counts.shape[0] if self.stages else 0
        counts = {"patches": torch.full((batch,), self.grid[0] * self.grid[1], dtype=torch.long)}
        counts.update({name: merge.counts.cpu() for name, _, merge in self.stages})
        return counts


def merge_before_layer(record: MergeRecord | None, layer: int) -> Merge | None:
    """Patches -> tokens as block ``layer`` (1-based) sees them: the stages of earlier blocks composed
    (None when no merge ran before ``layer``)."""
    stages = record.stages if record is not None else ()
    return compose(merge for _, stage_layer, merge in stages if stage_layer < layer)


def group_map(record: MergeRecord, merge: Merge | None, image: int = 0) -> np.ndarray:
    """``[gh, gw]`` int64 on the record's patch grid: the token each patch of image ``image`` is in after
    ``merge`` (patches -> tokens, e.g. ``record.final`` or ``record.stage("local")``); every patch its own
    token for None (nothing merged)."""
    if merge is None:
        return np.arange(record.grid[0] * record.grid[1]).reshape(record.grid)
    return merge.groups[image].cpu().numpy().reshape(record.grid)
