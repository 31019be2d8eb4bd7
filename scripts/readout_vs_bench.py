"""The app's latency readout against ``algm-viz bench`` on the same image and setting.

For each of ``--trials`` trials: a fresh app session of the image gives the readout's speed-up (baseline and
the setting in interleaved rounds, :meth:`algm_viz.app.session.ImageSession.latency`), then
:func:`algm_viz.evaluation.bench.run_benchmark` times the same model, image and calibrated τ pair (interleaved rounds after
warm-up). Prints one JSON object: the speed-ups of both, per trial, and their ratio.

    python scripts/readout_vs_bench.py --image assets/examples/street_0.png --trials 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from algm_viz.app.models import ModelRegistry
from algm_viz.app.session import LATENCY_ROUNDS, ImageSession, Settings
from algm_viz.evaluation.bench import run_benchmark
from algm_viz.preprocess import normalize, read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="assets/examples/street_0.png")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="bench rounds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = ModelRegistry(device="cpu")
    entry = registry.get(registry.default_key())
    auto = entry.auto_thresholds
    settings = Settings(auto["local"], auto["global"])
    image = read_image(args.image)
    trials = []
    for _ in range(args.trials):
        session = ImageSession(entry, image)
        session.baseline(), session.algm(settings)  # what the readout runs first (its warm-up)
        latency = session.latency(settings)
        tensor = normalize(session.image, *entry.model.mean_std)
        with entry.lock:
            rows = run_benchmark(entry.model, tensor, ["auto"], repeats=args.repeats, warmup=3)
        trials.append({"readout_speedup": latency.speedup, "bench_speedup": rows[1]["speedup"],
                       "readout_ms": [1e3 * latency.baseline.median, 1e3 * latency.algm.median],
                       "bench_ms": [rows[0]["ms_median"], rows[1]["ms_median"]]})
    ratios = [t["readout_speedup"] / t["bench_speedup"] for t in trials]
    print(json.dumps({"image": args.image, "size": list(session.image.shape[1::-1]), "thresholds": auto,
                      "readout_rounds": LATENCY_ROUNDS, "bench_repeats": args.repeats, "threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "trials": trials,
                      "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}, indent=2))


if __name__ == "__main__":
    main()
