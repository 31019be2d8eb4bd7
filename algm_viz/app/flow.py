"""Tokens and GFLOPs per encoder layer for one image: baseline, ALGM at the current setting, and ToMe with the
r that ends at ALGM's final token count."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from ..evaluation.flow import layer_flow
from ..methods import apply_method
from ..patch import apply_algm, merging_restored, remove_algm
from .session import ImageSession, Settings

__all__ = ["flow", "flow_figure"]


def flow(session: ImageSession, settings: Settings) -> dict[str, Any]:
    """``{"baseline", "algm", "tome": layer_flow(...), "tome_r"}`` for the session's image (three counted forwards)."""
    entry = session.entry
    model = entry.model
    with entry.lock, merging_restored(model):
        remove_algm(model)
        baseline = layer_flow(model, session.tensor)
        apply_algm(model, settings.local_layer, settings.global_layer, (settings.window, settings.window),
                   settings.local_threshold, settings.global_threshold, prop_attn=settings.prop_attn)
        algm = layer_flow(model, session.tensor)
        r = max(0, round((baseline["mlp_tokens"][-1] - algm["mlp_tokens"][-1]) / entry.depth))
        apply_method(model, "tome", r)
        tome = layer_flow(model, session.tensor)
    return {"baseline": baseline, "algm": algm, "tome": tome, "tome_r": r}


def flow_figure(result: dict[str, Any]) -> go.Figure:
    """Tokens the MLP of each layer sees (lines) and each layer's GFLOPs (dotted, right axis)."""
    layers = list(range(1, len(result["baseline"]["gflops"]) + 1))
    figure = go.Figure()
    styles = {"baseline": "#7f7f7f", "algm": "#1f77b4", "tome": "#ff7f0e"}
    names = {"baseline": "baseline", "algm": "ALGM", "tome": f"ToMe (r = {result['tome_r']}, same final tokens)"}
    for key, color in styles.items():
        figure.add_trace(go.Scatter(x=layers, y=result[key]["mlp_tokens"], mode="lines+markers", name=f"{names[key]} tokens",
                                    line={"color": color, "shape": "hv"}))
        figure.add_trace(go.Scatter(x=layers, y=result[key]["gflops"], mode="lines", name=f"{names[key]} GFLOPs",
                                    line={"color": color, "dash": "dot"}, yaxis="y2"))
    figure.update_layout(title="Tokens (after each layer's merging) and GFLOPs per encoder layer",
                         xaxis={"title": "encoder layer", "dtick": 1}, yaxis={"title": "tokens"},
                         yaxis2={"title": "GFLOPs", "overlaying": "y", "side": "right", "showgrid": False},
                         height=380, legend={"orientation": "h", "y": -0.25})
    return figure
