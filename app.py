"""Launch the algm-viz web app: ``python app.py [--host HOST] [--port PORT]``.

Host and port also come from ``ALGM_VIZ_HOST``/``ALGM_VIZ_PORT`` or, as Hugging Face Spaces set them,
``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` (default 127.0.0.1:7860); CPU threads from ``--threads`` or
``ALGM_VIZ_THREADS``; ``--mcp`` (or ``ALGM_VIZ_MCP=1``) also serves the endpoints as MCP tools.
Checkpoints from server-side folders load only on a loopback host without ``--share``, unless
``--allow-server-paths`` (or ``ALGM_VIZ_ALLOW_SERVER_PATHS=1``); uploads are limited to 1 GiB each.
The same file is the Space's app.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from algm_viz.app import build_demo
from algm_viz.app.files import exit_on_sigterm
from algm_viz.app.gpu import BASE_CALL_S, MAX_CALL_S, on_zero_gpu
from algm_viz.app.models import ALLOW_SERVER_PATHS_ENV, MAX_UPLOAD_BYTES, ModelRegistry, server_paths_allowed
from algm_viz.app.ui import APP_CSS, Handlers
from algm_viz.evaluation.inference import DTYPES


def _parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=env("ALGM_VIZ_HOST") or env("GRADIO_SERVER_NAME") or "127.0.0.1")
    parser.add_argument("--port", type=int, default=int(env("ALGM_VIZ_PORT") or env("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--threads", type=int, default=int(env("ALGM_VIZ_THREADS") or 0),
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared CPU)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--mcp", action="store_true", default=env("ALGM_VIZ_MCP", "").lower() in ("1", "true"),
                        help="also serve the named endpoints as MCP tools at /gradio_api/mcp/ (or ALGM_VIZ_MCP=1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=env("ALGM_VIZ_DTYPE") or "fp32",
                        help="precision of the model's forwards (autocast; or ALGM_VIZ_DTYPE); bf16/fp16 halve "
                             "the GPU's work, within the tolerance README states")
    parser.add_argument("--allow-server-paths", action="store_true",
                        help="let users load checkpoints from server-side folders even on a non-loopback host or "
                             f"with --share (or {ALLOW_SERVER_PATHS_ENV}=1); uploads always load")
    args = parser.parse_args()
    if args.dtype not in DTYPES:
        parser.error(f"--dtype / ALGM_VIZ_DTYPE must be one of {', '.join(sorted(DTYPES))}, got {args.dtype!r}")
    return args


if __name__ == "__main__":
    args = _parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    exit_on_sigterm()  # so that exit handlers remove the temporary folders
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    registry = ModelRegistry(allow_paths=server_paths_allowed(args.host, args.share, args.allow_server_paths),
                             dtype=DTYPES[args.dtype])
    # On ZeroGPU, CUDA work runs only inside spaces.GPU calls: no pre-run in the main process, and a long
    # request stops (between configurations) before the longest GPU reservation a call asks for runs out.
    zero_gpu = on_zero_gpu()
    handlers = Handlers(registry, long_budget_s=MAX_CALL_S - BASE_CALL_S) if zero_gpu else Handlers(registry)
    demo = build_demo(handlers, prerun=not zero_gpu).queue(max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, mcp_server=args.mcp,
                max_file_size=MAX_UPLOAD_BYTES, css=APP_CSS)
