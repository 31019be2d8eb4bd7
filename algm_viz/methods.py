"""Token-reduction methods as configurations of one engine, each with one knob to sweep.

Every method is a list of :class:`~algm_viz.patch.MergeStage` s, so all of them share the merge
objects, the unmerging, the timing code and the record the app draws. ``apply_method(model, name,
value)`` patches a model; ``METHODS[name]`` says what the knob is and which values a sweep tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from torch import nn

from .clustering import ailurus_planner, expedite_planner
from .patch import ONLINE, MergeStage, SharePolicy, apply_algm, apply_merging, colour_homogeneity_policy, find_vit

__all__ = ["Method", "METHODS", "apply_method"]

StageBuilder = Callable[..., list[MergeStage]]


@dataclass(frozen=True)
class Method:
    """A method and its knob. ``build(knob value, depth, **options)`` gives its stages."""

    name: str
    label: str
    knob: str
    values: tuple[float, ...]
    build: StageBuilder
    prop_attn: bool = False
    note: str = ""
    algm: bool = False  # an ALGM variant: ``build(depth, **options)`` gives its (local, global) layers


def _algm_layers(depth: int, local_layer: int | None = 1, global_layer: int | None = 5) -> tuple[int | None, int | None]:
    return local_layer, None if global_layer is None else min(global_layer, depth)


def _tome(r: float, depth: int) -> list[MergeStage]:
    return [MergeStage("tome", layer, r=int(r), metric="keys") for layer in range(1, depth + 1)]


def _pool2d(k: float, depth: int, layer: int = 1) -> list[MergeStage]:
    return [MergeStage("pool2d", layer, window=(int(k), int(k)))]


def _grid(ratio: float, depth: int, layer: int = 1, stride: tuple[int, int] = (2, 2)) -> list[MergeStage]:
    return [MergeStage("grid", layer, ratio=ratio, stride=stride)]


def _kv_grid(ratio: float, depth: int, stride: tuple[int, int] = (2, 2)) -> list[MergeStage]:
    return [MergeStage("grid", layer, ratio=ratio, stride=stride, kv_only=True) for layer in range(1, depth + 1)]


def _cts(budget: float, depth: int, window: tuple[int, int] = (2, 2)) -> list[MergeStage]:
    return [MergeStage("share", 1, budget=budget, window=window)]


def _clustering_layer(depth: int, layer: int | None, fraction: float) -> int:
    return layer if layer is not None else max(1, round(depth * fraction))


def _expedite(keep: float, depth: int, layer: int | None = None, grid: tuple[int, int] | None = None,
              **options: Any) -> list[MergeStage]:
    """Expedite: local k-means into clusters in block ``layer`` (default: a third of the depth), token
    reconstruction at the encoder output. ``grid=(h, w)`` fixes the cluster grid (else ``keep`` of
    the tokens); ``options`` go to :func:`~algm_viz.clustering.local_kmeans` (``k``, ``temperature``, ...)."""
    planner = partial(expedite_planner, keep=keep, cells=grid, **options)
    return [MergeStage("cluster", _clustering_layer(depth, layer, EXPEDITE_LAYER), planner=planner, name="expedite")]


def _ailurus(keep: float, depth: int, layer: int | None = None, **options: Any) -> list[MergeStage]:
    """AiluRus: density-peaks clustering into ``keep`` of the tokens in block ``layer`` (default: a
    sixth of the depth), unfolded at the encoder output; ``options`` go to
    :func:`~algm_viz.clustering.density_peaks_clusters` (``k``, ``spatial_weight``, ...)."""
    planner = partial(ailurus_planner, keep=keep, **options)
    return [MergeStage("cluster", _clustering_layer(depth, layer, AILURUS_LAYER), planner=planner, name="ailurus")]


#: Default clustering layers as a fraction of the depth (Expedite 4 of 12, AiluRus 2 of 12: on the bundled
#: model AiluRus keeps more agreement at equal GFLOPs clustering early and keeping more, BENCHMARKS.md).
EXPEDITE_LAYER, AILURUS_LAYER = 1 / 3, 1 / 6
KEEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
AILURUS_KEEPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

TAUS = (0.80, 0.84, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("algm", "ALGM (CLAP + GBM)", "τ", TAUS, _algm_layers, algm=True),
        Method("algm_prop", "ALGM + proportional attention", "τ", TAUS, _algm_layers, algm=True, prop_attn=True,
               note="Attention weighs a merged key by the patches it stands for (log-size key bias, as ToMe)."),
        Method("clap", "ALGM: CLAP only", "τ", TAUS, lambda depth, **o: _algm_layers(depth, **{**o, "global_layer": None}), algm=True),
        Method("gbm", "ALGM: GBM only", "τ", TAUS, lambda depth, **o: _algm_layers(depth, **{**o, "local_layer": None}), algm=True),
        Method("gbm1", "ALGM: GBM in layer 1", "τ", TAUS, lambda depth, **o: _algm_layers(depth, **{**o, "local_layer": None, "global_layer": 1}), algm=True),
        Method("tome", "ToMe (r per layer, keys)", "r", (2, 4, 8, 16, 24, 32), _tome, prop_attn=True),
        Method("pool2d", "Segformer++ 2-D pooling", "k", (2, 4), _pool2d),
        Method("grid", "Segformer++ grid matching", "ratio", (0.25, 0.5, 0.75, 0.9), _grid),
        Method("kv_grid", "Segformer++ key/value merging", "ratio", (0.25, 0.5, 0.75, 0.9), _kv_grid),
        Method(
            "cts", "CTS-style sharing (stand-in policy)", "budget", (0.1, 0.2, 0.3, 0.4), _cts,
            note="CTS's policy is a trained CNN; this uses a training-free stand-in (superpatch colour "
            "homogeneity). Pass policy= to plug in a trained one.",
        ),
        Method("expedite", "Expedite (hourglass clustering + reconstruction)", "keep", KEEPS, _expedite,
               note="Local k-means into an h×w grid of clusters (keep = h·w / patches) in one layer; soft "
               "token reconstruction before the decoder."),
        Method("ailurus", "AiluRus (spatial-aware density clustering)", "keep", AILURUS_KEEPS, _ailurus,
               note="Density-peaks clustering with a spatial prior in one layer; every patch takes its "
               "cluster's output before the decoder."),
        Method("ailurus_prop", "AiluRus + proportional attention", "keep", AILURUS_KEEPS, _ailurus, prop_attn=True,
               note="AiluRus with ToMe's log-size key bias: a cluster weighs as the patches it holds."),
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
    Expedite and AiluRus. Returns ``model``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    method, depth = METHODS[name], len(find_vit(model).blocks)
    if method.algm:
        window = options.pop("window", (2, 2))
        engine = {key: options.pop(key) for key in ("batch_min", "mode") if key in options}
        local_layer, global_layer = method.build(depth, **options)
        local = None if value == ONLINE else value
        return apply_algm(model, local_layer, global_layer, window, local_threshold=local, global_threshold=value,
                          prop_attn=method.prop_attn, **engine)
    stages = method.build(value, depth, **options)
    return apply_merging(model, stages, prop_attn=method.prop_attn, policy=policy)
