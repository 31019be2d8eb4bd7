"""``algm-viz app-bench``: time the app's work on one image (first request, per-image τ curve, τ releases;
with ``--api`` also through a launched server and ``gradio_client``); prints one JSON document.

See :mod:`algm_viz.app.benchmark` for what each figure covers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..app.benchmark import run as benchmark_app  # the app (Gradio) loads only for this command
    from ..app.models import ModelRegistry
    from ..app.ui import EXAMPLES_DIR

    image = args.image or str(EXAMPLES_DIR / "astronaut.png")
    if not Path(image).is_file():
        raise FileNotFoundError(f"no image {image}")
    model = args.model or ModelRegistry(device="cpu").default_key()
    result = benchmark_app(model, image, args.taus, args.window, args.global_layer, args.api, args.device)
    print(json.dumps(result, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("app-bench", help="time the app's work on one image (prints JSON)", description=__doc__)
    parser.add_argument("--model", default=None, help="registry key (default: the app's default model)")
    parser.add_argument("--image", help="the image (default: the app's astronaut example)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.9, 0.85, 0.8, 0.75, 0.7, 0.95])
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--global-layer", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--api", action="store_true", help="also time τ releases through a launched server and gradio_client")
    parser.set_defaults(run=run)
