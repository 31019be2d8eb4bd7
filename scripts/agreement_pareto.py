"""Agreement with the baseline prediction against GFLOPs, per token reducer, on a data set (issue 15).

Each image's reference is the unmerged model's own prediction (so quality is the *agreement* mIoU, not
the mIoU against ground truth); the sweep's code measures every method over its knob values on the same
images. Then, for each ``--overhead METHOD:VALUE``, the time inside the engine (its ``algm.*`` ranges:
clustering, merging, reconstruction; a wall clock on the CPU, :func:`~algm_viz.evaluation.bench.engine_ms`) against
the whole forward, on the first images.

    OMP_NUM_THREADS=1 python scripts/agreement_pareto.py --limit 20 --methods tome,expedite,ailurus \\
        --overhead expedite:0.4 ailurus:0.4 tome:32 --out agreement.json

Writes JSON (rows + overhead), CSV and an HTML page with the Pareto plot, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from algm_viz.evaluation.bench import engine_share
from algm_viz.evaluation.compare import parse_spec
from algm_viz.datasets import open_dataset, spread_indices
from algm_viz.evaluation.inference import default_short_side, predict_logits, prepare
from algm_viz.evaluation.sweep import SweepConfig, sweep
from algm_viz.methods import METHODS, apply_method
from algm_viz.models.loading import load_model
from algm_viz.patch import merging_restored, remove_algm
from algm_viz.plots import pareto_figure, rows_to_csv, write_html

log = logging.getLogger("agreement_pareto")


class Agreement:
    """Images of a data set, each labelled with the baseline model's prediction (the data-set protocol
    the sweep reads)."""

    name = "agreement with the baseline"

    def __init__(self, model: nn.Module, dataset: Any, indices: Sequence[int], short_side: int | None) -> None:
        self.class_names = list(dataset.class_names)
        self.images = [dataset[i][0] for i in indices]
        with merging_restored(model), torch.inference_mode():
            remove_algm(model)
            self.labels = [predict_logits(model, image, short_side=short_side).argmax(0).numpy().astype(np.uint8)
                           for image in self.images]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.labels[index]


@torch.inference_mode()
def overhead(model: nn.Module, images: Sequence[np.ndarray], spec: tuple[str, float], short_side: int | None,
             repeats: int) -> dict[str, Any]:
    """Median forward ms, median engine ms and their ratio over ``images`` for ``spec = (method, value)``
    (:func:`~algm_viz.evaluation.bench.engine_share`)."""
    method, value = spec
    with merging_restored(model):
        apply_method(model, method, value)
        batches = [prepare(model, image, short_side, torch.device("cpu")) for image in images]
        share = engine_share(model, batches, repeats)
    return {"method": method, "value": value, **share, "images": len(images)}


def register_variant(text: str) -> str:
    """``NAME=METHOD:key=value,...`` (e.g. ``ailurus_l2=ailurus:layer=2``): METHOD with those options,
    registered as NAME for this run (so the sweep measures it). Returns NAME."""
    name, _, rest = text.partition("=")
    base, _, options = rest.partition(":")
    if not name or base not in METHODS or METHODS[base].algm:
        raise SystemExit(f"--variant {text!r}: expected NAME=METHOD:key=value,... with a non-ALGM method")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        parsed[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    METHODS[name] = replace(METHODS[base], name=name, label=f"{METHODS[base].label}, {options}",
                            build=partial(METHODS[base].build, **parsed))
    return name


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | knob | GFLOPs | fewer GFLOPs | agreement mIoU | tokens after the last stage |", "|---|---|---|---|---|---|"]
    baseline = next(r["gflops"] for r in rows if r["method"] == "baseline")
    for row in rows:
        knob = "–" if row["value"] is None else f"{row['knob']} = {row['value']:g}"
        final = row["tokens"].get("final")
        tokens = "–" if final is None else f"{final:.0f}"
        lines.append(f"| {row['method']} | {knob} | {row['gflops']:.2f} | {100 * (1 - row['gflops'] / baseline):.0f} % | "
                     f"{row['miou']:.2f} | {tokens} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="camvid-vit-tiny")
    parser.add_argument("--data", default="../shared/data/camvid")
    parser.add_argument("--dataset", default="camvid")
    parser.add_argument("--split", default=None)
    parser.add_argument("--limit", type=int, default=20, help="images spread over the set (seeded); 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="tome,expedite,ailurus")
    parser.add_argument("--values", nargs="*", default=[], metavar="METHOD=V1/V2", help="knob values, e.g. tome=16/24/32")
    parser.add_argument("--variant", nargs="*", default=[], metavar="NAME=METHOD:KEY=V,...",
                        help="a method with options under its own name, e.g. ailurus_l2=ailurus:layer=2")
    parser.add_argument("--overhead", nargs="*", type=str, default=[], metavar="METHOD:VALUE")
    parser.add_argument("--overhead-images", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed (and profiled) forwards per image for --overhead")
    parser.add_argument("--out", default="agreement.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    for variant in args.variant:
        register_variant(variant)
    args.overhead = [parse_spec(spec) for spec in args.overhead]
    model = load_model(args.model).eval()
    short_side = default_short_side(model)
    dataset = open_dataset(args.dataset, args.data, args.split)
    indices = spread_indices(dataset, args.limit or None, args.seed)
    data = Agreement(model, dataset, indices, short_side)
    values = {name: [float(v) for v in vals.split("/")] for name, _, vals in (item.partition("=") for item in args.values)}
    methods = ["baseline", *[m.strip() for m in args.methods.split(",") if m.strip()]]
    config = SweepConfig(methods=methods, values=values, short_side=short_side, warmup=1, bootstrap=0, seed=args.seed)
    rows = sweep(model, data, config, progress=False)
    costs = [overhead(model, data.images[: args.overhead_images], spec, short_side, args.repeats) for spec in args.overhead]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "images": [str(dataset.files[i]) for i in indices] if hasattr(dataset, "files") else indices,
                               "quality": "agreement mIoU with the baseline (%)", "rows": rows, "overhead": costs}, indent=2, default=str))
    rows_to_csv(rows, out.with_suffix(".csv"), data.class_names)
    figure = pareto_figure(rows, "gflops")
    figure.update_layout(yaxis_title="agreement mIoU with the baseline (%)")
    write_html([figure], out.with_suffix(".html"), title=f"agreement vs GFLOPs: {args.model}, {len(indices)} images")
    print(markdown(rows))
    for cost in costs:
        print(f"{cost['method']} {cost['value']:g}: forward {cost['forward_ms']:.1f} ms, engine {cost['engine_ms']:.2f} ms "
              f"({100 * cost['engine_fraction']:.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
