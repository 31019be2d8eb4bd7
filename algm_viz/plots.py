"""Plotly figures for sweep results, attention balance and similarity analysis (shared by CLI and app).

A sweep *row* is :meth:`algm_viz.evaluation.rows.SweepRow.to_dict` (its attributes say what each key holds):
``"method"``, ``"local_threshold"``/``"global_threshold"``, ``"knob"``/``"value"``, ``"miou"`` (%),
``"per_class_iou"``, ``"images_per_s"`` with its ``"images_per_s_spread"``, ``"gflops"``, ``"tokens"``, and from
a data-set sweep ``"delta_miou"`` with its ``"delta_miou_ci"`` interval, ``"miou_ci"`` and ``"stages"``.
Figures draw ``delta_miou_ci`` as mIoU error bars around each point: a bar that reaches the baseline line
marks a difference the images do not resolve.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "method_label",
    "image_tau_figure",
    "delta_figure",
    "row_threshold",
    "threshold_figure",
    "pareto_figure",
    "balance_figure",
    "similarity_figure",
    "rows_to_csv",
    "write_html",
]

Row = dict[str, Any]
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def row_threshold(row: Row) -> float | None:
    """The τ a row was measured at: the CLAP τ, else the GBM τ (for the official online rule, the mean
    threshold its images used), else the value of a τ knob (None for the baseline and for methods with
    another knob)."""
    if row.get("method") == "baseline":
        return None
    for key in ("local_threshold", "global_threshold"):
        if row.get(key) == "official":
            used = (row.get("thresholds_used") or {}).get("global")
            if used is not None:
                return float(used)
        elif row.get(key) is not None:
            return float(row[key])
    if row.get("value") == "official":
        return None
    return float(row["value"]) if row.get("knob") == "τ" and row.get("value") is not None else None


def _label(row: Row) -> str:
    if row.get("value") == "auto":
        return f"calibrated τ ({row['local_threshold']:g}, {row['global_threshold']:g})"
    if row.get("value") == "official":
        return f"official (online) GBM τ, mean {(row.get('thresholds_used') or {}).get('global', math.nan):.3f}"
    tau = row_threshold(row)
    if tau is not None:
        return f"τ = {tau:g}"
    return f"{row['knob']} = {row['value']:g}" if row.get("knob") and row.get("value") is not None else row["method"]


def method_label(method: str) -> str:
    """The plain name of a method (``"algm_prop"`` -> ``"ALGM + proportional attention"``); unknown names as they are."""
    from .methods import METHODS  # plots stay importable without the engine's registry at import time

    return METHODS[method].label if method in METHODS else method


def image_tau_figure(local_rows: Sequence[Row], global_rows: Sequence[Row], current: dict[str, float]) -> go.Figure:
    """One image's τ curves as two columns: τ local varied with τ global fixed at ``current["global"]``, and
    τ global varied with τ local fixed at ``current["local"]``. Top row: agreement with the baseline
    (mIoU %); bottom row: GFLOPs and tokens kept, % of the baseline. The current setting is a vertical line
    and a star in each column (``current``: ``{"local", "global"}`` τ). Rows as from the app's curve: the
    baseline first (with ``gflops`` and ``tokens``), then one row per τ with ``miou`` = agreement."""
    def text(tau: float | str) -> str:
        return f"{tau:.3f}" if isinstance(tau, float) else str(tau)

    titles = (f"τ local varied (τ global = {text(current['global'])})", f"τ global varied (τ local = {text(current['local'])})")
    figure = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.08, horizontal_spacing=0.1,
                           subplot_titles=titles, row_heights=[0.6, 0.4])
    for col, (rows, stage) in enumerate(((local_rows, "local"), (global_rows, "global")), 1):
        base = next(r for r in rows if r["method"] == "baseline")
        points = sorted((r for r in rows if r["method"] != "baseline"), key=lambda r: r[f"{stage}_threshold"])
        taus = [r[f"{stage}_threshold"] for r in points]
        first = col == 1
        figure.add_trace(go.Scatter(x=taus, y=[r["miou"] for r in points], mode="lines+markers", name="agreement (mIoU %)",
                                    line={"color": _PALETTE[0]}, legendgroup="agreement", showlegend=first), row=1, col=col)
        figure.add_trace(go.Scatter(x=taus, y=[_percent(r["gflops"], base["gflops"]) for r in points], mode="lines+markers",
                                    name="GFLOPs (% of baseline)", line={"color": _PALETTE[2]}, legendgroup="gflops",
                                    showlegend=first), row=2, col=col)
        figure.add_trace(go.Scatter(x=taus, y=[_percent(r["tokens"]["global"], base["tokens"]["patches"]) for r in points],
                                    mode="lines+markers", name="tokens after GBM (% of patches)",
                                    line={"color": _PALETTE[3], "dash": "dash"}, legendgroup="tokens", showlegend=first),
                         row=2, col=col)
        if not isinstance(current[stage], float):  # the official online τ: no point on this axis
            figure.update_xaxes(title_text=f"τ {stage}", row=2, col=col)
            continue
        here = [r for r in points if math.isclose(r[f"{stage}_threshold"], current[stage], abs_tol=1e-6)]
        if here:
            figure.add_trace(go.Scatter(x=[current[stage]], y=[here[0]["miou"]], mode="markers", name="current setting",
                                        marker={"symbol": "star", "size": 14, "color": "orange", "line": {"color": "black", "width": 1}},
                                        legendgroup="current", showlegend=first), row=1, col=col)
        figure.add_vline(x=current[stage], line={"color": "orange", "width": 2}, row="all", col=col)
        figure.update_xaxes(title_text=f"τ {stage}", row=2, col=col)
    figure.update_yaxes(title_text="agreement (mIoU %)", row=1, col=1)
    figure.update_yaxes(title_text="% of baseline", row=2, col=1)
    figure.update_layout(title="This image: agreement with the baseline and cost against τ, one stage at a time",
                         hovermode="x unified", legend={"orientation": "h", "y": -0.18}, margin={"t": 80})
    return figure


def delta_figure(rows: Sequence[Row], current: float | None = None, title: str = "Data set: ΔmIoU and speed-up against τ",
                 subtitle: str | None = None) -> go.Figure:
    """Sweep rows as ΔmIoU (points against the baseline; error bars: the paired bootstrap interval where
    the rows have one) over speed-up (× the baseline's images/s), both against τ, one colour per τ method,
    plain method names in the legend; ``current`` τ as a vertical line (named in the legend, not written
    over the curves); ``subtitle``: a second, smaller title line."""
    base = next((r for r in rows if r["method"] == "baseline"), None)
    if base is None:
        raise ValueError("delta_figure needs the baseline row")
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4])
    tau_methods = [m for m in _methods(rows) if any(r["method"] == m and row_threshold(r) is not None for r in rows)]
    for color, method in zip(_PALETTE * 4, tau_methods):
        points = sorted((r for r in rows if r["method"] == method and row_threshold(r) is not None
                         and r.get("value") not in ("auto", "official")), key=row_threshold)
        deltas = [r["delta_miou"] if r.get("delta_miou") is not None else r["miou"] - base["miou"] for r in points]
        taus = [row_threshold(r) for r in points]
        name = method_label(method)
        figure.add_trace(go.Scatter(x=taus, y=deltas, mode="lines+markers", name=name, line={"color": color},
                                    legendgroup=method, error_y=_delta_error(points), text=[_delta_text(r) for r in points],
                                    hovertemplate="τ %{x}<br>ΔmIoU %{y:+.2f}<extra>" + name + "</extra>"), row=1, col=1)
        figure.add_trace(go.Scatter(x=taus, y=[r["images_per_s"] / base["images_per_s"] for r in points],
                                    mode="lines+markers", name=f"{name}: speed-up", line={"color": color, "dash": "dash"},
                                    legendgroup=method, showlegend=False,
                                    hovertemplate="τ %{x}<br>%{y:.2f}×<extra>" + name + "</extra>"), row=2, col=1)
    figure.add_hline(y=0.0, line={"color": "black", "width": 1}, row=1, col=1)
    figure.add_hline(y=1.0, line={"color": "black", "width": 1}, row=2, col=1)
    if current is not None:
        figure.add_vline(x=float(current), line={"color": "orange", "width": 2})
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "orange", "width": 2},
                                    name=f"current τ local {float(current):.3f}"), row=1, col=1)
    figure.update_yaxes(title_text="ΔmIoU (points)", row=1, col=1)
    figure.update_yaxes(title_text="speed-up (×)", row=2, col=1)
    figure.update_xaxes(title_text="similarity threshold τ", row=2, col=1)
    second_line = f"<br><sup>{subtitle}</sup>" if subtitle else ""
    figure.update_layout(title=f"{title} (baseline mIoU {base['miou']:.1f} %){second_line}", hovermode="x unified",
                         legend={"orientation": "h", "y": -0.2})
    return figure


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else math.nan


def _methods(rows: Iterable[Row]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline"))


def _error_bars(centres: Sequence[float], intervals: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Plotly asymmetric error bars from each ``[low, high]`` interval around its centre."""
    return {
        "type": "data",
        "symmetric": False,
        "array": [high - c for c, (_, high) in zip(centres, intervals)],
        "arrayminus": [c - low for c, (low, _) in zip(centres, intervals)],
    }


def _spread(rows: Sequence[Row]) -> dict[str, Any] | None:
    """Throughput error bars from each row's ``[p25, p75]`` (None when a row has none)."""
    spreads = [r.get("images_per_s_spread") for r in rows]
    if any(s is None for s in spreads):
        return None
    return _error_bars([r["images_per_s"] for r in rows], spreads)


def _delta_error(rows: Sequence[Row]) -> dict[str, Any] | None:
    """mIoU error bars from each row's paired bootstrap interval of ΔmIoU, placed around its mIoU (None when a
    row has no interval)."""
    intervals = [r.get("delta_miou_ci") for r in rows]
    if not rows or any(ci is None or r.get("delta_miou") is None for ci, r in zip(intervals, rows)):
        return None
    return _error_bars([r["delta_miou"] for r in rows], intervals)


def _delta_text(row: Row) -> str:
    """``ΔmIoU -0.81 [-1.52, -0.10]`` (empty without an interval)."""
    ci = row.get("delta_miou_ci")
    if ci is None or row.get("delta_miou") is None:
        return ""
    return f"ΔmIoU {row['delta_miou']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def threshold_figure(rows: Sequence[Row], current: float | None = None, quality_label: str = "mIoU (%)") -> go.Figure:
    """mIoU (left axis, solid, error bars = the paired bootstrap interval of ΔmIoU against the baseline where the
    rows have one) and images/s (right axis, dashed, p25–p75 error bars) against τ, one colour per τ method
    (methods with another knob are left out); a calibrated (local, global) pair (``value`` = ``"auto"``) as a
    star at its local τ, the official code's mode (``"official"``) as a diamond at its local τ (GBM only: the
    mean online GBM τ); the baseline as horizontal reference lines; ``current`` τ as a vertical marker."""
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    tau_methods = [m for m in _methods(rows) if any(r["method"] == m and row_threshold(r) is not None for r in rows)]
    for color, method in zip(_PALETTE * 4, tau_methods):
        measured = [r for r in rows if r["method"] == method and row_threshold(r) is not None]
        points = sorted((r for r in measured if r.get("value") not in ("auto", "official")), key=row_threshold)
        taus = [row_threshold(r) for r in points]
        figure.add_trace(
            go.Scatter(x=taus, y=[r["miou"] for r in points], mode="lines+markers", name=f"{method_label(method)}: {quality_label}",
                       line={"color": color}, legendgroup=method, error_y=_delta_error(points),
                       text=[_delta_text(r) for r in points]),
            secondary_y=False,
        )
        figure.add_trace(
            go.Scatter(x=taus, y=[r["images_per_s"] for r in points], mode="lines+markers", name=f"{method_label(method)}: images/s",
                       line={"color": color, "dash": "dash"}, marker={"symbol": "diamond"}, error_y=_spread(points),
                       legendgroup=method),
            secondary_y=True,
        )
        for row in (r for r in measured if r.get("value") in ("auto", "official")):
            if row["value"] == "auto":
                pair = f"the calibrated τ: local {row['local_threshold']:.3f}, global {row['global_threshold']:.3f}"
            else:
                pair = _label(row)
            figure.add_trace(
                go.Scatter(x=[row_threshold(row)], y=[row["miou"]], mode="markers", name=f"{method_label(method)} at {pair}",
                           marker={"color": color, "symbol": "star" if row["value"] == "auto" else "diamond-wide",
                                   "size": 14, "line": {"color": "black", "width": 1}},
                           legendgroup=method, error_y=_delta_error([row]), text=[_delta_text(row)]),
                secondary_y=False,
            )
    for base in (r for r in rows if r["method"] == "baseline"):
        figure.add_hline(y=base["miou"], line={"color": "black", "width": 1}, secondary_y=False,
                         annotation_text=f"baseline {quality_label} {base['miou']:.2f}", annotation_position="bottom left")
        figure.add_hline(y=base["images_per_s"], line={"color": "gray", "width": 1, "dash": "dot"}, secondary_y=True,
                         annotation_text=f"baseline {base['images_per_s']:.2f} images/s", annotation_position="top left")
    if current is not None:
        figure.add_vline(x=float(current), line={"color": "orange", "width": 2}, annotation_text=f"τ = {float(current):.3f}")
    figure.update_xaxes(title_text="similarity threshold τ")
    figure.update_yaxes(title_text=quality_label, secondary_y=False)
    figure.update_yaxes(title_text="throughput (images/s)", secondary_y=True)
    figure.update_layout(title="Quality and throughput against τ", hovermode="x unified", legend={"orientation": "h", "y": -0.2})
    return figure


def pareto_figure(rows: Sequence[Row], x: str = "gflops") -> go.Figure:
    """mIoU against ``x`` (``"gflops"`` or ``"images_per_s"``), one trace per method (error bars: the paired
    bootstrap interval of ΔmIoU where the rows have one); the baseline as a star."""
    labels = {"gflops": "GFLOPs per image", "images_per_s": "throughput (images/s)"}
    if x not in labels:
        raise ValueError(f"x must be one of {sorted(labels)}, got {x!r}")
    figure = go.Figure()
    for color, method in zip(_PALETTE * 4, _methods(rows)):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r[x])
        figure.add_trace(go.Scatter(
            x=[r[x] for r in points], y=[r["miou"] for r in points], mode="lines+markers", name=method_label(method),
            line={"color": color}, text=[" ".join(filter(None, (_label(r), _delta_text(r)))) for r in points],
            hovertemplate="%{text}<br>%{x:.3g}<br>mIoU %{y:.2f}<extra>" + method + "</extra>", error_y=_delta_error(points),
        ))
    base = [r for r in rows if r["method"] == "baseline"]
    if base:
        figure.add_trace(go.Scatter(x=[r[x] for r in base], y=[r["miou"] for r in base], mode="markers", name="baseline",
                                    marker={"symbol": "star", "size": 14, "color": "black"}))
    figure.update_layout(title=f"mIoU against {labels[x]}", xaxis_title=labels[x], yaxis_title="mIoU (%)")
    return figure


def balance_figure(stats: dict[str, Any], class_names: Sequence[str] | None = None) -> go.Figure:
    """Per class, share of tokens and of attention received, without and with ALGM (from
    :func:`algm_viz.evaluation.balance.attention_balance`); classes without tokens are left out."""
    base = stats["baseline"]
    present = [c for c, n in enumerate(base["token_count"]) if n > 0]
    names = [class_names[c] if class_names else str(c) for c in present]
    figure = go.Figure()
    runs = [("baseline", base, ("#9ecae1", "#08519c"))]
    if stats.get("algm") is not None:
        runs.append(("ALGM", stats["algm"], ("#fcbba1", "#a50f15")))
    title = []
    for label, run, (light, dark) in runs:
        figure.add_trace(go.Bar(x=names, y=[100 * run["token_share"][c] for c in present], name=f"{label}: tokens",
                                marker_color=light))
        figure.add_trace(go.Bar(x=names, y=[100 * run["attention_share"][c] for c in present], name=f"{label}: attention",
                                marker_color=dark))
        title.append(f"{label}: entropy {run['entropy']:.3f}, Gini {run['gini']:.3f}")
    figure.update_layout(barmode="group", title="Attention balance — " + "; ".join(title),
                         yaxis_title="share (%)", xaxis_title="class")
    return figure


def similarity_figure(result: dict[str, Any]) -> go.Figure:
    """Intra- vs inter-class cosine similarity (paper Fig. 2): (a) in k×k windows of the local layer,
    (b) over all token pairs per layer (from :func:`algm_viz.evaluation.similarity.similarity_analysis`)."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=(f"(a) k×k windows, layer {result['local_layer']}",
                                                           "(b) all token pairs, per layer"))
    local, layers = result["local"], result["global"]
    sizes = [f"{k}×{k}" for k in local]
    layer_ids = [int(layer) for layer in layers]
    for kind, color in (("intra", "#2ca02c"), ("inter", "#d62728")):
        figure.add_trace(go.Bar(x=sizes, y=[v[kind] for v in local.values()], name=f"{kind}-class", marker_color=color,
                                legendgroup=kind), row=1, col=1)
        figure.add_trace(go.Scatter(x=layer_ids, y=[v[kind] for v in layers.values()], mode="lines+markers",
                                    name=f"{kind}-class", line={"color": color}, legendgroup=kind, showlegend=False),
                         row=1, col=2)
    figure.update_xaxes(title_text="window", row=1, col=1)
    figure.update_xaxes(title_text="layer", row=1, col=2)
    figure.update_yaxes(title_text="mean cosine similarity", row=1, col=1)
    figure.update_layout(title="Cosine similarity of intra- and inter-class tokens", barmode="group")
    return figure


def rows_to_csv(rows: Sequence[Row], path: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """Write sweep rows as CSV, one column per scalar, per token stage and per class IoU."""
    num_classes = max((len(r.get("per_class_iou", ())) for r in rows), default=0)
    classes = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    header = ["method", "local_threshold", "global_threshold", "knob", "value", "miou", "miou_low", "miou_high",
              "delta_miou", "delta_miou_low", "delta_miou_high", "images", "images_per_s", "images_per_s_p25",
              "images_per_s_p75", "gflops", "flops_images", "tokens_patches", "tokens_local", "tokens_global",
              "tokens_final", "tokens_by_stage", "thresholds_used"]
    header += [f"iou_{name}" for name in classes]
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in rows:
            spread = r.get("images_per_s_spread") or [math.nan, math.nan]
            miou_ci = r.get("miou_ci") or [None, None]
            delta_ci = r.get("delta_miou_ci") or [None, None]
            tokens = r.get("tokens", {})
            stages = " ".join(f"{s['name']}:{s['tokens']:.1f}" for s in r.get("stages", ()))
            used = " ".join(f"{name}:{value:.4f}" for name, value in (r.get("thresholds_used") or {}).items())
            writer.writerow([r["method"], r.get("local_threshold"), r.get("global_threshold"), r.get("knob"),
                             r.get("value"), r["miou"], *miou_ci, r.get("delta_miou"), *delta_ci, r.get("images"),
                             r["images_per_s"], spread[0], spread[1], r.get("gflops"), r.get("flops_images"),
                             *(tokens.get(stage) for stage in ("patches", "local", "global", "final")), stages, used,
                             *r.get("per_class_iou", ())])
    return path


def write_html(figures: Sequence[go.Figure], path: str | Path, title: str = "algm-viz") -> Path:
    """Write ``figures`` into one self-contained interactive HTML page (plotly.js embedded once)."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    path = Path(path)
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
                    + "\n".join(parts) + "</body></html>", encoding="utf-8")
    return path
