"""Token-reduction methods as configurations of one engine, each with one knob to sweep.

Every method builds a :class:`~algm_viz.patch.MergePlan` (stages of :mod:`algm_viz.patch.stages`), so
all of them share the merge objects, the unmerging, the timing code and the record the app draws.
``apply_method(model, name, value)`` patches a model; ``METHODS[name]`` says what the knob is and which
values a sweep tries. CTS-style sharing scores its windows with :func:`colour_homogeneity_policy`
unless given another policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from .clustering import ailurus_planner, expedite_planner
from .patch import (
    ONLINE,
    ClusterStage,
    GridStage,
    MergePlan,
    MergeStage,
    Pool2dStage,
    SharePolicy,
    ShareStage,
    ToMeStage,
    algm_config,
    apply_plan,
    default_thresholds,
    find_vit,
)

__all__ = ["Method", "METHODS", "apply_method", "colour_homogeneity_policy"]

#: ``build(knob value, depth, *, defaults=None, prop_attn=False, **options) -> MergePlan``. ``defaults``:
#: ``{"local", "global"}`` τ for an ALGM variant's value of None (:func:`~algm_viz.patch.default_thresholds`).
PlanBuilder = Callable[..., MergePlan]


@dataclass(frozen=True)
class Method:
    """A method and its knob. ``build(knob value, depth, **options)`` gives its :class:`MergePlan`."""

    name: str
    label: str
    knob: str
    values: tuple[float, ...]
    build: PlanBuilder
    prop_attn: bool = False
    note: str = ""
    algm: bool = False  # an ALGM variant: the knob is τ and the plan carries its ALGMConfig


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


def _algm(**fixed: int | None) -> PlanBuilder:
    """The builder of an ALGM variant whose ``fixed`` layers (``local_layer``/``global_layer``, None = off)
    win over the options. The value is τ for both stages, None for ``defaults``, or ``"official"`` (CLAP
    at its default, GBM's online threshold); GBM's layer is clamped to the depth."""

    def build(value: float | str | None, depth: int, *, defaults: Mapping[str, float] | None = None,
              prop_attn: bool = False, local_layer: int | None = 1, global_layer: int | None = 5,
              window: tuple[int, int] | int = (2, 2), batch_min: bool = False, mode: str | None = None) -> MergePlan:
        layers = {"local_layer": local_layer, "global_layer": global_layer, **fixed}
        last = None if layers["global_layer"] is None else min(layers["global_layer"], depth)
        if defaults is None and (value is None or value == ONLINE):
            raise ValueError("an ALGM variant needs defaults (the model's τ) for a value of None or 'official'")
        config = algm_config(defaults, local_layer=layers["local_layer"], global_layer=last, window=window,
                             local_threshold=None if value == ONLINE else value, global_threshold=value,
                             prop_attn=prop_attn, batch_min=batch_min, mode=mode)
        return config.plan()

    return build


def _stages(stages: Callable[..., list[MergeStage]]) -> PlanBuilder:
    """The builder of a method whose stages are ``stages(value, depth, **options)``."""

    def build(value: float, depth: int, *, defaults: Mapping[str, float] | None = None, prop_attn: bool = False,
              **options: Any) -> MergePlan:
        return MergePlan(tuple(stages(value, depth, **options)), prop_attn=prop_attn)

    return build


def _tome(r: float, depth: int) -> list[MergeStage]:
    return [ToMeStage(layer, r=int(r), metric="keys") for layer in range(1, depth + 1)]


def _pool2d(k: float, depth: int, layer: int = 1) -> list[MergeStage]:
    return [Pool2dStage(layer, window=(int(k), int(k)))]


def _grid(ratio: float, depth: int, layer: int = 1, stride: tuple[int, int] = (2, 2)) -> list[MergeStage]:
    return [GridStage(layer, ratio=ratio, stride=stride)]


def _kv_grid(ratio: float, depth: int, stride: tuple[int, int] = (2, 2)) -> list[MergeStage]:
    return [GridStage(layer, ratio=ratio, stride=stride, kv_only=True) for layer in range(1, depth + 1)]


def _cts(budget: float, depth: int, window: tuple[int, int] = (2, 2)) -> list[MergeStage]:
    return [ShareStage(1, budget=budget, window=window)]


def _clustering_layer(depth: int, layer: int | None, fraction: float) -> int:
    return layer if layer is not None else max(1, round(depth * fraction))


def _expedite(keep: float, depth: int, layer: int | None = None, grid: tuple[int, int] | None = None,
              **options: Any) -> list[MergeStage]:
    """Expedite: local k-means into clusters in block ``layer`` (default: a third of the depth), token
    reconstruction where the model unmerges (after a transformer decoder, as the official Expedite Segmenter code;
    ``restore_in_encoder=True``: at the encoder output). ``grid=(h, w)`` fixes the cluster grid (else ``keep`` of
    the tokens); ``options`` go to :func:`~algm_viz.clustering.local_kmeans` (``k``, ``temperature``, ...)."""
    planner = partial(expedite_planner, keep=keep, cells=grid, **options)
    return [ClusterStage(_clustering_layer(depth, layer, EXPEDITE_LAYER), planner=planner, name="expedite")]


def _ailurus(keep: float, depth: int, layer: int | None = None, **options: Any) -> list[MergeStage]:
    """AiluRus: density-peaks clustering into ``keep`` of the tokens in block ``layer`` (default: a
    sixth of the depth), unfolded at the encoder output (``restore_in_encoder=False``: where the model unmerges);
    ``options`` go to :func:`~algm_viz.clustering.density_peaks_clusters` (``k``, ``spatial_weight``, ...)."""
    planner = partial(ailurus_planner, keep=keep, **options)
    return [ClusterStage(_clustering_layer(depth, layer, AILURUS_LAYER), planner=planner, name="ailurus")]


#: Default clustering layers as a fraction of the depth (Expedite 4 of 12, AiluRus 2 of 12: on the bundled
#: model AiluRus keeps more agreement at equal GFLOPs clustering early and keeping more, BENCHMARKS.md).
EXPEDITE_LAYER, AILURUS_LAYER = 1 / 3, 1 / 6
KEEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
AILURUS_KEEPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

TAUS = (0.80, 0.84, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("algm", "ALGM (CLAP + GBM)", "τ", TAUS, _algm(), algm=True),
        Method("algm_prop", "ALGM + proportional attention", "τ", TAUS, _algm(), algm=True, prop_attn=True,
               note="Attention weighs a merged key by the patches it stands for (log-size key bias, as ToMe)."),
        Method("clap", "ALGM: CLAP only", "τ", TAUS, _algm(global_layer=None), algm=True),
        Method("gbm", "ALGM: GBM only", "τ", TAUS, _algm(local_layer=None), algm=True),
        Method("gbm1", "ALGM: GBM in layer 1", "τ", TAUS, _algm(local_layer=None, global_layer=1), algm=True),
        Method("tome", "ToMe (r per layer, keys)", "r", (2, 4, 8, 16, 24, 32), _stages(_tome), prop_attn=True),
        Method("pool2d", "Segformer++ 2-D pooling", "k", (2, 4), _stages(_pool2d)),
        Method("grid", "Segformer++ grid matching", "ratio", (0.25, 0.5, 0.75, 0.9), _stages(_grid)),
        Method("kv_grid", "Segformer++ key/value merging", "ratio", (0.25, 0.5, 0.75, 0.9), _stages(_kv_grid)),
        Method(
            "cts", "CTS-style sharing (stand-in policy)", "budget", (0.1, 0.2, 0.3, 0.4), _stages(_cts),
            note="CTS's policy is a trained CNN; this uses a training-free stand-in (superpatch colour "
            "homogeneity). Pass policy= to plug in a trained one.",
        ),
        Method("expedite", "Expedite (hourglass clustering + reconstruction)", "keep", KEEPS, _stages(_expedite),
               note="Local k-means into an h×w grid of clusters (keep = h·w / patches) in one layer; a transformer "
               "decoder runs on the clusters and soft token reconstruction rebuilds every patch's output (as the "
               "official Segmenter code), a dense decoder gets the reconstructed tokens."),
        Method("ailurus", "AiluRus (spatial-aware density clustering)", "keep", AILURUS_KEEPS, _stages(_ailurus),
               note="Density-peaks clustering with a spatial prior in one layer; every patch takes its "
               "cluster's output before the decoder."),
        Method("ailurus_prop", "AiluRus + proportional attention", "keep", AILURUS_KEEPS,
               _stages(partial(_ailurus, restore_in_encoder=False)), prop_attn=True,
               note="AiluRus with ToMe's log-size key bias: a cluster weighs as the patches it holds. A transformer "
               "decoder runs on the clusters with that bias, which gives the same output as unfolding before it "
               "(every patch of a cluster is the same token), for fewer FLOPs."),
    )
}


def apply_method(model: nn.Module, name: str, value: float | str | None, *, policy: SharePolicy = colour_homogeneity_policy,
                 **options: Any) -> nn.Module:
    """Patch ``model`` in place with method ``name`` at knob ``value`` (for the ALGM variants, None = the
    model's calibrated τ, ``"official"`` = the official code's mode: CLAP at the calibrated τ, GBM's online
    threshold, see :func:`~algm_viz.patch.apply_algm`). ``options`` go to the method:
    ``local_layer``/``global_layer``/``window``/``batch_min``/``mode`` for the
    ALGM variants (a variant's own fixed layers win, e.g. CLAP only ignores ``global_layer``),
    ``stride``/``layer`` for grid matching, ``window`` for sharing, ``layer``/``grid``/``k``/... for
    Expedite and AiluRus. ``policy`` scores the windows of CTS-style sharing. Returns ``model``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    method, depth = METHODS[name], len(find_vit(model).blocks)
    plan = method.build(value, depth, defaults=default_thresholds(model), prop_attn=method.prop_attn, **options)
    return apply_plan(model, plan, policy=policy)
