"""``algm-viz balance``: class shares of tokens and attention on a data set, without and with ALGM."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import apply_algm
from ..evaluation.balance import dataset_balance
from ..evaluation.inference import default_short_side
from ..plots import balance_figure, write_html
from . import options


def run(args: argparse.Namespace) -> int:
    dataset = options.dataset(args)
    device = torch.device(args.device)
    model = options.model(args, dataset.num_classes, device)
    apply_algm(model, args.local_layer, args.global_layer, args.window, args.tau, args.tau)
    result = dataset_balance(model, (dataset[i] for i in options.selection(dataset, args)), dataset.num_classes,
                             short_side=args.short_side or default_short_side(model), device=device, labels=args.labels,
                             layer=options.int_list(args.layers) if args.layers else None)
    result["class_names"] = list(dataset.class_names)
    options.write_json(result, args.out)
    write_html([balance_figure(result, dataset.class_names)], args.out.with_suffix(".html"), title="algm-viz attention balance")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("balance", help="class shares of tokens and attention, without and with ALGM",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_data_args(p)
    options.add_algm_args(p)
    p.add_argument("--tau", type=float, help="τ for both stages (None: the model's calibrated or the authors')")
    p.add_argument("--labels", choices=("gt", "pred"), default="gt", help="token classes from ground truth or prediction")
    p.add_argument("--layers", help="layers to average attention over (None: those after the global merge)")
    p.add_argument("--out", type=Path, default=Path("balance.json"), help="JSON out; .html written beside it")
    p.set_defaults(run=run)
