"""Page load to first results: how long a visitor waits before the opening example's results are on screen.

Starts ``python app.py`` on a free loopback port (:class:`algm_viz.serving.AppServer`), then, for each of ``--loads`` page
loads, a fresh headless Chromium opens the page. Times are milliseconds after ``goto``, taken two ways:

* ``painted_*``: in the page, at the first animation frame in which the condition holds (a script installed before
  the page's own runs a ``requestAnimationFrame`` loop; a frame that finds the condition true is the frame that
  paints it): the readout component rendered, the readout holding the example's results, the view's pictures
  (merge maps, superpixels, segmentation) decoded, the first Plotly plot drawn and the last of the plots the page
  draws on load.
* ``*_ms`` (``rendered``, ``results``, ``pictures``): when the test driver's polling (Playwright's
  ``wait_for_function``) sees the same conditions. That polling runs on the page's main thread, so it lags while the
  page runs long scripts (Plotly's 4.6 MB bundle is evaluated after the results are on screen): an upper bound.

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


#: Page expressions: the readout is rendered; it holds the example's results.
READOUT_RENDERED = "!!document.querySelector('#readout')"
READOUT_RESULTS = "(document.querySelector('#readout')?.innerText || '').includes('Tokens')"

#: Installed before the page's scripts: ``window.__painted[key]`` = ``performance.now()`` of the first animation
#: frame in which each condition held (``plot_count_N``: the frame in which N Plotly plots were first drawn).
PAINT_PROBE = """(() => {
  const painted = window.__painted = {};
  const conditions = {
    rendered: () => %s,
    results: () => %s,
    pictures: () => %s,
  };
  const frame = () => {
    const now = performance.now();
    for (const [key, holds] of Object.entries(conditions)) if (!(key in painted) && holds()) painted[key] = now;
    const plots = document.querySelectorAll('.js-plotly-plot .main-svg').length;
    if (plots && !(`plot_count_${plots}` in painted)) painted[`plot_count_${plots}`] = now;
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
})()""" % (READOUT_RENDERED, READOUT_RESULTS, VIEW_PICTURES_SHOWN)


def measure_load(url: str, timeout_ms: int = 120_000, plots_settle_s: float = 3.0) -> dict[str, float]:
    """One page load in a fresh browser -> driver-seen ``{dom, rendered, results, pictures}_ms`` and in-page
    ``painted_{rendered, results, pictures, first_plot, plots}_ms``, all after ``goto``; ``plots`` is the frame
    that drew the last plot seen within ``plots_settle_s`` after the pictures."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(PAINT_PROBE)
        began_epoch_ms, began = 1e3 * time.time(), time.perf_counter()
        page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
        dom = time.perf_counter()
        page.wait_for_selector("#readout", state="attached", timeout=timeout_ms)
        rendered = time.perf_counter()
        page.wait_for_function(READOUT_RESULTS, timeout=timeout_ms, polling=20)
        results = time.perf_counter()
        page.wait_for_function(VIEW_PICTURES_SHOWN, timeout=timeout_ms, polling=20)
        pictures = time.perf_counter()
        time.sleep(plots_settle_s)
        origin, painted = page.evaluate("[performance.timeOrigin, window.__painted]")
        browser.close()
    seen = {name: round(1e3 * (moment - began), 1)
            for name, moment in (("dom_ms", dom), ("rendered_ms", rendered), ("results_ms", results), ("pictures_ms", pictures))}
    after_goto = {key: round(origin + moment - began_epoch_ms, 1) for key, moment in painted.items()}
    plot_counts = sorted((int(key.rsplit("_", 1)[1]), moment) for key, moment in after_goto.items() if key.startswith("plot_count_"))
    seen.update({f"painted_{key}_ms": after_goto.get(key) for key in ("rendered", "results", "pictures")})
    seen["painted_first_plot_ms"] = plot_counts[0][1] if plot_counts else None
    seen["painted_plots_ms"] = plot_counts[-1][1] if plot_counts else None
    seen["plots_drawn"] = plot_counts[-1][0] if plot_counts else 0
    return seen


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
    medians = {key: statistics.median(values) for key in loads[0]
               if (values := [load[key] for load in loads if load[key] is not None])}
    print(json.dumps({"loads": loads, "median": medians, "load_average": os.getloadavg(),
                      "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
