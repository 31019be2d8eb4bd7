"""Time the app's work (``algm-viz app-bench [--model KEY] [--image PATH] [--api]``).

Measures, for one image: the first request (preprocessing, baseline forward, GFLOPs), the per-image τ
curve, and τ releases (ALGM forward + GFLOPs + overlays + readout + curve re-plot with the new τ marker;
the attention balance, which the app computes after these, is timed separately). With ``--api`` the
τ releases also go through a launched server and ``gradio_client``, encoding and transfer included.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from ..timing import time_once
from .models import ModelRegistry
from ..serving import free_port
from .ui import Handlers, build_demo


def _seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one handler call (handlers hand back host data, so no device to synchronise)."""
    return time_once(fn, "cpu")


def run(model: str, image: str, taus: list[float], window: int, global_layer: int, api: bool, device: str | None,
        registry: ModelRegistry | None = None) -> dict[str, Any]:
    """Seconds of the first request, the curve and the τ releases of ``model`` (a key of ``registry``, by
    default the app's registry on ``device``) on ``image``: the first τ opens the image, the others (shifted
    off the curve's grid) are released; ``api`` adds the same releases through a launched server."""
    handlers = Handlers(registry or ModelRegistry(device=device))
    handlers.registry.get(model)
    args = lambda tau: (model, image, None, tau, tau, window, global_layer)  # noqa: E731
    release = lambda tau: (handlers.analyze(*args(tau)), handlers.curve(*args(tau)))  # noqa: E731
    result: dict[str, Any] = {"model": model, "image": image, "device": str(handlers.registry.device),
                              "torch_threads": torch.get_num_threads(), "curve_thresholds": list(handlers.thresholds)}
    result["first_request_s"] = _seconds(lambda: handlers.analyze(*args(taus[0])))
    result["curve_s"] = _seconds(lambda: handlers.curve(*args(taus[0])))
    fresh = [round(t + 0.0025, 4) for t in taus[1:]]  # off the curve's τ grid: a real recomputation
    releases = [_seconds(lambda tau=tau: release(tau)) for tau in fresh]
    result["tau_release_s"] = {"median": statistics.median(releases), "max": max(releases)}
    result["balance_s"] = _seconds(lambda: handlers.balance(*args(taus[-1])))
    result["readout"] = handlers.analyze(*args(taus[-1]))[6]
    if api:
        from gradio_client import Client, handle_file

        demo = build_demo(handlers).queue()
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)

            def call(tau: float, name: str) -> Any:
                return client.predict(model, handle_file(image), None, tau, tau, window, global_layer, api_name=name)

            call(taus[0], "/analyze")
            fresh = [round(t - 0.0025, 4) for t in taus[1:]]  # not computed yet
            analyze_s = [_seconds(lambda tau=tau: call(tau, "/analyze")) for tau in fresh]
            curve_s = [_seconds(lambda tau=tau: call(tau, "/curve")) for tau in fresh]
            totals = [a + c for a, c in zip(analyze_s, curve_s)]
            result["api_tau_release_s"] = {"median": statistics.median(totals), "max": max(totals),
                                           "analyze_median": statistics.median(analyze_s), "curve_median": statistics.median(curve_s)}
        finally:
            demo.close()
    return result
