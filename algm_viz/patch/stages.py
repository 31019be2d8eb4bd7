"""Merge stages: one small class per kind of merge step, each planning its :class:`~algm_viz.merging.Merge`
with one signature, and :class:`ALGMConfig`, the paper's two-stage configuration.

A stage runs in block ``layer`` (1-based) between attention and MLP, on the tokens after the attention
residual (token sharing: before the attention). Its :meth:`MergeStage.plan` gets the whole sequence
(prefix tokens first) and a :class:`PlanContext` with what the forward knows; it never sees the model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass
from typing import Callable, ClassVar, Optional

from torch import Tensor

from ..merging import (
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
    "ALGMConfig",
    "CLAPStage",
    "ClusterPlanner",
    "ClusterStage",
    "GBMStage",
    "GridStage",
    "MergePlan",
    "MergeStage",
    "PlanContext",
    "Pool2dStage",
    "ShareStage",
    "SharePolicy",
    "ToMeStage",
]

#: ``"paper"``: as the paper describes ALGM; ``"official"``: as the official ALGM code runs it.
MODES = ("paper", "official")

#: ``planner(tokens [B, N, C], grid, size [B, N, 1] | None) -> Merge``: a :class:`ClusterStage`'s merge.
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


def _fraction(value: object, name: str) -> None:
    if value is None or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} in [0, 1], got {value}")


def _mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


@dataclass(frozen=True)
class PlanContext:
    """What a stage may use besides its metric: the forward's patch grid and prefix, the engine's options.

    images: ``[B, 3, H, W]`` model input (None outside a ViT forward); policy: token sharing's scores.
    """

    grid: tuple[int, int]
    num_prefix: int
    batch_min: bool = False
    images: Tensor | None = None
    patch_size: tuple[int, int] = (16, 16)
    policy: SharePolicy | None = None

    def patches(self, sequence: Tensor | None) -> Tensor | None:
        """``[B, T, ...]`` -> ``[B, T - prefix, ...]`` (None stays None)."""
        return None if sequence is None else sequence[:, self.num_prefix:]


@dataclass(frozen=True)
class MergeStage(ABC):
    """One merge step in block ``layer`` (1-based); the subclasses are the kinds.

    ``metric``: ``"tokens"`` (the block's tokens after the attention residual) or ``"keys"`` (the
    attention keys, mean over heads, as ToMe). ``name`` defaults to ``<kind><layer>``.
    """

    kind: ClassVar[str]
    #: Runs before the block's attention (token sharing) rather than after it.
    before_attention: ClassVar[bool] = False
    #: Needs the full patch grid: no token-reducing stage may run before it.
    full_grid: ClassVar[bool] = False

    layer: int
    _: KW_ONLY
    metric: str = "tokens"
    name: str = ""
    #: Merges only this block's keys and values (a field of the kinds that can).
    kv_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.metric not in ("tokens", "keys"):
            raise ValueError(f"metric must be 'tokens' or 'keys', got {self.metric!r}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.kind}{self.layer}")

    @abstractmethod
    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        """The merge of the patch tokens, from ``metric`` ``[B, T, C]`` and sizes ``size`` ``[B, T, 1]``
        (None = all 1) of the whole sequence, prefix tokens first."""


@dataclass(frozen=True, kw_only=True)
class CLAPStage(MergeStage):
    """ALGM's local merging: ``window`` s whose mean similarity is above ``threshold``. ``mode``:
    ``"official"`` runs it as the official ALGM code does (:data:`MODES`)."""

    kind: ClassVar[str] = "clap"
    full_grid: ClassVar[bool] = True

    threshold: float
    window: tuple[int, int] = (2, 2)
    mode: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        _mode(self.mode)
        object.__setattr__(self, "threshold", _number(self.threshold, "clap needs a threshold:"))
        object.__setattr__(self, "window", _pair(self.window, "window"))

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        return local_merge(context.patches(metric), context.grid, self.window, self.threshold,
                           batch_min=context.batch_min, official=self.mode == "official")


@dataclass(frozen=True, kw_only=True)
class GBMStage(MergeStage):
    """ALGM's global merging: A = even, B = odd, edges above ``threshold``. ``mode="official"``
    partitions the whole sequence (prefix included), as the official code; its threshold may then be
    :data:`~algm_viz.merging.ONLINE`, the official online rule."""

    kind: ClassVar[str] = "gbm"

    threshold: float | str
    mode: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        _mode(self.mode)
        if self.threshold == ONLINE:
            if self.mode != "official":
                raise ValueError(f"the online threshold {ONLINE!r} is the official code's: use mode='official'")
        else:
            object.__setattr__(self, "threshold", _number(self.threshold, "gbm needs a threshold:"))

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        if self.mode == "official":
            return official_global_merge(metric, self.threshold, size, num_prefix=context.num_prefix,
                                         layer=self.layer, batch_min=context.batch_min)
        return global_merge(context.patches(metric), self.threshold, context.patches(size), batch_min=context.batch_min)


@dataclass(frozen=True, kw_only=True)
class ToMeStage(MergeStage):
    """ToMe: A = even, B = odd, the ``r`` best edges. ``kv_only``: merge only keys and values."""

    kind: ClassVar[str] = "tome"

    r: int
    kv_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is None or self.r < 0:
            raise ValueError("tome needs r >= 0")

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        patches = context.patches(metric)
        return bipartite_merge(patches, alternate_destinations(patches.shape[1], patches.device), r=self.r,
                               size=context.patches(size))


@dataclass(frozen=True, kw_only=True)
class Pool2dStage(MergeStage):
    """Segformer++'s 2-D neighbour merging: every full ``window`` averaged."""

    kind: ClassVar[str] = "pool2d"
    full_grid: ClassVar[bool] = True

    window: tuple[int, int] = (2, 2)
    kv_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "window", _pair(self.window, "window"))

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        return local_merge(context.patches(metric), context.grid, self.window, float("-inf"))


@dataclass(frozen=True, kw_only=True)
class GridStage(MergeStage):
    """Segformer++'s grid matching: destinations on a ``stride`` grid, ``ratio`` of the sources merged."""

    kind: ClassVar[str] = "grid"
    full_grid: ClassVar[bool] = True

    ratio: float
    stride: tuple[int, int] = (2, 2)
    kv_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction(self.ratio, "grid needs ratio")
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        destinations = grid_destinations(context.grid, self.stride, metric.device)
        r = round(self.ratio * int((~destinations).sum()))
        return bipartite_merge(context.patches(metric), destinations, r=r, size=context.patches(size))


@dataclass(frozen=True, kw_only=True)
class ShareStage(MergeStage):
    """CTS-style token sharing, before the block's attention: the ``budget`` fraction of ``window`` s that
    the context's policy scores best share one token."""

    kind: ClassVar[str] = "share"
    before_attention: ClassVar[bool] = True
    full_grid: ClassVar[bool] = True

    budget: float
    window: tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction(self.budget, "share needs budget")
        object.__setattr__(self, "window", _pair(self.window, "window"))

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        if context.images is None:
            raise RuntimeError("token sharing needs the input images")
        if context.policy is None:
            raise RuntimeError("token sharing needs a policy (apply_merging(..., policy=...))")
        scores = context.policy(context.images, context.grid, self.window, context.patch_size)
        windows = window_index(context.grid, self.window, scores.device).shape[0]
        return budget_window_merge(scores, context.grid, self.window, round(self.budget * windows))


@dataclass(frozen=True, kw_only=True)
class ClusterStage(MergeStage):
    """Whatever ``planner`` makes of the patch grid (Expedite, AiluRus: :mod:`algm_viz.clustering`). A
    merge with ``restore_in_encoder = True`` is unmerged at the encoder output, before any decoder."""

    kind: ClassVar[str] = "cluster"
    full_grid: ClassVar[bool] = True

    planner: ClusterPlanner

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.planner is None:
            raise ValueError("a cluster stage needs a planner")

    def plan(self, metric: Tensor, size: Tensor | None, context: PlanContext) -> Merge:
        return self.planner(context.patches(metric), context.grid, context.patches(size))


@dataclass(frozen=True)
class ALGMConfig:
    """The paper's configuration. A layer of None switches that stage off.

    ``global_threshold`` is a τ or :data:`~algm_viz.merging.ONLINE` (the official code's online rule).
    ``mode`` is one of :data:`MODES`, or None: ``"official"`` when ``global_threshold`` is ONLINE, else
    ``"paper"``.
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
        if self.mode is not None:
            _mode(self.mode)
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
            stages.append(CLAPStage(self.local_layer, threshold=self.local_threshold, window=self.window,
                                    name="local", mode=mode))
        if self.global_layer is not None:
            stages.append(GBMStage(self.global_layer, threshold=self.global_threshold, name="global", mode=mode))
        return stages

    def plan(self) -> MergePlan:
        """This configuration as what :func:`~algm_viz.patch.apply_plan` runs."""
        return MergePlan(tuple(self.stages()), prop_attn=self.prop_attn, batch_min=self.batch_min, config=self)


@dataclass(frozen=True)
class MergePlan:
    """What a patched model runs: the stages and the engine's options. ``config``: the ALGM configuration
    the stages come from (None for the other methods)."""

    stages: tuple[MergeStage, ...]
    prop_attn: bool = False
    batch_min: bool = False
    config: ALGMConfig | None = None
