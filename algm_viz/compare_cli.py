"""``algm-viz compare``: every token reducer over its own knob on one image, in one command.

Quality is the agreement mIoU with the baseline's prediction (or the mIoU against ``--label``), GFLOPs
are counted exactly, throughput is the median of ``--repeats`` timed forwards (the sweep's code on a
one-image data set). Writes JSON + CSV, an HTML page with the Pareto plots (quality against GFLOPs and
against throughput), and a PNG with the final merge maps of two methods side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from . import render
from .datasets import IGNORE_INDEX, read_image, read_label
from .evaluation.inference import default_short_side, predict_labels, prepare, resized_shape
from .evaluation.sweep import SweepConfig, add_intervals, available_methods, knob, parse_taus, sweep
from .methods import METHODS, apply_method
from .models.loading import load_model
from .patch import algm_state, merging_restored, remove_algm
from .plots import pareto_figure, rows_to_csv, write_html
from .preprocess import check_label

__all__ = ["OneImage", "compare", "merge_maps", "parse_spec"]

log = logging.getLogger(__name__)


class OneImage:
    """One image and its label map, ``repeats`` times: the data-set protocol the sweep reads."""

    name = "one image"

    def __init__(self, image: np.ndarray, label: np.ndarray, class_names: Sequence[str], repeats: int) -> None:
        if label.shape != image.shape[:2]:
            raise ValueError(f"label map {label.shape} and image {image.shape[:2]} differ in size")
        self.image, self.label, self.class_names, self.repeats = image, label, list(class_names), repeats

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.image, self.label


def _class_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "class_names", None) or [f"class {i}" for i in range(model.num_classes)])


def _free(done: int, total: int) -> ContextManager[None]:
    return nullcontext()


@torch.inference_mode()
def compare(
    model: nn.Module,
    image: np.ndarray,
    methods: Sequence[str],
    *,
    label: np.ndarray | None = None,
    taus: Sequence[float] | None = None,
    values: dict[str, Sequence[float]] | None = None,
    repeats: int = 5,
    short_side: int | None = None,
    step: Callable[[int, int], ContextManager[None]] = _free,
) -> list[dict[str, Any]]:
    """Sweep rows (see :mod:`algm_viz.plots`) for the baseline and every method × knob value on
    ``image`` ``[H, W, 3]``; ``miou`` is against ``label`` (ignore = 255) or else the baseline's prediction.

    The work runs one configuration at a time, each inside ``step(done, total)`` (the label forward
    first, then each configuration; ``total`` counts both): a context manager that may hold a lock on a
    shared model or raise to stop the work between configurations (a time budget). One image gives no
    bootstrap interval (``miou_ci`` None); ``delta_miou`` is against the baseline row."""
    short_side = short_side or default_short_side(model)
    config = SweepConfig(
        taus=list(taus) if taus is not None else list(METHODS["algm"].values), methods=["baseline", *methods],
        values=dict(values or {}), short_side=short_side, warmup=1, flops_images=1, bootstrap=0,
    )
    runs = config.runs()
    total = len(runs) + (label is None)
    if label is None:
        with step(0, total), merging_restored(model):
            remove_algm(model)
            label = predict_labels(model, image, short_side=short_side).cpu().numpy().astype(np.uint8)
    data = OneImage(image, label, _class_names(model), repeats)
    rows = []
    for method, value in runs:
        one = replace(config, methods=[method], taus=[value] if knob(method) == "τ" else config.taus,
                      values={method: [value]} if knob(method) not in (None, "τ") else {})
        with step(total - len(runs) + len(rows), total):
            rows.extend(sweep(model, data, one, progress=False))
    add_intervals(rows, [torch.tensor(row["confusion"])[None] for row in rows], config)
    return rows


@torch.inference_mode()
def merge_maps(model: nn.Module, image: np.ndarray, specs: Sequence[tuple[str, float]], short_side: int | None = None) -> np.ndarray:
    """``[h, n·w, 3]`` uint8: for each ``(method, value)``, the final merge groups painted on the model
    input (one colour per merged group, unmerged patches clear), side by side, each titled."""
    short_side = short_side or default_short_side(model)
    height, width = resized_shape(*image.shape[:2], short_side)
    shown = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) if (height, width) != image.shape[:2] else image
    patch = model.patch_size
    panels = []
    with merging_restored(model):
        for method, value in specs:
            apply_method(model, method, value)
            model(prepare(model, shown, None))
            record = algm_state(model).record
            grid, final = record.grid, record.final
            if final is None:  # key/value-only merging keeps every token
                groups = np.arange(grid[0] * grid[1]).reshape(grid)
            else:
                groups = final.groups[0].cpu().numpy().reshape(grid)
            merged = render.merged_mask(groups)
            panel = render.group_overlay(shown, groups, merged, patch)
            kept = int(groups.max()) + 1
            title = f"{METHODS[method].label}, {METHODS[method].knob} = {value:g}: {kept}/{groups.size} tokens"
            panels.append(_titled(panel, title))
    return np.concatenate(panels, axis=1)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((28, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def parse_spec(text: Any) -> tuple[str, float]:
    """``"METHOD:VALUE"`` (e.g. ``"tome:8"``) -> ``(method, value)``; ``ValueError`` saying what is wrong
    otherwise (unknown method, a value that is not a finite number, or one the method refuses, e.g.
    ``tome:inf`` or ``grid:2``), before any model work."""
    if not isinstance(text, str):
        raise ValueError(f"a merge map is given as METHOD:VALUE text, got {type(text).__name__} {str(text)[:40]!r}")
    method, _, value = text.strip().partition(":")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if method not in METHODS or not math.isfinite(number):
        raise ValueError(f"expected METHOD:VALUE with a method from {', '.join(METHODS)} and a finite number, "
                         f"got {text[:40]!r}")
    spec = METHODS[method]
    if not spec.algm:
        if spec.knob in ("r", "k") and not float(number).is_integer():
            raise ValueError(f"{method}'s {spec.knob} is a whole number, got {number:g}")
        try:
            spec.build(number, 1)  # the stages check their own values
        except (ValueError, TypeError, OverflowError) as error:
            raise ValueError(f"{method}:{number:g} is not a valid setting: {error}") from None
    return method, number


def _spec_argument(text: str) -> tuple[str, float]:
    try:
        return parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def run(args: argparse.Namespace) -> int:
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
    rows_to_csv(rows, out.with_suffix(".csv"), _class_names(model))
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
    parser.add_argument("--model", default="camvid-vit-tiny", help="bundled name/folder, official checkpoint, or untrained:<backbone>")
    parser.add_argument("--image", required=True, help="the image")
    parser.add_argument("--label", help="its label map (class ids, 255 = ignore): mIoU instead of agreement")
    parser.add_argument("--methods", default=",".join(m for m in available_methods() if m != "baseline"),
                        help="comma-separated methods")
    parser.add_argument("--taus", default="0.80:0.98:0.02", help="τ values of the ALGM variants (start:stop:step or a,b,c)")
    parser.add_argument("--values", nargs="*", metavar="METHOD=V1/V2", help="knob values of other methods, e.g. tome=4/8/16")
    parser.add_argument("--maps", nargs=2, type=_spec_argument, default=[("algm", 0.9), ("tome", 8.0)], metavar="METHOD:VALUE",
                        help="the two methods whose merge maps are drawn side by side")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per configuration")
    parser.add_argument("--short-side", type=int, help="resize the image to this short side (None: the model's)")
    parser.add_argument("--out", default="compare.json", help="JSON out; .csv, .html and .png written beside it")
    parser.set_defaults(run=run)
