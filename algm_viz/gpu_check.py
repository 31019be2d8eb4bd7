"""``algm-viz gpu-check``: everything that needs a GPU, in one command that writes one JSON and one table.

1. The CUDA tests of the suite (``pytest -m cuda``-style selection: every test that skips without CUDA).
2. CPU vs CUDA on the bundled model for every method of :data:`algm_viz.methods.METHODS`: the same token
   counts after every stage and logits within :data:`LOGIT_ATOL` (fp32); a mismatch fails the command.
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

from .bench import DTYPES, run_benchmark, synthetic_scenes
from .methods import METHODS, apply_method
from .patch import algm_state, remove_algm

__all__ = ["compare_devices", "bench_grid", "markdown_report", "LOGIT_ATOL"]

#: Largest absolute logit difference accepted between CPU and CUDA in fp32 (TF32 is switched off).
LOGIT_ATOL = 1e-3
#: Test files whose tests run only with CUDA.
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_merging.py", "tests/test_patch.py", "tests/test_precision.py")


def compare_devices(model_name: str, device: str, size: tuple[int, int] = (360, 480)) -> list[dict[str, Any]]:
    """Per method (at its middle knob value): token counts on the CPU and on ``device``, the largest logit
    difference and the share of pixels with the same class; ``ok`` when counts match and logits agree."""
    from .models.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cpu_model = load_model(model_name).eval()
    gpu_model = load_model(model_name).eval().to(device)
    images = synthetic_scenes(2, *size)
    rows = []
    with torch.inference_mode():
        for name, method in METHODS.items():
            value = method.values[len(method.values) // 2]
            outputs, counts = [], []
            for model, x in ((cpu_model, images), (gpu_model, images.to(device))):
                remove_algm(model)
                apply_method(model, name, value)
                outputs.append(model(x).float().cpu())
                state = algm_state(model)
                record = state.record if state is not None else None
                counts.append({k: v.tolist() for k, v in record.token_counts().items()} if record is not None else {})
            difference = (outputs[0] - outputs[1]).abs().max().item()
            agreement = (outputs[0].argmax(1) == outputs[1].argmax(1)).float().mean().item()
            rows.append({"method": name, "value": value, "cpu_tokens": counts[0], "device_tokens": counts[1],
                         "max_logit_difference": difference, "pixel_agreement": agreement,
                         "ok": counts[0] == counts[1] and difference <= LOGIT_ATOL})
        for model in (cpu_model, gpu_model):
            remove_algm(model)
    return rows


def bench_grid(backbones: list[str], batches: list[int], dtypes: list[str], size: int, device: str,
               tau: float, repeats: int) -> list[dict[str, Any]]:
    """``bench`` rows (baseline and ALGM at ``tau``) for every backbone × batch × dtype, untrained
    150-class Segmenters on synthetic scenes; each row says its backbone, batch and dtype."""
    from .models import create_segmenter

    rows = []
    for backbone in backbones:
        torch.manual_seed(0)
        model = create_segmenter(backbone, num_classes=150, image_size=size).eval()
        for dtype in dtypes:
            model = model.to(device=device, dtype=DTYPES[dtype])
            for batch in batches:
                images = synthetic_scenes(batch, size, size).to(device=device, dtype=DTYPES[dtype])
                for row in run_benchmark(model, images, [tau], repeats=repeats, warmup=3):
                    rows.append({"backbone": backbone, "batch": batch, "dtype": dtype, **row})
    return rows


def markdown_report(report: dict[str, Any]) -> str:
    """The bench rows and the device comparison as Markdown tables."""
    lines = [f"GPU check on {report['device']} (torch {report['torch']})", "",
             "| backbone | batch | dtype | baseline ms | ALGM ms | speed-up | GFLOPs ratio | speed-up / GFLOPs ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    baselines = {(r["backbone"], r["batch"], r["dtype"]): r for r in report["bench"] if r["method"] == "baseline"}
    for row in report["bench"]:
        if row["method"] == "baseline":
            continue
        base = baselines[(row["backbone"], row["batch"], row["dtype"])]
        lines.append(f"| {row['backbone']} | {row['batch']} | {row['dtype']} | {base['ms_median']:.2f} | "
                     f"{row['ms_median']:.2f} | {row['speedup']:.2f}× | {row['gflops_ratio']:.2f}× | "
                     f"{row['speedup_over_gflops_ratio']:.2f} |")
    lines += ["", "| method | tokens (CPU = device) | max logit difference | pixel agreement | ok |", "| --- | --- | --- | --- | --- |"]
    for row in report["devices"]:
        lines.append(f"| {row['method']} | {row['cpu_tokens'] == row['device_tokens']} | "
                     f"{row['max_logit_difference']:.2e} | {row['pixel_agreement']:.4f} | {'yes' if row['ok'] else 'NO'} |")
    if report.get("app"):
        app = report["app"]
        lines += ["", f"App: first request {app['first_request_s']:.3f} s, τ release {app['tau_release_s']['median']:.3f} s "
                      f"(median), per-image curve {app['curve_s']:.3f} s."]
    return "\n".join(lines) + "\n"


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
        from .app.benchmark import run as app_benchmark
        from .app.ui import EXAMPLES_DIR

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
    parser.add_argument("--model", default="camvid-vit-tiny", help="model for the CPU/device comparison and the app")
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
