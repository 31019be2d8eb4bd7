"""``algm-viz calibrate``: the automatic τ = μ + σ of token similarities (paper Sec. 3.3) on a data set,
optionally stored into the model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..evaluation.calibrate import calibrate, store_thresholds
from ..evaluation.inference import default_short_side
from . import options

log = logging.getLogger(__name__)

#: The paper calibrates on the training set.
TRAIN_SPLITS = {"camvid": "train", "ade20k": "training"}


def _images(dataset: Any, indices: list[int]) -> Iterator[np.ndarray]:
    for index in indices:
        yield dataset[index][0]


def run(args: argparse.Namespace) -> int:
    args.split = args.split or TRAIN_SPLITS.get(args.dataset)
    dataset = options.dataset(args)
    device = torch.device(args.device)
    model = options.model(args, dataset.num_classes, device)
    indices = options.selection(dataset, args)
    short_side = args.short_side or default_short_side(model)
    result = calibrate(model, _images(dataset, indices), (args.local_layer, args.global_layer), args.window,
                       short_side=short_side, device=device, progress=True, total=len(indices))
    result["choice"] = "auto τ = μ + σ over all token pairs per layer (paper Sec. 3.3); window τ reported only"
    options.write_json(result, args.out)
    log.info("τ local %.4f (window statistic %.4f), τ global %.4f", result["local"], result["window"]["tau"], result["global"])
    if max(result["local"], result["global"]) >= 1:
        log.warning("τ = μ + σ >= 1 merges nothing (cosine similarity is at most 1): is the model trained?")
    if args.store:
        from ..models.bundled import bundled_dir

        folder = Path(args.model)
        if not folder.exists():
            folder = bundled_dir(args.model)
        log.info("stored thresholds in %s", store_thresholds(folder, result))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="automatic τ = μ + σ of token similarities (paper Sec. 3.3)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_data_args(p)  # split default: the training split (TRAIN_SPLITS)
    options.add_algm_args(p)
    p.add_argument("--store", action="store_true",
                   help="write the thresholds into the model (a local official-format folder or a bundled model)")
    p.add_argument("--out", type=Path, default=Path("calibration.json"), help="JSON with the statistics")
    p.set_defaults(run=run)
