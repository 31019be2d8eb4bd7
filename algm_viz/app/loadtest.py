"""``python -m algm_viz.app.loadtest``: load a local app server and check that it stays correct, bounded and responsive.

Starts ``app.py`` on 127.0.0.1 in its own process (fresh temp folders, so its disk use is measurable),
then, through ``gradio_client``:

1. **concurrent**: ``--clients`` clients × ``--requests`` ``/analyze`` requests each (every request its
   own image and τ); each answer is checked against the same request computed alone in this process;
2. **sequential**: ``--sequential`` ``/analyze`` requests, each with a new, distinct image;
3. **τ release during a comparison**: a ``/compare`` is started, and τ releases (``/analyze`` +
   ``/curve`` with a new τ) are timed while it runs, and again after it.

Reports p50/p95 latency, errors, mismatches, the server's RSS and its temp-folder size (files, MB)
before/after, as one JSON document. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..serving import AppServer

__all__ = ["run", "main"]

#: Readout fields that must not depend on what else the server is doing.
CHECKED = ("tokens", "thresholds", "window", "global_layer", "image_size")


def _rss_mb(pid: int) -> dict[str, float]:
    """Current and peak resident memory of process ``pid`` (MB), from ``/proc``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}


def _disk(root: Path) -> dict[str, float]:
    """Files and MB under ``root``."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return {"files": len(files), "mb": sum(p.stat().st_size for p in files) / 2**20}


def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A distinct ``[H, W, 3]`` uint8 picture: a few flat rectangles (mergeable) plus noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = np.empty((height, width, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y:y + rng.integers(20, height), x:x + rng.integers(20, width)] = rng.integers(0, 256, 3)
    return np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_s": None, "p95_s": None, "n": 0}
    ordered = sorted(seconds)
    return {"p50_s": statistics.median(ordered), "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "n": len(ordered)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gradio_client import Client, handle_file

    from .models import ModelRegistry
    from .ui import Handlers

    root = Path(tempfile.mkdtemp(prefix="algm_viz_loadtest_"))
    images = root / "images"
    images.mkdir()
    size = (args.height, args.width)

    def image_file(seed: int) -> str:
        path = images / f"{seed}.png"
        if not path.is_file():
            cv2.imwrite(str(path), _image(seed, size))
        return str(path)

    registry = ModelRegistry(device="cpu")
    model = args.model or registry.default_key()
    local = Handlers(registry)  # the same requests, alone, in this process
    jobs = [(image_file(1000 + i), round(0.70 + 0.0025 * i, 4), (2, 3)[i % 2]) for i in range(args.clients * args.requests)]
    reference = [local.analyze(model, image, None, tau, tau, window, 5)[6] for image, tau, window in jobs]

    server = AppServer(root, args.threads)
    result: dict[str, Any] = {"model": model, "image_size": [args.width, args.height], "server_threads": args.threads}
    try:
        clients = [Client(server.url, verbose=False) for _ in range(args.clients)]
        warm = clients[0].predict(model, handle_file(image_file(0)), None, 0.9, 0.9, 2, 5, api_name="/analyze")
        result["start"] = {**_rss_mb(server.process.pid), **_disk(root / "gradio")}
        del warm

        def call(client: Client, job: tuple[str, float, int]) -> tuple[float, dict[str, Any] | str]:
            image, tau, window = job
            start = time.perf_counter()
            try:
                answer = client.predict(model, handle_file(image), None, tau, tau, window, 5, api_name="/analyze")[6]
            except Exception as error:  # noqa: BLE001 - counted and reported
                return time.perf_counter() - start, f"{type(error).__name__}: {error}"
            return time.perf_counter() - start, answer

        def client_run(index: int) -> list[tuple[int, float, dict[str, Any] | str]]:
            mine = range(index, len(jobs), args.clients)
            return [(j, *call(clients[index], jobs[j])) for j in mine]

        with ThreadPoolExecutor(args.clients) as pool:
            answers = [item for chunk in pool.map(client_run, range(args.clients)) for item in chunk]
        errors = [a for _, _, a in answers if isinstance(a, str)]
        mismatches = [j for j, _, a in answers if not isinstance(a, str) and (
            any(a[k] != reference[j][k] for k in CHECKED)
            or abs(a["agreement_miou"] - reference[j]["agreement_miou"]) > 0.01)]
        result["concurrent"] = {"clients": args.clients, "requests_per_client": args.requests,
                                **_percentiles([s for _, s, a in answers if not isinstance(a, str)]),
                                "errors": len(errors), "error_examples": errors[:3], "mismatches": len(mismatches),
                                "after": {**_rss_mb(server.process.pid), **_disk(root / "gradio")}}

        before = {**_rss_mb(server.process.pid), **_disk(root / "gradio")}
        seconds, failures, peak_disk = [], [], {"files": 0, "mb": 0.0}
        for i in range(args.sequential):
            elapsed, answer = call(clients[0], (image_file(5000 + i), 0.9, 2))
            (failures.append(answer) if isinstance(answer, str) else seconds.append(elapsed))
            Path(image_file(5000 + i)).unlink()  # the client's copy; the server keeps its upload
            disk = _disk(root / "gradio")
            peak_disk = {k: max(peak_disk[k], disk[k]) for k in disk}
        result["sequential"] = {"requests": args.sequential, **_percentiles(seconds), "errors": len(failures),
                                "error_examples": failures[:3], "before": before,
                                "after": {**_rss_mb(server.process.pid), **_disk(root / "gradio")},
                                "peak_disk": peak_disk}
        result["sequential"]["rss_growth_mb"] = result["sequential"]["after"]["rss_mb"] - before["rss_mb"]

        def release(tau: float) -> float:
            start = time.perf_counter()
            for name in ("/analyze", "/curve"):
                clients[1 % args.clients].predict(model, handle_file(image_file(0)), None, tau, tau, 2, 5, api_name=name)
            return time.perf_counter() - start

        compare_client = Client(server.url, verbose=False)
        start = time.perf_counter()
        job = compare_client.submit(model, handle_file(image_file(1)), None,
                                    ["algm", "tome", "pool2d", "grid", "kv_grid", "cts"], "algm:0.9", "tome:8",
                                    api_name="/compare")
        time.sleep(args.compare_delay)
        during = [release(0.8 + 0.001 * k) for k in range(args.releases) if not job.done()]
        job.result(timeout=1800)
        compare_s = time.perf_counter() - start
        after = [release(0.85 + 0.001 * k) for k in range(args.releases)]
        result["tau_release_during_compare"] = {"compare_s": compare_s, "during_s": during, "alone_s": after,
                                                "during_median_s": statistics.median(during) if during else None,
                                                "alone_median_s": statistics.median(after)}
    finally:
        result["server_exit_code"] = server.stop()
    leftovers = [p.name for p in [*root.glob("algm_viz_*"), *(root / "gradio").glob("algm_viz_*")]]
    result["temp_folders_left_after_sigterm"] = leftovers
    result["end_disk"] = _disk(root / "gradio")
    shutil.rmtree(root, ignore_errors=True)
    return result


def _run_command(args: argparse.Namespace) -> int:
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="registry key (default: the app's default model)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=25, help="/analyze requests per client")
    parser.add_argument("--sequential", type=int, default=200, help="sequential requests, each with a new image")
    parser.add_argument("--releases", type=int, default=3, help="τ releases timed during and after the comparison")
    parser.add_argument("--compare-delay", type=float, default=3.0, help="seconds between starting /compare and the releases")
    parser.add_argument("--width", type=int, default=480, help="width of the generated images")
    parser.add_argument("--height", type=int, default=360, help="height of the generated images")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--out", help="also write the JSON here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _arguments(parser)
    sys.exit(_run_command(parser.parse_args()))


if __name__ == "__main__":
    main()
