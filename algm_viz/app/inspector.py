"""The token inspector's view of one clicked point: outlined picture, similarity and attention figures, readout.

Computed from an :class:`ImageSession`'s cached forwards (their :class:`~algm_viz.inspector.TokenCapture`),
free of Gradio, so the handler, the API and the tests share it. Points are in pixels of the model input
(the frame of every picture the app shows; the readout's ``image_size``).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import plotly.graph_objects as go

from .. import render
from ..datasets import IGNORE_INDEX
from ..inspector import Inspection, class_shares, inspect_patch
from .session import ImageSession, Settings

__all__ = ["InspectorView", "inspect", "patch_at", "readout_markdown", "similarity_figure", "attention_figure",
           "to_model_frame"]

#: Stage names of the merge record and how the app calls them.
STAGE_LABELS = {"local": "CLAP", "global": "GBM"}
#: Long side of the background picture inside the figures (a small JPEG keeps the figure light).
FIGURE_IMAGE_SIDE = 320


@dataclass
class InspectorView:
    """``picture`` ``[H, W, 3]`` uint8 (model input with the window, group and patch outlined), the two
    figures, and the readout (JSON-ready, maps included as nested lists)."""

    picture: np.ndarray
    similarity: go.Figure
    attention: go.Figure
    readout: dict[str, Any]


def to_model_frame(x: float, y: float, shown: tuple[int, int], model: tuple[int, int]) -> tuple[float, float]:
    """Point ``(x, y)`` in a picture shown at ``shown`` = ``(H, W)`` pixels -> pixels of the model input ``(H, W)``."""
    return x * model[1] / max(shown[1], 1), y * model[0] / max(shown[0], 1)


def patch_at(x: Any, y: Any, shape: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Grid ``(row, col)`` of the patch holding pixel ``(x, y)`` of an image of ``shape`` ``(H, W)``;
    ``ValueError`` for a point that is no number or lies outside the image."""
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise ValueError(f"the point must be two numbers (x, y), got {x!r}, {y!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= x < shape[1] and 0 <= y < shape[0]):
        raise ValueError(f"the point ({x:g}, {y:g}) lies outside the {shape[1]}×{shape[0]} model input")
    return int(y) // patch_size, int(x) // patch_size


def _data_uri(image: np.ndarray) -> tuple[str, float]:
    """``image`` as a small JPEG data URI, and the model-input pixels per pixel of it."""
    scale = FIGURE_IMAGE_SIDE / max(image.shape[:2])
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    _, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode(), image.shape[1] / small.shape[1]


def _map_figure(image: np.ndarray, maps: dict[str, np.ndarray], patch_size: int, patch: tuple[int, int],
                colorscale: str, zrange: tuple[float, float], colorbar: dict[str, Any], title: str,
                contours: dict[str, float] | None = None) -> go.Figure:
    """Heat maps of ``[gh, gw]`` ``maps`` over ``image``, side by side with one colour bar; the clicked
    ``patch`` marked; ``contours[title]`` draws that map's level line (τ). Built as a plain figure dict
    (plotly's per-property validation would take most of a click's time)."""
    height, width = image.shape[:2]
    source, factor = _data_uri(image)
    centre = (patch_size - 1) / 2
    placement = {"x0": centre, "dx": patch_size, "y0": centre, "dy": patch_size}
    gap, columns = 0.04, len(maps)
    span = (1.0 - gap * (columns - 1)) / columns
    data, layout = [], {
        "title": {"text": title}, "height": 340, "margin": {"l": 10, "r": 10, "t": 70, "b": 10}, "showlegend": False,
        "coloraxis": {"colorscale": colorscale, "cmin": zrange[0], "cmax": zrange[1], "colorbar": colorbar},
        "annotations": [],
    }
    for column, (name, grid_map) in enumerate(maps.items()):
        suffix = "" if column == 0 else str(column + 1)
        axes = {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}
        grid_map = np.asarray(grid_map, dtype=float).round(5).tolist()
        data.append({"type": "image", "source": source, "dx": factor, "dy": factor, "hoverinfo": "skip", **axes})
        data.append({"type": "heatmap", "z": grid_map, **placement, "coloraxis": "coloraxis", "opacity": 0.65,
                     "hovertemplate": "%{z:.3f}<extra></extra>", **axes})
        if contours and name in contours:
            level = contours[name]
            data.append({"type": "contour", "z": grid_map, **placement, "showscale": False, "hoverinfo": "skip",
                         "contours": {"coloring": "lines", "start": level, "end": level, "size": 1},
                         "colorscale": [[0, "white"], [1, "white"]], "line": {"width": 2}, **axes})
        data.append({"type": "scatter", "x": [patch[1] * patch_size + centre], "y": [patch[0] * patch_size + centre],
                     "mode": "markers", "hoverinfo": "skip",
                     "marker": {"symbol": "x-thin", "size": 12, "line": {"width": 3, "color": "red"}}, **axes})
        low = column * (span + gap)
        layout[f"xaxis{suffix}"] = {"domain": [low, low + span], "range": [0, width], "showticklabels": False,
                                    "showgrid": False, "zeroline": False, "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {"range": [height, 0], "showticklabels": False, "showgrid": False, "zeroline": False,
                                    "scaleanchor": f"x{suffix}", "anchor": f"x{suffix}"}
        layout["annotations"].append({"text": name, "x": low + span / 2, "y": 1.0, "xref": "paper", "yref": "paper",
                                      "xanchor": "center", "yanchor": "bottom", "showarrow": False})
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def similarity_figure(image: np.ndarray, inspection: Inspection, patch_size: int) -> go.Figure:
    """Cosine similarity of the clicked patch's token to every patch at each stage's layer, τ marked on the
    colour bar and drawn as a white level line (inside it the stage would merge with the clicked token)."""
    maps = {f"{STAGE_LABELS.get(s, s)} layer (τ {inspection.thresholds.get(s, math.nan):.3f})": m
            for s, m in inspection.similarity.items()}
    low = min([float(m.min()) for m in inspection.similarity.values()] + [0.0])
    taus: dict[float, list[str]] = {}  # one tick per τ value, naming the stages that use it
    for stage, tau in inspection.thresholds.items():
        if low <= tau <= 1.0:
            taus.setdefault(tau, []).append(STAGE_LABELS.get(stage, stage))
    ticks = sorted({round(low, 1), *np.round(np.linspace(low, 1.0, 5), 1).tolist(), 1.0})
    ticks = [t for t in ticks if all(abs(t - tau) > 0.06 for tau in taus)]
    colorbar = {"title": {"text": "cosine<br>similarity"},
                "tickvals": ticks + list(taus),
                "ticktext": [f"{t:.1f}" for t in ticks] + [f"<b>τ {', '.join(names)} {tau:.3f}</b>" for tau, names in taus.items()]}
    contours = {title: inspection.thresholds[s] for title, s in zip(maps, inspection.similarity) if s in inspection.thresholds}
    return _map_figure(image, maps, patch_size, inspection.patch, "Viridis", (low, 1.0), colorbar,
                       "Similarity of the clicked token to every patch (white line: τ)", contours)


def attention_figure(image: np.ndarray, inspection: Inspection, patch_size: int, layer: int) -> go.Figure:
    """Where the clicked patch attends in encoder layer ``layer``, baseline beside ALGM (per patch; a merged
    token's weight spread over its patches)."""
    names = {"baseline": "baseline", "merged": "ALGM"}
    maps = {f"{names[k]} (class token {100 * inspection.attention_prefix[k]:.1f} %)": m
            for k, m in inspection.attention.items()}
    high = max([float(m.max()) for m in inspection.attention.values()] + [1e-9])
    return _map_figure(image, maps, patch_size, inspection.patch, "Inferno", (0.0, high),
                       {"title": {"text": "attention<br>per patch"}},
                       f"Where the clicked patch attends in layer {layer} (mean over heads)")


def _share_list(shares: dict[int, float], names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"class": c, "name": names[c], "share": s} for c, s in shares.items()]


def inspect(session: ImageSession, settings: Settings, x: Any, y: Any) -> InspectorView:
    """Everything the inspector shows for point ``(x, y)`` (model-input pixels) under ``settings``, from the
    session's cached forwards (the forwards run only where the cache has none)."""
    entry, image, p = session.entry, session.image, session.entry.patch_size
    row, col = patch_at(x, y, image.shape[:2], p)
    base, algm = session.baseline(), session.algm(settings)
    inspection = inspect_patch(entry.model, algm.capture, base.capture, row, col)
    from_label = session.label is not None
    classes = session.label if from_label else base.prediction
    pixels = render.upsample_grid(inspection.group, p, image.shape[:2])
    num_classes = entry.model.num_classes
    group_classes = class_shares(classes, pixels, num_classes, IGNORE_INDEX)
    window_classes = class_shares(classes, render.upsample_grid(inspection.window, p, image.shape[:2]), num_classes,
                                  IGNORE_INDEX) if inspection.window.any() else {}
    readout: dict[str, Any] = {
        "point": [float(x), float(y)],
        "patch": {"row": row, "col": col, "index": row * inspection.group.shape[1] + col},
        "grid": list(inspection.group.shape),
        "patch_size": p,
        "thresholds": inspection.thresholds,
        "window": {"size": settings.window, "patches": int(inspection.window.sum()), "merged": inspection.window_merged,
                   "similarity": inspection.window_similarity,
                   "cells": np.argwhere(inspection.window).tolist()},
        "group": {"patches": int(inspection.group.sum()), "gbm_inputs": inspection.group_inputs,
                  "mean_similarity": {STAGE_LABELS.get(k, k): v for k, v in inspection.group_similarity.items()},
                  "cells": np.argwhere(inspection.group).tolist()},
        "classes_from": "label map" if from_label else "baseline prediction",
        "group_classes": _share_list(group_classes, entry.class_names),
        "window_classes": _share_list(window_classes, entry.class_names),
        "attention_layer": entry.depth,
        "attention_to_class_token": {("algm" if k == "merged" else k): v for k, v in inspection.attention_prefix.items()},
        "similarity": {STAGE_LABELS.get(k, k): np.round(m, 4).tolist() for k, m in inspection.similarity.items()},
        "attention": {("algm" if k == "merged" else k): np.round(m, 6).tolist() for k, m in inspection.attention.items()},
    }
    picture = render.inspector_overlay(image, inspection.window, inspection.group, inspection.patch, p)
    return InspectorView(picture, similarity_figure(image, inspection, p), attention_figure(image, inspection, p, entry.depth),
                         readout)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def readout_markdown(readout: dict[str, Any]) -> str:
    """The inspector's readout as a few lines of Markdown."""
    patch, window, group, tau = readout["patch"], readout["window"], readout["group"], readout["thresholds"]
    if window["patches"] == 0:
        window_text = "in a partial edge window (CLAP never merges it)"
    else:
        verdict = "**merged**" if window["merged"] else "not merged"
        window_text = (f"{window['size']}×{window['size']} window {verdict}: mean similarity {_percent(window['similarity'])}"
                       f" vs τ {tau.get('local', math.nan):.3f}")
    similarity = ", ".join(f"{name} layer {_percent(value)}" for name, value in group["mean_similarity"].items())
    classes = ", ".join(f"{c['name']} {100 * c['share']:.0f} %" for c in readout["group_classes"]) or "no labelled pixels"
    attention = readout["attention_to_class_token"]
    lines = [
        f"**Patch** row {patch['row']}, col {patch['col']} (point {readout['point'][0]:.0f}, {readout['point'][1]:.0f}) · "
        f"**CLAP** {window_text}",
        f"**Merge group** {group['patches']} patch{'es' if group['patches'] != 1 else ''} "
        f"({group['gbm_inputs']} GBM input token{'s' if group['gbm_inputs'] != 1 else ''}) · "
        f"mean pairwise similarity: {similarity}",
        f"**Classes in the group** ({readout['classes_from']}): {classes}",
    ]
    if attention:
        lines.append("**Attention to the class token** (layer {}): ".format(readout["attention_layer"])
                     + " · ".join(f"{name} {100 * value:.1f} %" for name, value in attention.items()))
    return "\n\n".join(lines)
