"""``algm-viz bench``: time a Segmenter with and without ALGM, side by side in one run; prints JSON.

For the baseline and for ALGM at each τ: wall time per image (median and quartiles of repeated,
synchronised calls after warm-up, the configurations interleaved round by round) end to end (logits at the input size) and for the network alone
(``decoder_logits``: the logits before the final bilinear upsampling, a fixed cost that no FLOP count
includes), images/s, GFLOPs (attention counted), tokens after each stage, and the time spent in the
engine itself (similarities, index building, merge, unmerge) in the ``algm.*`` ranges: a wall clock on the CPU,
the profiler's device times on CUDA (:mod:`algm_viz.evaluation.bench`).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluation.bench import image_batch, run_benchmark, synthetic_scenes
from ..evaluation.inference import DTYPES
from ..evaluation.sweep import AUTO
from ..models.segmenter import DECODERS


def _load_model(args: argparse.Namespace) -> nn.Module:
    from ..models.loading import UNTRAINED, load_model

    if args.model:
        return load_model(args.model)
    return load_model(f"{UNTRAINED}:{args.backbone}", num_classes=args.num_classes,
                      untrained={"decoder": args.decoder, "image_size": args.size[0]})


def run_peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    """``--peak-memory``: peak host memory of one prediction, logits path vs label path, baseline vs ALGM."""
    from ..evaluation.memory import MemoryCase, peak_prediction_memory

    if args.model or args.device not in ("auto", "cpu") or args.image:
        raise SystemExit("--peak-memory measures an untrained --backbone on the CPU (no --model, --image or --device)")
    height, width = (args.size * 2)[:2]
    tau = next((t for t in args.taus if t != AUTO), None)
    cases = [MemoryCase(args.backbone, args.num_classes, height, width, path, t, args.threads or 1)
             for t in (None, tau) for path in ("logits", "labels")]
    return {"torch": torch.__version__, "device": f"cpu ({platform.processor() or platform.machine()})",
            "results": [peak_prediction_memory(case) for case in cases]}


def run(args: argparse.Namespace) -> int:
    if args.peak_memory:
        _emit(run_peak_memory(args), args.out)
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype]
    height, width = (args.size * 2)[:2]
    model = _load_model(args).eval()
    images = image_batch(args.image, args.batch, height, width, model.mean_std) if args.image else synthetic_scenes(args.batch, height, width)
    model, images = model.to(device=device, dtype=dtype), images.to(device=device, dtype=dtype)
    rows = run_benchmark(
        model, images, args.taus, window=tuple(args.window), global_layer=args.global_layer,
        repeats=args.repeats, warmup=args.warmup, compare_batch_min=args.compare_batch_min,
    )
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.model or f"untrained {args.backbone} + {args.decoder}",
        "size": [height, width],
        "batch": args.batch,
        "dtype": args.dtype,
        "input": args.image or "synthetic piecewise-smooth scenes",
        "results": rows,
    }
    _emit(report, args.out)
    return 0


def _emit(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v))
    print(text)
    if out:
        Path(out).write_text(text)


def _tau(text: str) -> float | str:
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"τ must be a number or {AUTO!r}, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="time baseline vs ALGM forward passes (prints JSON)", description=__doc__)
    parser.add_argument("--model", help="bundled model name/folder or official checkpoint; default: untrained --backbone")
    parser.add_argument("--backbone", default="vit_small_patch16_384", help="timm plain ViT for the untrained model")
    parser.add_argument("--decoder", default="mask_transformer", choices=DECODERS)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--size", type=int, nargs="+", default=[512], help="H [W] of the input")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--taus", type=_tau, nargs="+", default=[0.8, 0.9, 0.95],
                        help="τ values (CLAP and GBM); 'auto' = the model's calibrated (local, global) pair")
    parser.add_argument("--window", type=int, nargs=2, default=[2, 2])
    parser.add_argument("--global-layer", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image", help="time on this image (resized) instead of synthetic scenes")
    parser.add_argument("--compare-batch-min", action="store_true", help="also time the paper code's batch-minimum merging")
    parser.add_argument("--peak-memory", action="store_true",
                        help="instead of timing: peak CPU memory of one prediction at --size, full-resolution logits vs "
                             "the tiled label path, baseline vs ALGM at the first τ (each in a fresh process)")
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.set_defaults(run=run)
