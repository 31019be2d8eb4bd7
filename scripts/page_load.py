"""Page load to first results: how long a visitor waits before the opening example's results are on screen.

Starts ``python app.py`` on a free loopback port (:class:`algm_viz.serving.AppServer`), then, for each of ``--loads`` page loads, a fresh headless
Chromium opens the page and records (milliseconds after ``goto``): the HTML's ``DOMContentLoaded``, the
moment Gradio has rendered the readout component, the moment the readout holds the example's results, and
the moment the view's pictures (merge maps, superpixels, segmentation) are displayed.
Prints one JSON object with every load and the medians.

    python scripts/page_load.py --loads 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from playwright import sync_api

from algm_viz.serving import CHROMIUM, CHROMIUM_ARGS, VIEW_PICTURES_SHOWN, AppServer


def measure_load(url: str, timeout_ms: int = 120_000) -> dict[str, float]:
    """One page load in a fresh browser -> ``{"dom_ms", "rendered_ms", "results_ms", "pictures_ms"}`` after ``goto``."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        began = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
        dom = time.perf_counter()
        page.wait_for_selector("#readout", state="attached", timeout=timeout_ms)
        rendered = time.perf_counter()
        page.wait_for_function("(document.querySelector('#readout')?.innerText || '').includes('Tokens')",
                               timeout=timeout_ms, polling=20)
        results = time.perf_counter()
        page.wait_for_function(VIEW_PICTURES_SHOWN, timeout=timeout_ms, polling=20)
        pictures = time.perf_counter()
        browser.close()
    return {name: round(1e3 * (moment - began), 1)
            for name, moment in (("dom_ms", dom), ("rendered_ms", rendered), ("results_ms", results), ("pictures_ms", pictures))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="wait after the server answers, so the opening example's background pre-run is done")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="algm_viz_page_load_"))
    server = AppServer(root, args.threads)
    try:
        time.sleep(args.settle_s)
        loads = [measure_load(server.url) for _ in range(args.loads)]
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    medians = {key: statistics.median(load[key] for load in loads) for key in loads[0]}
    print(json.dumps({"loads": loads, "median": medians, "load_average": os.getloadavg(),
                      "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
