"""Options and option parsers shared by the data-set commands (``sweep``, ``calibrate``, ``analyze``,
``balance``), and the data set, model and image selection they describe.

``--model`` takes a bundled model name/folder, an official Segmenter checkpoint (known name, URL or
folder), or ``untrained:<timm backbone>`` (random weights, seeded by ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets import SegmentationFolder, open_dataset, parse_sequences, spread_indices

log = logging.getLogger(__name__)


def int_list(text: str) -> list[int]:
    """``"1,5"`` or ``"2:8"`` (inclusive) -> ints."""
    if ":" in text:
        start, stop = (int(v) for v in text.split(":"))
        return list(range(start, stop + 1))
    return [int(v) for v in text.split(",") if v.strip()]


def window(text: str) -> tuple[int, int]:
    """``"2"`` or ``"2,3"`` / ``"2x3"`` -> ``(kh, kw)``."""
    values = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, the data set and its selection, ``--device`` and ``--seed`` (``--threads`` is common to all commands)."""
    parser.add_argument("--model", required=True, help="bundled name/folder, official checkpoint, or untrained:<backbone>")
    parser.add_argument("--data", required=True, type=Path, help="data set root folder")
    parser.add_argument("--dataset", choices=("camvid", "ade20k", "folder"), default="camvid", help="data set layout")
    parser.add_argument("--split", default=None,
                        help="split; a CamVid split may join folders, e.g. train+val (None: val for camvid, validation "
                             "for ade20k; calibrate: the training split)")
    parser.add_argument("--sequences", metavar="A,B",
                        help="use only the images of these sequences (file-name prefixes, e.g. 0006R0); None = all")
    parser.add_argument("--classes", help="folder layout: class names, comma-separated or a file with one per line")
    parser.add_argument("--limit", type=int,
                        help="use only N images spread over the whole set (seeded by --seed, stratified by file-name "
                             "prefix); None = all")
    parser.add_argument("--short-side", type=int, help="resize images to this short side (None: the model's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds untrained:<backbone> weights, the --limit draw and the bootstrap resamples")


def add_algm_args(parser: argparse.ArgumentParser) -> None:
    """``--local-layer``, ``--global-layer`` and ``--window`` of ALGM."""
    parser.add_argument("--local-layer", type=int, default=1, help="CLAP layer, 1-based")
    parser.add_argument("--global-layer", type=int, default=5, help="GBM layer, 1-based")
    parser.add_argument("--window", type=window, default="2", help="CLAP window, k or kh,kw")


def dataset(args: argparse.Namespace) -> SegmentationFolder:
    """The data set that ``--dataset``, ``--data``, ``--split``, ``--classes`` and ``--sequences`` name."""
    names = None
    if args.classes:
        path = Path(args.classes)
        names = [n.strip() for n in (path.read_text().splitlines() if path.is_file() else args.classes.split(",")) if n.strip()]
    return open_dataset(args.dataset, args.data, args.split, names, parse_sequences(args.sequences))


def model(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    """``--model`` on ``device`` in eval mode; ``ValueError`` when it predicts other than ``num_classes``."""
    from ..models.loading import load_model

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, num_classes=num_classes, seed=args.seed)
    if loaded.num_classes != num_classes:
        raise ValueError(f"the model predicts {loaded.num_classes} classes but the data set has {num_classes}")
    return loaded.to(device).eval()


def selection(data: Any, args: argparse.Namespace) -> list[int]:
    """The images a command uses: all, or ``--limit`` of them spread over the set (:func:`spread_indices`)."""
    return spread_indices(data, args.limit, args.seed)


def write_json(data: Any, path: Path) -> None:
    """``data`` as indented JSON at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True))
    log.info("wrote %s", path)
