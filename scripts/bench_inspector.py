"""Time a token-inspector click: ``python scripts/bench_inspector.py [--image PATH] [--clicks N] [--threads T]``.

In process: the ``/inspect`` handler (cached session and forwards, as after the first view of an image:
inspection, outlined picture saved as PNG, both figures, readout), over ``--clicks`` points spread over the
image. Through ``gradio_client``: the same clicks against a launched app (upload, queue, encoding and
transfer included; the first call, which reads the upload and runs the forwards, is reported apart).
Also the merge-purity handler, in process. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import gradio as gr
import torch
from gradio_client import Client, handle_file

from algm_viz.serving import free_port
from algm_viz.app.inspector_ui import InspectorPanel
from algm_viz.app.models import ModelRegistry
from algm_viz.app.ui import EXAMPLES_DIR, Handlers, build_demo


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(samples), "max_s": max(samples), "n": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(EXAMPLES_DIR / "street_0.png"))
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    handlers = Handlers(ModelRegistry())
    model = handlers.registry.default_key()
    entry = handlers.registry.get(model)
    settings = (entry.auto_thresholds["local"], entry.auto_thresholds["global"], 2, 5, False)
    with gr.Blocks():
        panel = InspectorPanel(handlers)
    session = handlers._session(model, args.image, None)
    height, width = session.image.shape[:2]
    points = [((i * 37) % width + 0.5, (i * 53) % height + 0.5) for i in range(args.clicks)]
    start = time.perf_counter()
    panel.inspect(model, args.image, None, *settings, *points[0])
    first = time.perf_counter() - start
    in_process = []
    for x, y in points:
        start = time.perf_counter()
        panel.inspect(model, args.image, None, *settings, x, y)
        in_process.append(time.perf_counter() - start)
    purity = []
    for _ in range(5):
        start = time.perf_counter()
        panel.purity(model, args.image, None, *settings)
        purity.append(time.perf_counter() - start)

    demo = build_demo(Handlers(handlers.registry)).queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        start = time.perf_counter()
        client.predict(model, handle_file(args.image), None, *settings, *points[0], api_name="/inspect")
        api_first = time.perf_counter() - start
        api = []
        for x, y in points:
            start = time.perf_counter()
            client.predict(model, handle_file(args.image), None, *settings, x, y, api_name="/inspect")
            api.append(time.perf_counter() - start)
    finally:
        demo.close()
    print(json.dumps({
        "model": entry.label, "image": Path(args.image).name, "input": [width, height],
        "patches": session.num_patches, "threads": torch.get_num_threads(), "settings": settings,
        "first_click_in_process_s": first, "click_in_process": _summary(in_process),
        "purity_in_process": _summary(purity),
        "first_click_api_s": api_first, "click_api": _summary(api),
    }, indent=2))


if __name__ == "__main__":
    main()
