"""``algm-viz sweep | calibrate | analyze | balance``: measure ALGM on a model and a data set.

``--model`` takes a bundled model name/folder, an official Segmenter checkpoint (known name, URL or
folder), or ``untrained:<timm backbone>`` (random weights, seeded by ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import torch
from torch import nn

from . import apply_algm
from .datasets import SegmentationFolder, open_dataset, parse_sequences, sequence_of, spread_indices
from .evaluation.balance import aggregate_balance, attention_balance
from .evaluation.calibrate import calibrate, store_thresholds
from .evaluation.distributed import setup, teardown
from .evaluation.inference import DTYPES, default_short_side, merging_disabled, prepare
from .evaluation.purity import purity_analysis
from .evaluation.similarity import similarity_analysis
from .evaluation.sweep import SweepConfig, available_methods, parse_taus, sweep
from .plots import balance_figure, pareto_figure, rows_to_csv, similarity_figure, threshold_figure, write_html

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    """``"1,5"`` or ``"2:8"`` (inclusive) -> ints."""
    if ":" in text:
        start, stop = (int(v) for v in text.split(":"))
        return list(range(start, stop + 1))
    return [int(v) for v in text.split(",") if v.strip()]


def _window(text: str) -> tuple[int, int]:
    values = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _method_values(text: str) -> tuple[str, list[float]]:
    """``"tome=4,8"`` -> ``("tome", [4.0, 8.0])``."""
    name, _, values = text.partition("=")
    try:
        return name.strip(), [float(v) for v in values.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected METHOD=V1,V2,..., got {text!r}") from error


def _add_data_args(parser: argparse.ArgumentParser, split: str | None) -> None:
    parser.add_argument("--model", required=True, help="bundled name/folder, official checkpoint, or untrained:<backbone>")
    parser.add_argument("--data", required=True, type=Path, help="data set root folder")
    parser.add_argument("--dataset", choices=("camvid", "ade20k", "folder"), default="camvid", help="data set layout")
    parser.add_argument("--split", default=split,
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
    parser.add_argument("--threads", type=int, help="torch and OpenCV CPU threads (None: the libraries' choice)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds untrained:<backbone> weights, the --limit draw and the bootstrap resamples")


def _add_algm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local-layer", type=int, default=1, help="CLAP layer, 1-based")
    parser.add_argument("--global-layer", type=int, default=5, help="GBM layer, 1-based")
    parser.add_argument("--window", type=_window, default="2", help="CLAP window, k or kh,kw")


def _dataset(args: argparse.Namespace) -> SegmentationFolder:
    names = None
    if args.classes:
        path = Path(args.classes)
        names = [n.strip() for n in (path.read_text().splitlines() if path.is_file() else args.classes.split(",")) if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    return open_dataset(args.dataset, args.data, args.split, names, parse_sequences(args.sequences))


def _model(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    from .models.loading import load_model

    torch.manual_seed(args.seed)
    model = load_model(args.model, num_classes=num_classes)
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise ValueError(f"the model predicts {model.num_classes} classes but the data set has {num_classes}")
    return model.to(device).eval()


def _selection(dataset: Any, args: argparse.Namespace) -> list[int]:
    """The images a command uses: all, or ``--limit`` of them spread over the set (:func:`spread_indices`)."""
    return spread_indices(dataset, args.limit, args.seed)


def _write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True))
    log.info("wrote %s", path)


def run_sweep(args: argparse.Namespace) -> int:
    context = setup(args.device)
    try:
        dataset = _dataset(args)
        model = _model(args, dataset.num_classes, context.device)
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
                    "sequences": sorted({sequence_of(dataset.files[i]) for i in spread_indices(dataset, args.limit, args.seed)}),
                    "images": rows[0]["images"] if rows else 0,
                    "uncertainty": f"delta_miou_ci: paired bootstrap ({config.bootstrap} resamples of the images, seed "
                                   f"{config.seed}) of the pooled-mIoU difference to the baseline, "
                                   f"{100 * config.confidence:g}% percentile interval; miou_ci: the row's own mIoU",
                    "class_names": list(dataset.class_names), "processes": context.world_size,
                    "device": str(context.device), "short_side": config.short_side or default_short_side(model),
                    "inference": "whole image", "config": {**asdict(config), "dtype": args.dtype},
                    "throughput": "median (p25, p75) over batches of batch_size / model-forward seconds, after warm-up, "
                                  "device-synchronised; times the number of processes under torchrun"}
            _write_json({**meta, "rows": rows}, out)
            rows_to_csv(rows, out.with_suffix(".csv"), dataset.class_names)
            write_html([threshold_figure(rows), pareto_figure(rows, "gflops"), pareto_figure(rows, "images_per_s")],
                       out.with_suffix(".html"), title=f"algm-viz sweep: {args.model} on {dataset.name} "
                                                       f"{args.split or ''} {','.join(meta['sequences'])} ({meta['images']} images)")
            log.info("wrote %s and %s", out.with_suffix(".csv"), out.with_suffix(".html"))
    finally:
        teardown(context)
    return 0


def _images(dataset: Any, indices: list[int]):
    for index in indices:
        yield dataset[index][0]


#: The paper calibrates on the training set.
TRAIN_SPLITS = {"camvid": "train", "ade20k": "training"}


def run_calibrate(args: argparse.Namespace) -> int:
    args.split = args.split or TRAIN_SPLITS.get(args.dataset)
    dataset = _dataset(args)
    device = torch.device(args.device)
    model = _model(args, dataset.num_classes, device)
    indices = _selection(dataset, args)
    short_side = args.short_side or default_short_side(model)
    result = calibrate(model, _images(dataset, indices), (args.local_layer, args.global_layer), args.window,
                       short_side=short_side, device=device, progress=True, total=len(indices))
    result["choice"] = "auto τ = μ + σ over all token pairs per layer (paper Sec. 3.3); window τ reported only"
    _write_json(result, args.out)
    log.info("τ local %.4f (window statistic %.4f), τ global %.4f", result["local"], result["window"]["tau"], result["global"])
    if max(result["local"], result["global"]) >= 1:
        log.warning("τ = μ + σ >= 1 merges nothing (cosine similarity is at most 1): is the model trained?")
    if args.store:
        from .models.bundled import bundled_dir

        folder = Path(args.model)
        if not folder.exists():
            folder = bundled_dir(args.model)
        log.info("stored thresholds in %s", store_thresholds(folder, result))
    return 0


def _purity_taus(text: str) -> list[float]:
    """``--purity-taus``: numbers only (one τ for both stages)."""
    taus = parse_taus(text)
    if any(isinstance(tau, str) for tau in taus):
        raise ValueError(f"--purity-taus takes numbers (start:stop:step or a,b,c), got {text!r}")
    return taus


def run_analyze(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    device = torch.device(args.device)
    model = _model(args, dataset.num_classes, device)
    indices = _selection(dataset, args)
    result = similarity_analysis(
        model, (dataset[i] for i in indices), dataset.num_classes, window_sizes=_int_list(args.windows),
        local_layer=args.local_layer, layers=_int_list(args.layers) if args.layers else None,
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
    _write_json(result, args.out)
    write_html([similarity_figure(result)], args.out.with_suffix(".html"), title="algm-viz similarity analysis")
    return 0


def run_balance(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    device = torch.device(args.device)
    model = _model(args, dataset.num_classes, device)
    apply_algm(model, args.local_layer, args.global_layer, args.window, args.tau, args.tau)
    short_side = args.short_side or default_short_side(model)
    per_image = []
    for index in _selection(dataset, args):
        image, label = dataset[index]
        x = prepare(model, image, short_side, device)
        if args.labels == "pred" or label is None:
            with merging_disabled(model), torch.inference_mode():
                labels = model(x).argmax(1)
        else:
            label = cv2.resize(label, (x.shape[-1], x.shape[-2]), interpolation=cv2.INTER_NEAREST)
            labels = torch.from_numpy(label).long()[None]
        per_image.append(attention_balance(model, x, labels, dataset.num_classes,
                                           layer=_int_list(args.layers) if args.layers else None))
    result = {**aggregate_balance(per_image), "class_names": list(dataset.class_names), "images": len(per_image)}
    _write_json(result, args.out)
    write_html([balance_figure(result, dataset.class_names)], args.out.with_suffix(".html"), title="algm-viz attention balance")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("sweep", help="mIoU, images/s, GFLOPs and tokens for the baseline and each method × τ",
                              formatter_class=formatter)
    _add_data_args(p, None)
    _add_algm_args(p)
    p.add_argument("--taus", default="0.80:0.98:0.02", help="start:stop:step (inclusive) or a,b,c; 'auto' (alone or as an item) adds the model's calibrated τ pair, 'official' the official ALGM code's mode (online GBM threshold; each row's thresholds_used says what it was)")
    p.add_argument("--methods", default="baseline,algm", help=f"comma-separated, from {','.join(available_methods())}")
    p.add_argument("--values", type=_method_values, action="append", metavar="METHOD=V1,V2",
                   help="knob values of a non-τ method, e.g. tome=4,8 (repeatable; default: the method's own)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per configuration")
    p.add_argument("--flops-images", type=int, default=-1,
                   help="GFLOPs averaged over every evaluated image (-1), or over the first N per process (a faster "
                        "estimate; each row records how many)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="paired bootstrap resamples over images for the ΔmIoU interval against the baseline (0: none)")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap interval")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="precision of the forwards (autocast)")
    p.add_argument("--out", type=Path, default=Path("results.json"), help="JSON out; .csv and .html written beside it")
    p.set_defaults(run=run_sweep)

    p = subparsers.add_parser("calibrate", help="automatic τ = μ + σ of token similarities (paper Sec. 3.3)",
                              formatter_class=formatter)
    _add_data_args(p, None)  # split default: the training split (TRAIN_SPLITS)
    _add_algm_args(p)
    p.add_argument("--store", action="store_true",
                   help="write the thresholds into the model (a local official-format folder or a bundled model)")
    p.add_argument("--out", type=Path, default=Path("calibration.json"), help="JSON with the statistics")
    p.set_defaults(run=run_calibrate)

    p = subparsers.add_parser("analyze", help="intra- vs inter-class token similarity (paper Fig. 2)",
                              formatter_class=formatter)
    _add_data_args(p, None)
    p.add_argument("--local-layer", type=int, default=1, help="layer of the window analysis")
    p.add_argument("--windows", default="2:8", help="window sizes k, from:to or a,b")
    p.add_argument("--layers", help="layers of the global analysis, e.g. 1:12 (None: all)")
    p.add_argument("--purity-taus", metavar="TAUS",
                   help="also measure merge purity and error attribution of ALGM at these τ (both stages; "
                        "start:stop:step or a,b,c), into the JSON's 'purity' (None: skip)")
    p.add_argument("--global-layer", type=int, default=5, help="GBM layer of the purity runs, 1-based")
    p.add_argument("--window", type=_window, default="2", help="CLAP window of the purity runs, k or kh,kw")
    p.add_argument("--out", type=Path, default=Path("similarity.json"), help="JSON out; .html written beside it")
    p.set_defaults(run=run_analyze)

    p = subparsers.add_parser("balance", help="class shares of tokens and attention, without and with ALGM",
                              formatter_class=formatter)
    _add_data_args(p, None)
    _add_algm_args(p)
    p.add_argument("--tau", type=float, help="τ for both stages (None: the model's calibrated or the authors')")
    p.add_argument("--labels", choices=("gt", "pred"), default="gt", help="token classes from ground truth or prediction")
    p.add_argument("--layers", help="layers to average attention over (None: those after the global merge)")
    p.add_argument("--out", type=Path, default=Path("balance.json"), help="JSON out; .html written beside it")
    p.set_defaults(run=run_balance)
