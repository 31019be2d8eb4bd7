"""The running state a patched ViT and its blocks share: the stages, and the token bookkeeping of one forward
(sizes, the attention key bias, the record). It runs stages; it knows nothing of their kinds."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..merging import Merge, forced_length
from ..timing import engine_range
from .record import MergeRecord
from .stages import ALGMConfig, MergeStage, PlanContext, SharePolicy

__all__ = ["ALGMState", "MASKED_BIAS"]

#: Additive attention bias of a padded key: finite in float16, bfloat16 and float32 alike, so that no mask turns a
#: row into NaN (``-inf - -inf``) and a kernel that casts the bias to the query's dtype (autocast runs SDPA in
#: float16) keeps it finite. A quarter of float16's lowest value (-16376, -16384 in bfloat16) leaves headroom:
#: added to a score or to a second such bias it stays above -65504, and ``exp`` of it is exactly 0 in every dtype,
#: so padded keys take no attention weight as long as real scores differ by less than 16 000.
MASKED_BIAS = torch.finfo(torch.float16).min / 4


class ALGMState:
    """Shared by a patched ViT and its blocks: the stages and the running token bookkeeping."""

    def __init__(
        self,
        stages: Sequence[MergeStage],
        num_prefix_tokens: int,
        *,
        prop_attn: bool = False,
        batch_min: bool = False,
        unmerge_output: bool = True,
        config: ALGMConfig | None = None,
        policy: SharePolicy | None = None,
    ) -> None:
        self.stages = tuple(stages)
        self.num_prefix_tokens = num_prefix_tokens
        self.prop_attn = prop_attn
        self.batch_min = batch_min
        self.unmerge_output = unmerge_output
        self.config = config
        self.policy = policy
        self.record: MergeRecord | None = None
        #: ``{stage name: output length}`` to force (FLOP measurement, :func:`~algm_viz.patch.lengths_forced`).
        self.forced_lengths: dict[str, int] | None = None
        self.size: Tensor | None = None  # [B, T, 1] patches per token (prefix included), None = all 1
        self.attn_bias: Tensor | None = None  # [B, 1, 1, T] additive attention bias, None = no bias
        self._images: Tensor | None = None
        self._patch_size: tuple[int, int] = (16, 16)

    def begin(self, grid: tuple[int, int], images: Tensor | None = None, patch_size: tuple[int, int] = (16, 16)) -> None:
        self.record = MergeRecord(grid=(int(grid[0]), int(grid[1])))
        self.size = None
        self.attn_bias = None
        self._images = images
        self._patch_size = patch_size

    def end(self) -> None:
        self._images = None

    def stages_at(self, layer: int, *, before_attention: bool = False, kv_only: bool = False) -> list[MergeStage]:
        return [
            s for s in self.stages
            if s.layer == layer and s.before_attention == before_attention and s.kv_only == kv_only
        ]

    def needs_keys(self, layer: int) -> bool:
        return any(s.layer == layer and s.metric == "keys" for s in self.stages)

    def plan(self, stage: MergeStage, metric: Tensor, size: Tensor | None) -> Merge:
        """The :class:`~algm_viz.merging.Merge` that ``stage`` makes of the patch tokens, from the whole
        sequence's matching metric ``metric`` ``[B, T, C]`` and sizes ``size`` ``[B, T, 1]`` (None = all 1)."""
        if stage.full_grid and self.record.stages:
            raise RuntimeError(f"{stage.name} needs the full patch grid: run it before any token-reducing stage")
        context = PlanContext(self.record.grid, self.num_prefix_tokens, self.batch_min, self._images,
                              self._patch_size, self.policy)
        merge = stage.plan(metric, size, context)
        if self.forced_lengths is not None and stage.name in self.forced_lengths:
            merge = forced_length(merge, self.forced_lengths[stage.name])
        return merge

    def merge_in_layer(self, layer: int, x: Tensor, keys: Tensor | None = None, *, before_attention: bool = False) -> Tensor:
        """Apply the token-reducing stages of 1-based ``layer`` to ``x`` ``[B, T, C]``.

        keys: ``[B, T, d]`` attention keys (mean over heads) for stages whose metric is ``"keys"``.
        """
        for stage in self.stages_at(layer, before_attention=before_attention):
            x = self._merge(stage, x, keys)
        return x

    def _merge(self, stage: MergeStage, x: Tensor, keys: Tensor | None) -> Tensor:
        prefix = self.num_prefix_tokens
        with engine_range(f"{stage.kind}_merge"):
            merge = self.plan(stage, x if stage.metric == "tokens" else keys, self.size)
            patch_size = None if self.size is None else self.size[:, prefix:]
            patches, patch_size = merge.merge(x[:, prefix:], patch_size)
            x = torch.cat([x[:, :prefix], patches], dim=1)
            self.size = torch.cat([patch_size.new_ones(x.shape[0], prefix, 1), patch_size], dim=1)
            self.attn_bias = self.key_bias(self.size, x.dtype)
        self.record.stages.append((stage.name, stage.layer, merge))
        return x

    def merge_keys_values(self, layer: int, tokens: Tensor, keys: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Key/value-only stages of ``layer``: merge ``k``, ``v`` ``[B, h, T, d]`` of the patch tokens.

        tokens: ``[B, T, C]`` the block's normalised input (metric ``"tokens"``); keys: ``[B, T, d]``.
        Returns merged ``k``, ``v`` ``[B, h, T', d]`` and their ``[B, 1, 1, T']`` key bias (log of the
        merged sizes, so attention over a merged key weighs it as the keys it stands for).
        """
        prefix, (batch, heads, _, dim) = self.num_prefix_tokens, k.shape
        size = self.size if self.size is not None else k.new_ones(batch, k.shape[2], 1)
        for stage in self.stages_at(layer, kv_only=True):
            with engine_range(f"{stage.kind}_kv_merge"):
                merge = self.plan(stage, tokens if stage.metric == "tokens" else keys, size)
                flat = torch.cat([k[:, :, prefix:], v[:, :, prefix:]], dim=1)  # [B, 2h, N, d]
                flat = flat.permute(0, 2, 1, 3).reshape(batch, -1, 2 * heads * dim)
                merged, patch_size = merge.merge(flat, size[:, prefix:])
                merged = merged.reshape(batch, -1, 2 * heads, dim).permute(0, 2, 1, 3)
                k = torch.cat([k[:, :, :prefix], merged[:, :heads]], dim=2)
                v = torch.cat([v[:, :, :prefix], merged[:, heads:]], dim=2)
                size = torch.cat([size[:, :prefix], patch_size], dim=1)
            self.record.kv_stages.append((stage.name, stage.layer, merge))
        bias = size[..., 0].clamp_min(1).log().masked_fill(size[..., 0] <= 0, MASKED_BIAS)
        return k, v, bias.to(k.dtype)[:, None, None, :]

    def key_bias(self, size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """``[B, 1, 1, T]`` additive key bias: ``log(size)`` if ``prop_attn``, :data:`MASKED_BIAS` on padding."""
        if size is None:
            return None
        size = size[..., 0]
        padded = size <= 0
        has_padding = bool(padded.any())
        if not (self.prop_attn or has_padding):
            return None
        bias = size.clamp_min(1).log() if self.prop_attn else torch.zeros_like(size)
        if has_padding:
            bias = bias.masked_fill(padded, MASKED_BIAS)
        return bias.to(dtype)[:, None, None, :]

    def unmerge(self, tokens: Tensor) -> Tensor:
        """``[B, prefix + N', C]`` -> ``[B, prefix + H*W, C]``."""
        final = self.record.final if self.record is not None else None
        if final is None:
            return tokens
        prefix = self.num_prefix_tokens
        with engine_range("unmerge"):
            return torch.cat([tokens[:, :prefix], final.unmerge(tokens[:, prefix:])], dim=1)
