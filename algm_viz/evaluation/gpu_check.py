"""What ``algm-viz gpu-check`` measures besides the CUDA tests and the app benchmark (which the command runs):
:func:`compare_devices` (CPU vs the device for every method), :func:`bench_grid` (``bench`` over backbones ×
batches × dtypes) and :func:`markdown_report` (both as Markdown tables).
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods import METHODS, apply_method
from ..patch import algm_state, remove_algm
from .bench import run_benchmark, synthetic_scenes
from .inference import DTYPES

__all__ = ["LOGIT_ATOL", "bench_grid", "compare_devices", "markdown_report"]

#: Largest absolute logit difference accepted between CPU and CUDA in fp32 (TF32 is switched off).
LOGIT_ATOL = 1e-3


def compare_devices(model_name: str, device: str, size: tuple[int, int] = (360, 480)) -> list[dict[str, Any]]:
    """Per method (at its middle knob value): token counts on the CPU and on ``device``, the largest logit
    difference and the share of pixels with the same class; ``ok`` when counts match and logits agree."""
    from ..models.loading import load_model

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
    from ..models import create_segmenter

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
