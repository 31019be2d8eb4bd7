"""What the app shows for one image and one ALGM setting: overlays, readout, curves, balance.

Everything here is computed from an :class:`ImageSession` (which caches the forwards) and is free of
Gradio, so handlers and tests share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import plotly.graph_objects as go

from .. import render
from ..plots import balance_figure, delta_figure, image_tau_figure
from .session import ImageSession, Settings

__all__ = ["Analysis", "analyze", "readout_markdown", "curve", "dataset_curve", "balance", "CURVE_THRESHOLDS"]

#: Width (px) of the class legend: one column, beside the segmentation.
LEGEND_WIDTH = 200
#: τ of the per-image curve (the same τ for both stages); 1.0 merges nothing.
CURVE_THRESHOLDS = tuple(round(float(t), 3) for t in np.linspace(0.55, 1.0, 10))


@dataclass
class Analysis:
    """Pictures (``[H, W, 3]`` uint8, aligned with the model input) and the readout of one setting."""

    local_overlay: np.ndarray
    global_overlay: np.ndarray
    baseline_overlay: np.ndarray
    algm_overlay: np.ndarray
    disagreement: np.ndarray
    legend: np.ndarray
    readout: dict[str, Any]
    mean_colors: np.ndarray
    ground_truth: np.ndarray | None = None


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else math.nan


def analyze(session: ImageSession, settings: Settings, with_gflops: bool = True) -> Analysis:
    """Run (or fetch) the baseline and the ALGM forward for ``settings`` and draw everything."""
    entry, image = session.entry, session.image
    base, algm = session.baseline(), session.algm(settings)
    latency = session.latency(settings)
    maps, p = algm.maps, entry.patch_size
    disagreement, changed = render.disagreement_map(image, base.prediction, algm.prediction)
    agreement, _ = session.agreement(algm.prediction)
    present = np.union1d(np.unique(base.prediction), np.unique(algm.prediction))
    if session.label is not None:
        present = np.union1d(present, np.unique(session.label[session.label < entry.model.num_classes]))
    tokens = maps.tokens
    readout: dict[str, Any] = {
        "model": entry.label,
        "trained": entry.trained,
        "device": str(entry.device),
        "image_size": [int(image.shape[1]), int(image.shape[0])],
        "thresholds": {"local": settings.local_threshold, "global": settings.global_threshold},
        "thresholds_used": dict(maps.thresholds),
        "window": settings.window,
        "local_layer": settings.local_layer,
        "global_layer": settings.global_layer,
        "proportional_attention": settings.prop_attn,
        "tokens": dict(tokens),
        "kept_percent": {"local": _percent(tokens["local"], tokens["patches"]),
                         "global": _percent(tokens["global"], tokens["patches"])},
        "latency_ms": {name: {"median": 1e3 * t.median, "p25": 1e3 * t.p25, "p75": 1e3 * t.p75}
                       for name, t in (("baseline", latency.baseline), ("algm", latency.algm))},
        "speedup": latency.speedup,
        "timing": {"rounds": latency.baseline.repeats, "interleaved": True,
                   "how": "median of interleaved rounds (baseline, then this setting), after warm-up forwards"},
        "gflops": {"baseline": session.gflops(None), "algm": session.gflops(settings)} if with_gflops else None,
        "agreement_miou": agreement,
        "changed_pixels_percent": 100.0 * changed,
        "miou": None,
        "label_note": session.label_note,
    }
    if session.label is not None:
        readout["miou"] = {"baseline": session.label_miou(base.prediction), "algm": session.label_miou(algm.prediction)}
    return Analysis(
        local_overlay=render.window_overlay(image, maps.local_groups, p),
        global_overlay=render.group_overlay(image, maps.final_groups, maps.global_merged, p),
        baseline_overlay=render.segmentation_overlay(image, base.prediction, entry.colors),
        algm_overlay=render.segmentation_overlay(image, algm.prediction, entry.colors),
        disagreement=disagreement,
        legend=render.legend(entry.class_names, entry.colors, present, width=LEGEND_WIDTH, column_width=LEGEND_WIDTH),
        readout=readout,
        mean_colors=render.mean_color_view(image, maps.final_groups, p),
        ground_truth=None if session.label is None else render.segmentation_overlay(image, session.label, entry.colors),
    )


def _ms(timing: dict[str, float]) -> str:
    """``412 ms (405–420)``: median and quartiles."""
    return f"{timing['median']:.0f} ms ({timing['p25']:.0f}–{timing['p75']:.0f})"


def readout_markdown(readout: dict[str, Any]) -> str:
    """The readout as a few lines of Markdown."""
    tokens, kept, latency = readout["tokens"], readout["kept_percent"], readout["latency_ms"]
    tau = readout["thresholds"]
    used = readout.get("thresholds_used", {})
    if tau["global"] == "official":  # the official code's online GBM τ: the value this image used
        global_tau = "official (online)" + (f" {used['global']:.3f}" if "global" in used else "")
    else:
        global_tau = f"{tau['global']:.3f}"
    lines = [
        f"**Tokens** {tokens['patches']} → {tokens['local']} → {tokens['global']} "
        f"({kept['local']:.1f} % → {kept['global']:.1f} % kept) · τ local {tau['local']:.3f}, global {global_tau}, "
        f"{readout['window']}×{readout['window']} windows, GBM at layer {readout['global_layer']}"
        + (", proportional attention" if readout["proportional_attention"] else ""),
        f"**Latency** baseline {_ms(latency['baseline'])} · ALGM {_ms(latency['algm'])} → "
        f"**{readout['speedup']:.2f}×** on `{readout['device']}`, {readout['image_size'][0]}×{readout['image_size'][1]} "
        f"input (median and quartiles of {readout['timing']['rounds']} rounds, each timing the baseline and then "
        f"this setting, as `algm-viz bench` does)",
    ]
    if readout["gflops"] is not None:
        gflops = readout["gflops"]
        lines.append(f"**GFLOPs** baseline {gflops['baseline']:.2f} · ALGM {gflops['algm']:.2f} "
                     f"({_percent(gflops['algm'], gflops['baseline']):.1f} %)")
    quality = (f"**Agreement mIoU** (ALGM vs baseline prediction) {readout['agreement_miou']:.2f} % · "
               f"{readout['changed_pixels_percent']:.2f} % of pixels changed")
    if readout["miou"] is not None:
        quality += f" · **mIoU vs label** baseline {readout['miou']['baseline']:.2f} %, ALGM {readout['miou']['algm']:.2f} %"
    lines.append(quality)
    if readout.get("label_note"):
        lines.append(f"⚠️ {readout['label_note']}.")
    if not readout["trained"]:
        lines.append("⚠️ untrained model: random weights, the segmentation is meaningless (the merging mechanics are real).")
    return "\n\n".join(lines)


def curve(session: ImageSession, settings: Settings, thresholds: Sequence[float] = CURVE_THRESHOLDS,
          check: Callable[[int, int], None] | None = None) -> tuple[go.Figure, list[dict[str, Any]]]:
    """Per-image agreement with the baseline and cost against τ, one stage at a time (window, layer and
    proportional attention of ``settings``): τ local over ``thresholds`` with τ global at its setting, and
    τ global over ``thresholds`` with τ local at its setting; each grid also holds the current τ, so the
    curves pass through the readout's setting, which is marked. Returns the figure and the rows (the
    baseline, then each curve's rows with ``"varied"``: ``"local"`` or ``"global"``). ``check(done, total)``
    runs between the forwards and may raise to stop (see :meth:`ImageSession.curve_rows`)."""
    current = {"local": settings.local_threshold, "global": settings.global_threshold}
    curves = {}
    for stage, other in (("local", "global"), ("global", "local")):
        here = {current[stage]} if isinstance(current[stage], float) else set()  # not the official online τ
        grid = sorted({round(float(t), 6) for t in thresholds} | here)
        curves[stage] = session.curve_rows(grid, settings.window, settings.global_layer, settings.prop_attn, check,
                                           vary=stage, fixed=current[other])
    figure = image_tau_figure(curves["local"], curves["global"], current)
    rows = [dict(curves["local"][0])] + [{**r, "varied": stage} for stage in ("local", "global") for r in curves[stage][1:]]
    return figure, rows


def dataset_curve(rows: Sequence[dict[str, Any]] | None, current: float, source: str | None = None) -> go.Figure | None:
    """The dataset-level τ curve a model ships (``sweep.json``: the same τ for both stages) as ΔmIoU against
    the baseline and speed-up, ``current`` τ marked, titled with what it was measured on (``source``, e.g.
    ``"camvid val, 101 images"``); None without one."""
    if not rows or not any(r["method"] == "baseline" for r in rows):
        return None
    return delta_figure(rows, current, title="Data set (the model's sweep, same τ for both stages): ΔmIoU and speed-up against τ",
                        subtitle=f"measured on {source}" if source else None)


def balance(session: ImageSession, settings: Settings) -> tuple[go.Figure, str, dict[str, Any]]:
    """Attention balance per predicted class (paper Sec. 5.4): figure, one-line summary, raw statistics."""
    stats = session.balance(settings)
    figure = balance_figure(stats, session.entry.class_names)
    base, algm = stats["baseline"], stats["algm"]
    summary = (f"Entropy of the class attention distribution (layers {stats['layers'][0]}–{stats['layers'][-1]}): "
               f"baseline {base['entropy']:.3f} → ALGM {algm['entropy']:.3f} nats "
               f"(normalised {base['entropy_normalized']:.3f} → {algm['entropy_normalized']:.3f}; higher = more balanced); "
               f"Gini {base['gini']:.3f} → {algm['gini']:.3f}.")
    return figure, summary, stats
