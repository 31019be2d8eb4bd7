"""Model surgery: put token merging into a timm plain ViT (or a model that holds one) and take it out.

``apply_merging`` swaps the ``__class__`` of the ViT and of its blocks for subclasses that share one
:class:`ALGMState`, which runs a list of :class:`MergeStage` s: ALGM's CLAP and GBM, and the other
reducers the comparison needs (ToMe, Segformer++'s pooling, grid matching and key/value merging,
CTS-style sharing), all on the same :class:`~algm_viz.merging.Merge` objects and the same record.
``apply_algm`` is the paper's configuration: CLAP in block ``local_layer`` and GBM in block
``global_layer`` (1-based, as in the paper), between attention and MLP, on the tokens after the
attention residual. Prefix tokens (class/register tokens) are never merged. After a forward,
``state.record`` says what was merged, per image.

Two modes (``mode=``): ``"paper"`` (the default) follows the paper's text; ``"official"`` follows the
official ALGM code where it differs: ``>=`` comparisons, CLAP's output order, GBM's A/B partition over
the whole sequence (class token included) and, by default, GBM's online threshold
(``global_threshold="official"``, :data:`~algm_viz.merging.ONLINE`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend, project_qkv
from .merging import (
    ONLINE,
    Merge,
    alternate_destinations,
    bipartite_merge,
    budget_window_merge,
    global_merge,
    grid_destinations,
    local_merge,
    official_global_merge,
    window_index,
)

__all__ = [
    "MODES",
    "ONLINE",
    "ALGMConfig",
    "ALGMState",
    "MergeRecord",
    "MergeStage",
    "SharePolicy",
    "algm_state",
    "apply_algm",
    "apply_merging",
    "colour_homogeneity_policy",
    "default_thresholds",
    "find_vit",
    "merging_restored",
    "remove_algm",
    "set_thresholds",
]

# τ defaults of the authors' code (CLAP with 2×2 windows), keyed by ViT width: Ti, S, B, L.
AUTHOR_DEFAULT_THRESHOLDS = {192: 0.90, 384: 0.88, 768: 0.94, 1024: 0.95}

STAGE_KINDS = ("clap", "gbm", "tome", "pool2d", "grid", "share", "cluster")
#: ``"paper"``: as the paper describes ALGM; ``"official"``: as the official ALGM code runs it.
MODES = ("paper", "official")
_GRID_KINDS = ("clap", "pool2d", "grid", "share", "cluster")  # need the full patch grid

#: ``planner(tokens [B, N, C], grid, size [B, N, 1] | None) -> Merge``: a ``"cluster"`` stage's merge.
ClusterPlanner = Callable[[Tensor, tuple[int, int], Optional[Tensor]], Merge]

#: ``policy(images [B, 3, H, W], grid, window, patch_size) -> [B, S]`` scores, one per full window.
SharePolicy = Callable[[Tensor, tuple[int, int], tuple[int, int], tuple[int, int]], Tensor]


def _number(value: object, name: str) -> float:
    """``value`` as a float; a clear error for None, NaN and anything else that is not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number):
        raise ValueError(f"{name} a number, not NaN (τ >= 1 merges nothing), got {value!r}")
    return number


def _pair(value: tuple[int, int] | int, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be two positive ints, got {value}")
    return pair


@dataclass(frozen=True)
class MergeStage:
    """One merge step, run in block ``layer`` (1-based) between attention and MLP.

    ``kind``:
        ``"clap"``   windows whose mean similarity is above ``threshold`` (ALGM's local merging);
        ``"gbm"``    A = even, B = odd, edges above ``threshold`` (ALGM's global merging);
        ``"tome"``   A = even, B = odd, the ``r`` best edges (ToMe);
        ``"pool2d"`` every full ``window`` averaged (Segformer++'s 2-D neighbour merging);
        ``"grid"``   destinations on a ``stride`` grid, ``ratio`` of the sources merged (Segformer++);
        ``"share"``  before the block's attention, the ``budget`` fraction of ``window`` s that a
                     policy scores best share one token (CTS-style token sharing);
        ``"cluster"`` whatever ``planner`` makes of the patch grid (Expedite, AiluRus:
                     :mod:`algm_viz.clustering`). A merge with ``restore_in_encoder = True`` is
                     unmerged at the encoder output, before any decoder (the record says ``restored``).
    ``metric``: ``"tokens"`` (the block's tokens after the attention residual) or ``"keys"`` (the
    attention keys, mean over heads, as ToMe). ``kv_only``: merge only this block's keys and values
    (queries and the token count are kept; Segformer++'s key/value merging). ``mode`` (``clap`` and
    ``gbm``): ``"official"`` runs them as the official ALGM code does (:data:`MODES`); a ``gbm``
    threshold of :data:`ONLINE` is then its online rule.
    """

    kind: str
    layer: int
    threshold: Optional[float | str] = None
    r: Optional[int] = None
    ratio: Optional[float] = None
    budget: Optional[float] = None
    window: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    metric: str = "tokens"
    kv_only: bool = False
    name: str = ""
    planner: Optional[ClusterPlanner] = None
    mode: str = "paper"

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {self.kind!r}; use one of {', '.join(STAGE_KINDS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "official" and self.kind not in ("clap", "gbm"):
            raise ValueError(f"mode 'official' applies to clap and gbm stages, not {self.kind}")
        if self.metric not in ("tokens", "keys"):
            raise ValueError(f"metric must be 'tokens' or 'keys', got {self.metric!r}")
        object.__setattr__(self, "window", _pair(self.window, "window"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        if self.kind == "gbm" and self.threshold == ONLINE:
            if self.mode != "official":
                raise ValueError(f"the online threshold {ONLINE!r} is the official code's: use mode='official'")
        elif self.kind in ("clap", "gbm"):
            object.__setattr__(self, "threshold", _number(self.threshold, f"{self.kind} needs a threshold:"))
        if self.kind == "tome" and (self.r is None or self.r < 0):
            raise ValueError("tome needs r >= 0")
        for key in ("ratio", "budget"):
            value = getattr(self, key)
            needed = (self.kind, key) in (("grid", "ratio"), ("share", "budget"))
            if needed and (value is None or not 0.0 <= float(value) <= 1.0):
                raise ValueError(f"{self.kind} needs {key} in [0, 1], got {value}")
        if (self.kind == "cluster") != (self.planner is not None):
            raise ValueError("a cluster stage needs a planner, and only a cluster stage takes one")
        if self.kv_only and self.kind not in ("tome", "grid", "pool2d"):
            raise ValueError("kv_only applies to tome, grid and pool2d stages")
        if not self.name:
            object.__setattr__(self, "name", f"{self.kind}{self.layer}")


@dataclass(frozen=True)
class ALGMConfig:
    """The paper's configuration. A layer of None switches that stage off.

    ``global_threshold`` is a τ or :data:`ONLINE` (the official code's online rule). ``mode`` is one of
    :data:`MODES`, or None: ``"official"`` when ``global_threshold`` is :data:`ONLINE`, else ``"paper"``.
    """

    local_layer: Optional[int] = 1
    global_layer: Optional[int] = 5
    window: tuple[int, int] = (2, 2)
    local_threshold: float = 0.9
    global_threshold: float | str = 0.9
    prop_attn: bool = False
    batch_min: bool = False
    mode: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_threshold", _number(self.local_threshold, "local_threshold must be"))
        if self.global_threshold != ONLINE:
            object.__setattr__(self, "global_threshold", _number(self.global_threshold, "global_threshold must be"))
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "paper" and self.global_threshold == ONLINE:
            raise ValueError(f"the online threshold {ONLINE!r} is the official code's: use mode='official'")
        object.__setattr__(self, "window", _pair(self.window, "window"))
        if self.local_layer is not None and self.global_layer is not None and self.global_layer < self.local_layer:
            raise ValueError("global_layer must not come before local_layer (CLAP needs the full grid)")

    @property
    def resolved_mode(self) -> str:
        """``"paper"`` or ``"official"`` (a ``mode`` of None follows ``global_threshold``)."""
        if self.mode is not None:
            return self.mode
        return "official" if self.global_threshold == ONLINE else "paper"

    def stages(self) -> list[MergeStage]:
        stages, mode = [], self.resolved_mode
        if self.local_layer is not None:
            stages.append(MergeStage("clap", self.local_layer, threshold=self.local_threshold, window=self.window,
                                     name="local", mode=mode))
        if self.global_layer is not None:
            stages.append(MergeStage("gbm", self.global_layer, threshold=self.global_threshold, name="global", mode=mode))
        return stages


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
        total = None
        for _, _, merge in self.stages:
            total = merge if total is None else total.then(merge)
        return total

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


def colour_homogeneity_policy(images: Tensor, grid: tuple[int, int], window: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """A training-free stand-in for CTS's learned policy: the negative colour variance of each
    superpatch (``window`` patches), so the most uniform superpatches share a token first.

    images: ``[B, 3, H, W]``; returns ``[B, S]`` in :func:`~algm_viz.merging.window_index` order.
    """
    (gh, gw), (kh, kw), (ph, pw) = grid, window, patch_size
    kernel = (kh * ph, kw * pw)
    region = images[..., : (gh // kh) * kernel[0], : (gw // kw) * kernel[1]].float()
    mean = F.avg_pool2d(region, kernel)
    variance = (F.avg_pool2d(region * region, kernel) - mean * mean).mean(1)  # [B, gh//kh, gw//kw]
    return -variance.flatten(1)


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
        policy: SharePolicy = colour_homogeneity_policy,
    ) -> None:
        self.stages = tuple(stages)
        self.num_prefix_tokens = num_prefix_tokens
        self.prop_attn = prop_attn
        self.batch_min = batch_min
        self.unmerge_output = unmerge_output
        self.config = config
        self.policy = policy
        self.record: MergeRecord | None = None
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
            if s.layer == layer and (s.kind == "share") == before_attention and s.kv_only == kv_only
        ]

    def needs_keys(self, layer: int) -> bool:
        return any(s.layer == layer and s.metric == "keys" for s in self.stages)

    def plan(self, stage: MergeStage, metric: Tensor, size: Tensor | None) -> Merge:
        """The :class:`Merge` that ``stage`` makes of patch tokens whose matching metric is ``metric``
        ``[B, N, C]`` and whose sizes are ``size`` ``[B, N, 1]`` (None = all 1)."""
        if stage.kind in _GRID_KINDS and self.record.stages:
            raise RuntimeError(f"{stage.name} needs the full patch grid: run it before any token-reducing stage")
        grid = self.record.grid
        if stage.kind == "clap":
            return local_merge(metric, grid, stage.window, stage.threshold, batch_min=self.batch_min,
                               official=stage.mode == "official")
        if stage.kind == "pool2d":
            return local_merge(metric, grid, stage.window, float("-inf"))
        if stage.kind == "cluster":
            return stage.planner(metric, grid, size)
        if stage.kind == "gbm":
            return global_merge(metric, stage.threshold, size, batch_min=self.batch_min)
        if stage.kind == "tome":
            return bipartite_merge(metric, alternate_destinations(metric.shape[1], metric.device), r=stage.r, size=size)
        if stage.kind == "grid":
            destinations = grid_destinations(grid, stage.stride, metric.device)
            r = round(stage.ratio * int((~destinations).sum()))
            return bipartite_merge(metric, destinations, r=r, size=size)
        if self._images is None:
            raise RuntimeError("token sharing needs the input images")
        scores = self.policy(self._images, grid, stage.window, self._patch_size)
        windows = window_index(grid, stage.window, scores.device).shape[0]
        return budget_window_merge(scores, grid, stage.window, round(stage.budget * windows))

    def merge_in_layer(self, layer: int, x: Tensor, keys: Tensor | None = None, *, before_attention: bool = False) -> Tensor:
        """Apply the token-reducing stages of 1-based ``layer`` to ``x`` ``[B, T, C]``.

        keys: ``[B, T, d]`` attention keys (mean over heads) for stages whose metric is ``"keys"``.
        """
        for stage in self.stages_at(layer, before_attention=before_attention):
            x = self._merge(stage, x, keys)
        return x

    def _merge(self, stage: MergeStage, x: Tensor, keys: Tensor | None) -> Tensor:
        prefix = self.num_prefix_tokens
        patches = x[:, prefix:]
        patch_size = None if self.size is None else self.size[:, prefix:]
        sequence_metric = x if stage.metric == "tokens" else keys
        with torch.profiler.record_function(f"algm.{stage.kind}_merge"):
            if stage.kind == "gbm" and stage.mode == "official":  # partitions the whole sequence
                merge = official_global_merge(sequence_metric, stage.threshold, self.size, num_prefix=prefix,
                                              layer=stage.layer, batch_min=self.batch_min)
            else:
                merge = self.plan(stage, sequence_metric[:, prefix:], patch_size)
            patches, patch_size = merge.merge(patches, patch_size)
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
            metric = (tokens if stage.metric == "tokens" else keys)[:, prefix:]
            with torch.profiler.record_function(f"algm.{stage.kind}_kv_merge"):
                merge = self.plan(stage, metric, size[:, prefix:])
                flat = torch.cat([k[:, :, prefix:], v[:, :, prefix:]], dim=1)  # [B, 2h, N, d]
                flat = flat.permute(0, 2, 1, 3).reshape(batch, -1, 2 * heads * dim)
                merged, patch_size = merge.merge(flat, size[:, prefix:])
                merged = merged.reshape(batch, -1, 2 * heads, dim).permute(0, 2, 1, 3)
                k = torch.cat([k[:, :, :prefix], merged[:, :heads]], dim=2)
                v = torch.cat([v[:, :, :prefix], merged[:, heads:]], dim=2)
                size = torch.cat([size[:, :prefix], patch_size], dim=1)
            self.record.kv_stages.append((stage.name, stage.layer, merge))
        bias = size[..., 0].clamp_min(1).log().masked_fill(size[..., 0] <= 0, float("-inf"))
        return k, v, bias.to(k.dtype)[:, None, None, :]

    def key_bias(self, size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """``[B, 1, 1, T]`` additive key bias: ``log(size)`` if ``prop_attn``, ``-inf`` on padding."""
        if size is None:
            return None
        size = size[..., 0]
        padded = size <= 0
        has_padding = bool(padded.any())
        if not (self.prop_attn or has_padding):
            return None
        bias = size.clamp_min(1).log() if self.prop_attn else torch.zeros_like(size)
        if has_padding:
            bias = bias.masked_fill(padded, float("-inf"))
        return bias.to(dtype)[:, None, None, :]

    def unmerge(self, tokens: Tensor) -> Tensor:
        """``[B, prefix + N', C]`` -> ``[B, prefix + H*W, C]``."""
        final = self.record.final if self.record is not None else None
        if final is None:
            return tokens
        prefix = self.num_prefix_tokens
        with torch.profiler.record_function("algm.unmerge"):
            return torch.cat([tokens[:, :prefix], final.unmerge(tokens[:, prefix:])], dim=1)


def _attention_with_keys(attn: nn.Module, x: Tensor, bias: Tensor | None, state: ALGMState, layer: int) -> tuple[Tensor, Tensor]:
    """A timm ``Attention`` forward that also returns the keys (mean over heads, ``[B, T, d]``) and
    applies the layer's key/value-only merges. x: ``[B, T, C]`` (normalised block input)."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = project_qkv(attn, x)
    keys = k.mean(1)
    if state.stages_at(layer, kv_only=True):
        # The merged keys' bias (log size, -inf on padding) replaces the token-level one.
        k, v, bias = state.merge_keys_values(layer, x, keys, k, v)
    out = attn.norm(attend(attn, q, k, v, bias).transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), keys


class ALGMBlock(nn.Module):
    """Mixin for a timm ``Block``: (token sharing), attention, merging, MLP."""

    _algm_state: ALGMState
    _algm_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        state, layer = self._algm_state, self._algm_layer
        x = state.merge_in_layer(layer, x, before_attention=True)
        bias = state.attn_bias
        if attn_mask is not None:
            bias = attn_mask if bias is None else bias + attn_mask
        keys = None
        if state.needs_keys(layer) or state.stages_at(layer, kv_only=True):
            attended, keys = _attention_with_keys(self.attn, self.norm1(x), bias, state, layer)
        else:
            attended = self.attn(self.norm1(x), attn_mask=bias, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(attended))
        x = state.merge_in_layer(layer, x, keys)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ALGMVisionTransformer(nn.Module):
    """Mixin for a timm ``VisionTransformer``: resets the state per forward, unmerges on request."""

    _algm_state: ALGMState

    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        state = self._algm_state
        state.begin(self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])), x, tuple(self.patch_embed.patch_size))
        try:
            tokens = super().forward_features(x, *args, **kwargs)
        finally:
            state.end()
        final = state.record.final
        if final is None or not (state.unmerge_output or getattr(final, "restore_in_encoder", False)):
            return tokens
        state.record.restored = True
        return state.unmerge(tokens)


_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_subclasses: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    base = module.__class__
    key = (mixin, base)
    if key not in _subclasses:
        _subclasses[key] = type(f"ALGM{base.__name__}", (mixin, base), {"_algm_base": base})
    module.__class__ = _subclasses[key]


def find_vit(model: nn.Module) -> nn.Module:
    """The plain ViT inside ``model``: ``model`` itself, or its ``encoder``."""
    for candidate in (model, getattr(model, "encoder", None)):
        if candidate is not None and hasattr(candidate, "blocks") and hasattr(candidate, "patch_embed"):
            return candidate
    raise TypeError(f"{type(model).__name__} is not a timm plain ViT and has no plain-ViT `encoder`")


def algm_state(model: nn.Module) -> ALGMState | None:
    """The merging state of ``model`` (or of its encoder), None if no merging is applied."""
    try:
        return getattr(find_vit(model), "_algm_state", None)
    except TypeError:
        return None


def apply_merging(
    model: nn.Module,
    stages: Sequence[MergeStage],
    *,
    prop_attn: bool = False,
    batch_min: bool = False,
    policy: SharePolicy = colour_homogeneity_policy,
    config: ALGMConfig | None = None,
) -> nn.Module:
    """Patch ``model`` (a timm ``VisionTransformer`` or a model with one as ``encoder``) in place to
    run ``stages``. Applying again replaces them. Returns ``model``."""
    vit = find_vit(model)
    depth = len(vit.blocks)
    for stage in stages:
        if not 1 <= stage.layer <= depth:
            raise ValueError(f"{stage.name}: layer {stage.layer} is outside the ViT's layers 1..{depth}")
    for block in vit.blocks:
        missing = [a for a in _BLOCK_ATTRS if not hasattr(block, a)]
        if missing:
            raise TypeError(f"{type(block).__name__} is not a timm pre-norm Block (missing {missing})")
    unmerge_output = getattr(model, "unmerge_in_encoder", True) if model is not vit else True
    state = ALGMState(
        stages, getattr(vit, "num_prefix_tokens", 1), prop_attn=prop_attn, batch_min=batch_min,
        unmerge_output=unmerge_output, config=config, policy=policy,
    )
    vit._algm_state = state
    if not isinstance(vit, ALGMVisionTransformer):
        _swap_class(vit, ALGMVisionTransformer)
    for i, block in enumerate(vit.blocks):
        if not isinstance(block, ALGMBlock):
            _swap_class(block, ALGMBlock)
        block._algm_state = state
        block._algm_layer = i + 1
    return model


def default_thresholds(model: nn.Module) -> dict[str, float]:
    """``{"local", "global"}``: the τ :func:`apply_algm` uses when given none, i.e. the model's calibrated
    ``model.algm_thresholds`` where it has them, else the authors' defaults for the ViT's width."""
    calibrated = getattr(model, "algm_thresholds", None) or {}
    fallback = AUTHOR_DEFAULT_THRESHOLDS.get(getattr(find_vit(model), "embed_dim", 0), 0.9)
    return {stage: float(calibrated.get(stage, fallback)) for stage in ("local", "global")}


def apply_algm(
    model: nn.Module,
    local_layer: Optional[int] = 1,
    global_layer: Optional[int] = 5,
    window: tuple[int, int] | int = (2, 2),
    local_threshold: Optional[float] = None,
    global_threshold: Optional[float | str] = None,
    *,
    prop_attn: bool = False,
    batch_min: bool = False,
    mode: Optional[str] = None,
) -> nn.Module:
    """Patch ``model`` in place with ALGM: CLAP in ``local_layer``, GBM in ``global_layer``.

    Thresholds left as None take the model's calibrated values (``model.algm_thresholds``, a dict with
    ``"local"``/``"global"``) where it has them, else the authors' defaults for the ViT's width.
    ``global_threshold="official"`` (:data:`ONLINE`) is the official code's online GBM threshold, set
    per image (per batch with ``batch_min=True``, as the official code) and recorded in
    ``state.record.thresholds()``; it implies ``mode="official"``. ``mode="official"`` runs CLAP and
    GBM as the official code does (``>=`` comparisons, its token order and A/B partition; see
    :mod:`algm_viz.merging`), with the online threshold unless ``global_threshold`` is a number;
    ``mode="paper"`` (the default otherwise) follows the paper. Applying again replaces the
    configuration. Returns ``model``.
    """
    default = default_thresholds(model)
    if mode == "official" and global_threshold is None:
        global_threshold = ONLINE
    config = ALGMConfig(
        local_layer=local_layer,
        global_layer=global_layer,
        window=window,
        local_threshold=local_threshold if local_threshold is not None else default["local"],
        global_threshold=global_threshold if global_threshold is not None else default["global"],
        prop_attn=prop_attn,
        batch_min=batch_min,
        mode=mode,
    )
    return apply_merging(model, config.stages(), prop_attn=prop_attn, batch_min=batch_min, config=config)


def set_thresholds(model: nn.Module, local_threshold: float | None = None,
                   global_threshold: float | str | None = None) -> None:
    """Change τ of an ALGM-patched model without re-patching (None keeps a value; ``global_threshold``
    may be :data:`ONLINE`, see :func:`apply_algm`)."""
    state = algm_state(model)
    if state is None or state.config is None:
        raise RuntimeError("ALGM is not applied to this model")
    changes = {"local_threshold": local_threshold, "global_threshold": global_threshold}
    state.config = replace(state.config, **{key: value for key, value in changes.items() if value is not None})
    state.stages = tuple(state.config.stages())


@contextmanager
def merging_restored(model: nn.Module) -> Iterator[None]:
    """Within the block, merging may be applied, changed or removed freely; on exit ``model`` gets back
    the merging it had on entry (none, if it had none)."""
    saved = algm_state(model)
    try:
        yield
    finally:
        remove_algm(model)
        if saved is not None:
            apply_merging(model, saved.stages, prop_attn=saved.prop_attn, batch_min=saved.batch_min,
                          policy=saved.policy, config=saved.config)


def remove_algm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_merging` / :func:`apply_algm` in place (a no-op on an unpatched model)."""
    vit = find_vit(model)
    for module in (vit, *vit.blocks):
        base = getattr(type(module), "_algm_base", None)
        if base is not None:
            module.__class__ = base
        for attr in ("_algm_state", "_algm_layer"):
            module.__dict__.pop(attr, None)
    return model
