"""``algm-viz compare``: every token reducer over its own knob on one image, in one command.

Quality is the agreement mIoU with the baseline's prediction (or the mIoU against ``--label``), GFLOPs
are counted exactly, throughput is the median of ``--repeats`` timed forwards (the sweep's code on a
one-image data set). Writes JSON + CSV, an HTML page with the Pareto plots (quality against GFLOPs and
against throughput), and a PNG with the final merge maps of two methods side by side (by default ALGM at
τ 0.9 and ToMe at ALGM's GFLOPs: ``--maps algm:0.9 tome:match``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from ..datasets import IGNORE_INDEX, read_image, read_label
from ..evaluation.compare import DEFAULT_MAPS, check_specs, compare, merge_maps, parse_spec
from ..evaluation.sweep import available_methods, parse_taus
from ..models.description import describe
from ..models.loading import DEFAULT_MODEL, load_model
from ..plots import pareto_figure, rows_to_csv, write_html
from ..preprocess import check_label

log = logging.getLogger(__name__)


def _spec_argument(text: str) -> tuple[str, float | str]:
    try:
        return parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    check_specs(args.maps)  # before the model loads
    model = load_model(args.model).eval()
    image = read_image(args.image)
    label = None
    if args.label:
        label, note = check_label(read_label(args.label), model.num_classes, IGNORE_INDEX)
        if note:
            log.warning("%s: %s", args.label, note)
        label = label.astype(np.uint8)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    values = {name: [float(v) for v in vals.split("/")] for name, _, vals in (item.partition("=") for item in args.values or [])}
    rows = compare(model, image, methods, label=label, taus=parse_taus(args.taus), values=values,
                   repeats=args.repeats, short_side=args.short_side)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quality = "mIoU (%)" if label is not None else "agreement mIoU with the baseline (%)"
    out.write_text(json.dumps({"model": args.model, "image": str(args.image), "quality": quality, "rows": rows}, indent=2))
    rows_to_csv(rows, out.with_suffix(".csv"), describe(model).class_names)
    figures = [pareto_figure(rows, "gflops"), pareto_figure(rows, "images_per_s")]
    for figure in figures:
        figure.update_layout(yaxis_title=quality)
    write_html(figures, out.with_suffix(".html"), title=f"algm-viz compare: {args.model} on {Path(args.image).name}")
    maps = merge_maps(model, image, args.maps, args.short_side)
    cv2.imwrite(str(out.with_suffix(".png")), cv2.cvtColor(maps, cv2.COLOR_RGB2BGR))
    log.info("wrote %s (+ .csv, .html, .png)", out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="every token reducer on one image: Pareto plots + merge maps", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="bundled name/folder, official checkpoint, or untrained:<backbone>")
    parser.add_argument("--image", required=True, help="the image")
    parser.add_argument("--label", help="its label map (class ids, 255 = ignore): mIoU instead of agreement")
    parser.add_argument("--methods", default=",".join(m for m in available_methods() if m != "baseline"),
                        help="comma-separated methods")
    parser.add_argument("--taus", default="0.80:0.98:0.02", help="τ values of the ALGM variants (start:stop:step or a,b,c)")
    parser.add_argument("--values", nargs="*", metavar="METHOD=V1/V2", help="knob values of other methods, e.g. tome=4/8/16")
    parser.add_argument("--maps", nargs=2, type=_spec_argument, default=[parse_spec(s) for s in DEFAULT_MAPS],
                        metavar="METHOD:VALUE",
                        help="the two methods whose merge maps are drawn side by side; the second may be METHOD:match, its "
                             f"knob chosen so that its GFLOPs on the image match the first's (default: {' '.join(DEFAULT_MAPS)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per configuration")
    parser.add_argument("--short-side", type=int, help="resize the image to this short side (None: the model's)")
    parser.add_argument("--out", default="compare.json", help="JSON out; .csv, .html and .png written beside it")
    parser.set_defaults(run=run)
