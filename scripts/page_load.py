"""Page load to first results: how long a visitor waits before the opening example's results are on screen.

Starts ``python app.py`` on a free loopback port, then, for each of ``--loads`` page loads, a fresh headless
Chromium opens the page and records (milliseconds after ``goto``): the HTML's ``DOMContentLoaded``, the
moment Gradio has rendered the readout component, and the moment the readout holds the example's results.
Prints one JSON object with every load and the medians.

    python scripts/page_load.py --loads 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright import sync_api

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not serve {url} within {timeout_s} s")


def measure_load(url: str, timeout_ms: int = 120_000) -> dict[str, float]:
    """One page load in a fresh browser -> ``{"dom_ms", "rendered_ms", "results_ms"}`` after ``goto``."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        began = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
        dom = time.perf_counter()
        page.wait_for_selector("#readout", state="attached", timeout=timeout_ms)
        rendered = time.perf_counter()
        page.wait_for_function("(document.querySelector('#readout')?.innerText || '').includes('Tokens')",
                               timeout=timeout_ms, polling=20)
        results = time.perf_counter()
        browser.close()
    return {name: round(1e3 * (moment - began), 1)
            for name, moment in (("dom_ms", dom), ("rendered_ms", rendered), ("results_ms", results))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="wait after the server answers, so the opening example's background pre-run is done")
    args = parser.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--threads", str(args.threads)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_serving(url, process)
        time.sleep(args.settle_s)
        loads = [measure_load(url) for _ in range(args.loads)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    medians = {key: statistics.median(load[key] for load in loads) for key in loads[0]}
    print(json.dumps({"loads": loads, "median": medians, "load_average": os.getloadavg(),
                      "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
