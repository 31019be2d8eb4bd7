"""``algm-viz sweep``: mIoU, images/s, GFLOPs and tokens for the baseline and each method × τ on a data set;
writes JSON, CSV and an HTML page with the plots."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from ..datasets import sequence_of
from ..evaluation.distributed import setup, teardown
from ..evaluation.inference import DTYPES, default_short_side
from ..evaluation.sweep import SweepConfig, available_methods, parse_taus, sweep
from ..plots import pareto_figure, rows_to_csv, threshold_figure, write_html
from . import options

log = logging.getLogger(__name__)


def _method_values(text: str) -> tuple[str, list[float]]:
    """``"tome=4,8"`` -> ``("tome", [4.0, 8.0])``."""
    name, _, values = text.partition("=")
    try:
        return name.strip(), [float(v) for v in values.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected METHOD=V1,V2,..., got {text!r}") from error


def run(args: argparse.Namespace) -> int:
    context = setup(args.device)
    try:
        dataset = options.dataset(args)
        model = options.model(args, dataset.num_classes, context.device)
        config = SweepConfig(
            taus=parse_taus(args.taus), methods=[m.strip() for m in args.methods.split(",")],
            local_layer=args.local_layer, global_layer=args.global_layer, window=args.window, values=dict(args.values or []),
            short_side=args.short_side, batch_size=args.batch_size, warmup=args.warmup,
            flops_images=None if args.flops_images < 0 else args.flops_images, limit=args.limit, seed=args.seed,
            bootstrap=args.bootstrap, confidence=args.confidence, dtype=DTYPES[args.dtype],
        )
        rows = sweep(model, dataset, config, context, progress=True)
        if context.is_main:
            out = args.out
            meta = {"model": args.model, "dataset": dataset.name, "data": str(args.data), "split": args.split,
                    "sequences": sorted({sequence_of(dataset.files[i]) for i in options.selection(dataset, args)}),
                    "images": rows[0]["images"] if rows else 0,
                    "uncertainty": f"delta_miou_ci: paired bootstrap ({config.bootstrap} resamples of the images, seed "
                                   f"{config.seed}) of the pooled-mIoU difference to the baseline, "
                                   f"{100 * config.confidence:g}% percentile interval; miou_ci: the row's own mIoU",
                    "class_names": list(dataset.class_names), "processes": context.world_size,
                    "device": str(context.device), "short_side": config.short_side or default_short_side(model),
                    "inference": "whole image", "config": {**asdict(config), "dtype": args.dtype},
                    "throughput": "median (p25, p75) over batches of batch_size / model-forward seconds, after warm-up, "
                                  "device-synchronised; times the number of processes under torchrun"}
            options.write_json({**meta, "rows": rows}, out)
            rows_to_csv(rows, out.with_suffix(".csv"), dataset.class_names)
            write_html([threshold_figure(rows), pareto_figure(rows, "gflops"), pareto_figure(rows, "images_per_s")],
                       out.with_suffix(".html"), title=f"algm-viz sweep: {args.model} on {dataset.name} "
                                                       f"{args.split or ''} {','.join(meta['sequences'])} ({meta['images']} images)")
            log.info("wrote %s and %s", out.with_suffix(".csv"), out.with_suffix(".html"))
    finally:
        teardown(context)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("sweep", help="mIoU, images/s, GFLOPs and tokens for the baseline and each method × τ",
                              formatter_class=formatter)
    options.add_data_args(p)
    options.add_algm_args(p)
    p.add_argument("--taus", default="0.80:0.98:0.02", help="start:stop:step (inclusive) or a,b,c; 'auto' (alone or as an item) adds the model's calibrated τ pair, 'official' the official ALGM code's mode (online GBM threshold; each row's thresholds_used says what it was)")
    p.add_argument("--methods", default="baseline,algm", help=f"comma-separated, from {','.join(available_methods())}")
    p.add_argument("--values", type=_method_values, action="append", metavar="METHOD=V1,V2",
                   help="knob values of a non-τ method, e.g. tome=4,8 (repeatable; default: the method's own)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per configuration")
    p.add_argument("--flops-images", type=int, default=-1,
                   help="GFLOPs averaged over every evaluated image (-1; exact, most of them from the token counts "
                        "without a counted forward), or over the first N per process (an estimate; each row records how many)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="paired bootstrap resamples over images for the ΔmIoU interval against the baseline (0: none)")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap interval")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="precision of the forwards (autocast)")
    p.add_argument("--out", type=Path, default=Path("results.json"), help="JSON out; .csv and .html written beside it")
    p.set_defaults(run=run)
