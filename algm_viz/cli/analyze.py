"""``algm-viz analyze``: intra- vs inter-class token similarity (paper Fig. 2) on a data set, and optionally
the merge purity and error attribution of ALGM at chosen τ."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..evaluation.inference import default_short_side
from ..evaluation.purity import purity_analysis
from ..evaluation.similarity import similarity_analysis
from ..evaluation.sweep import parse_taus
from ..plots import similarity_figure, write_html
from . import options

log = logging.getLogger(__name__)


def _purity_taus(text: str) -> list[float]:
    """``--purity-taus``: numbers only (one τ for both stages)."""
    taus = parse_taus(text)
    if any(isinstance(tau, str) for tau in taus):
        raise ValueError(f"--purity-taus takes numbers (start:stop:step or a,b,c), got {text!r}")
    return taus


def run(args: argparse.Namespace) -> int:
    dataset = options.dataset(args)
    device = torch.device(args.device)
    model = options.model(args, dataset.num_classes, device)
    indices = options.selection(dataset, args)
    result = similarity_analysis(
        model, (dataset[i] for i in indices), dataset.num_classes, window_sizes=options.int_list(args.windows),
        local_layer=args.local_layer, layers=options.int_list(args.layers) if args.layers else None,
        short_side=args.short_side or default_short_side(model), device=device, progress=True, total=len(indices),
    )
    if args.purity_taus:
        result["purity"] = purity_analysis(
            model, (dataset[i] for i in indices), dataset.num_classes, _purity_taus(args.purity_taus),
            local_layer=args.local_layer, global_layer=args.global_layer, window=args.window,
            short_side=args.short_side or default_short_side(model), device=device, class_names=dataset.class_names,
            progress=True, total=len(indices),
        )
        for row in result["purity"]["rows"]:
            stages, changes = row["stages"], row["attribution"]
            log.info("τ %.3f: mixed groups %s; changed pixels in mixed groups %.1f %% (all pixels %.1f %%)", row["tau"],
                     ", ".join(f"{name} {100 * stage['mixed_group_share']:.1f} %" for name, stage in stages.items()),
                     100 * changes["changed_in_mixed_share"], 100 * changes["pixels_in_mixed_share"])
    options.write_json(result, args.out)
    write_html([similarity_figure(result)], args.out.with_suffix(".html"), title="algm-viz similarity analysis")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="intra- vs inter-class token similarity (paper Fig. 2)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_data_args(p)
    p.add_argument("--local-layer", type=int, default=1, help="layer of the window analysis")
    p.add_argument("--windows", default="2:8", help="window sizes k, from:to or a,b")
    p.add_argument("--layers", help="layers of the global analysis, e.g. 1:12 (None: all)")
    p.add_argument("--purity-taus", metavar="TAUS",
                   help="also measure merge purity and error attribution of ALGM at these τ (both stages; "
                        "start:stop:step or a,b,c), into the JSON's 'purity' (None: skip)")
    p.add_argument("--global-layer", type=int, default=5, help="GBM layer of the purity runs, 1-based")
    p.add_argument("--window", type=options.window, default="2", help="CLAP window of the purity runs, k or kh,kw")
    p.add_argument("--out", type=Path, default=Path("similarity.json"), help="JSON out; .html written beside it")
    p.set_defaults(run=run)
