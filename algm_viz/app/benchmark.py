"""Time the app's work: ``python -m algm_viz.app.benchmark [--model KEY] [--image PATH] [--api]``.

Measures, for one image: the first request (preprocessing, baseline forward, GFLOPs), the per-image τ
curve, and τ releases (ALGM forward + GFLOPs + overlays + readout + curve re-plot with the new τ marker;
the attention balance, which the app computes after these, is timed separately). With ``--api`` the
τ releases also go through a launched server and ``gradio_client``, encoding and transfer included.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from ..timing import time_once
from .models import ModelRegistry
from .ui import EXAMPLES_DIR, Handlers, build_demo


def _seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one handler call (handlers hand back host data, so no device to synchronise)."""
    return time_once(fn, "cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(model: str, image: str, taus: list[float], window: int, global_layer: int, api: bool, device: str | None) -> dict[str, Any]:
    handlers = Handlers(ModelRegistry(device=device))
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
        port = _free_port()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="registry key (default: the app's default model)")
    parser.add_argument("--image", default=str(EXAMPLES_DIR / "astronaut.png"))
    parser.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.85, 0.8, 0.75, 0.7, 0.95])
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--global-layer", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--api", action="store_true", help="also time τ releases through a server and gradio_client")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not Path(args.image).is_file():
        parser.error(f"no image {args.image}")
    model = args.model or ModelRegistry(device="cpu").default_key()
    print(json.dumps(run(model, args.image, args.taus, args.window, args.global_layer, args.api, args.device), indent=2))


if __name__ == "__main__":
    main()
