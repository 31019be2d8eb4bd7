"""``algm-viz gpu-check``: everything that needs a GPU, in one command that writes one JSON and one table.

1. The CUDA tests of the suite (``pytest -m cuda``-style selection: every test that skips without CUDA).
2. CPU vs CUDA on the bundled model for every method of :data:`algm_viz.methods.METHODS`: the same token
   counts after every stage and logits within :data:`~algm_viz.evaluation.gpu_check.LOGIT_ATOL` (fp32); a mismatch fails the command.
3. ``bench`` (baseline vs ALGM, side by side) for each backbone × batch × dtype at ``--size``: speed-up,
   GFLOPs ratio and their quotient (the issue's target: ≥ 0.85 at batch 32 fp16 for ViT-S 512).
4. The app benchmark (first request, τ release, per-image curve) on the device.

Nothing is installed; the README's GPU command is enough. ``scripts/gpu_check.sh`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..evaluation.gpu_check import bench_grid, compare_devices, markdown_report
from ..evaluation.inference import DTYPES
from ..models.loading import DEFAULT_MODEL

#: Test files whose tests run only with CUDA.
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_merging.py", "tests/test_patch.py", "tests/test_precision.py")


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("gpu-check needs a CUDA device (none is visible); --device cpu runs the same checks on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
    }
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", *CUDA_TESTS],
                               capture_output=True, text=True)
        (out / "tests.txt").write_text(tests.stdout + tests.stderr)
        report["tests"] = {"returncode": tests.returncode, "summary": (tests.stdout.strip().splitlines() or [""])[-1]}
    report["devices"] = compare_devices(args.model, device)
    report["bench"] = bench_grid(args.backbones, args.batches, args.dtypes, args.size, device, args.tau, args.repeats)
    if not args.skip_app:
        from ..app.benchmark import run as app_benchmark
        from ..app.ui import EXAMPLES_DIR

        image = str(Path(args.model_image) if args.model_image else next(EXAMPLES_DIR.glob("*.png")))
        report["app"] = app_benchmark(args.model, image, [0.9, 0.85, 0.8, 0.95], 2, 5, api=False, device=device)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown_report(report))
    sys.stdout.write(markdown_report(report))
    failed = [row["method"] for row in report["devices"] if not row["ok"]]
    if failed or report.get("tests", {}).get("returncode", 0) not in (0, 5):
        raise RuntimeError(f"gpu-check failed: CPU/device mismatch in {failed or 'none'}, "
                           f"tests: {report.get('tests', {}).get('summary', 'not run')}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gpu-check", help="CUDA tests, CPU-vs-GPU agreement, bench grid, app timings (one JSON)",
                                   description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model for the CPU/device comparison and the app")
    parser.add_argument("--model-image", help="image for the app benchmark (default: the first example)")
    parser.add_argument("--backbones", nargs="+",
                        default=["vit_tiny_patch16_384", "vit_small_patch16_384", "vit_base_patch16_384"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tau", type=float, default=0.9, help="τ of ALGM in the bench grid (CLAP and GBM)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-app", action="store_true")
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, gpu_check.md, tests.txt")
    parser.set_defaults(run=run)
