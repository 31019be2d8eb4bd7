"""``algm-viz train``: train a Segmenter on a segmentation data set, resume it, export it as a bundled model."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import MISSING, fields
from pathlib import Path

from ..datasets import parse_sequences
from ..training.trainer import TrainConfig

log = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _pair(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return parts[0], parts[1]


def _range(text: str) -> tuple[float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}")
    return parts[0], parts[1]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a Segmenter (and export it as a bundled model)",
                              description=__doc__.split("\n")[0].strip("`: "),
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = _DEFAULTS
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=d["dataset"], choices=("camvid", "ade20k", "folder"))
    data.add_argument("--data-root", default=d["data_root"])
    data.add_argument("--train-split", default=d["train_split"])
    data.add_argument("--val-split", default=d["val_split"], help="'none' skips validation")
    data.add_argument("--train-sequences", default=None, metavar="A,B",
                      help="train only on these sequences (file-name prefixes, e.g. 0001TP,0016E5); default all. "
                           "A CamVid split may join folders: --train-split train+val")
    data.add_argument("--val-sequences", default=None, metavar="A,B",
                      help="validate only on these sequences (e.g. 0006R0 with --val-split train+val); default all")
    data.add_argument("--val-root", default=None, help="validation data root if not --data-root ('folder' data sets)")
    data.add_argument("--class-names", nargs="+", default=None, help="class names of a 'folder' data set")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default=d["backbone"], help="timm plain ViT")
    model.add_argument("--decoder", default=d["decoder"], choices=("mask_transformer", "linear"))
    model.add_argument("--decoder-layers", type=int, default=d["decoder_layers"])
    model.add_argument("--normalization", default=d["normalization"], choices=("vit", "deit"))
    model.add_argument("--encoder-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"depth": 6}\'')
    model.add_argument("--init", default=None, help="initial weights (model folder, .safetensors or .pt); default random")
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--short-side", type=int, default=d["short_side"], help="resize images to this short side")
    aug.add_argument("--crop-size", type=_pair, default=d["crop_size"], help="N or HxW")
    aug.add_argument("--scale-range", type=_range, default=d["scale_range"], help="LOW,HIGH")
    aug.add_argument("--flip-p", type=float, default=d["flip_p"])
    aug.add_argument("--jitter", type=float, default=d["jitter"], help="colour jitter strength, 0 = off")
    aug.add_argument("--class-mix", type=float, default=d["class_mix_p"], metavar="P",
                     help="ClassMix probability: a sample receives half the classes of another in its batch; 0 = off")
    opt = p.add_argument_group("optimisation")
    for name in ("epochs", "batch_size", "warmup_iters", "eval_every", "eval_batch_size", "log_every", "workers", "seed"):
        opt.add_argument(f"--{name.replace('_', '-')}", type=int, default=d[name])
    for name in ("lr", "weight_decay", "warmup_ratio", "poly_power", "grad_clip", "drop_path_rate"):
        opt.add_argument(f"--{name.replace('_', '-')}", type=float, default=d[name])
    opt.add_argument("--class-weighting", default=d["class_weighting"], choices=("none", "median_freq"))
    opt.add_argument("--ema-decay", type=float, default=None,
                     help="keep an EMA of the weights with at most this decay (e.g. 0.999), validated next to the "
                          "raw weights, best epoch in <out>/best_ema.pt; default off")
    opt.add_argument("--ema-warmup-power", type=float, default=d["ema_warmup_power"],
                     help="EMA decay warm-up: 1 - (1 + step) ** -power")
    run = p.add_argument_group("run")
    run.add_argument("--out", default=d["out"], help="run folder (last.pt, best.pt, log.jsonl)")
    run.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    run.add_argument("--device", default=d["device"])
    run.add_argument("--no-amp", action="store_true", help="no fp16 autocast on CUDA")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for torch and OpenCV")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--algm", action="store_true", help="train with ALGM applied (batch-wise minimum merging)")
    run.add_argument("--algm-thresholds", type=_range, default=None, metavar="LOCAL,GLOBAL")
    run.add_argument("--export", default=None, metavar="FOLDER",
                     help="after training, write best.pt (best_ema.pt with --ema-decay) as a bundled model "
                          "(safetensors fp16 + config.json)")
    p.set_defaults(run=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that the parsed options describe."""
    thresholds = dict(zip(("local", "global"), args.algm_thresholds)) if args.algm_thresholds else None
    return TrainConfig(
        out=args.out, dataset=args.dataset, data_root=args.data_root, train_split=args.train_split,
        val_split=None if str(args.val_split).lower() == "none" else args.val_split, val_root=args.val_root,
        train_sequences=parse_sequences(args.train_sequences), val_sequences=parse_sequences(args.val_sequences),
        class_names=args.class_names,
        backbone=args.backbone, decoder=args.decoder, decoder_layers=args.decoder_layers,
        normalization=args.normalization, encoder_kwargs=args.encoder_kwargs, init=args.init,
        short_side=args.short_side, crop_size=args.crop_size, scale_range=args.scale_range, flip_p=args.flip_p,
        jitter=args.jitter, class_mix_p=args.class_mix, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, warmup_ratio=args.warmup_ratio,
        poly_power=args.poly_power, grad_clip=args.grad_clip or None, drop_path_rate=args.drop_path_rate,
        class_weighting=args.class_weighting, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        log_every=args.log_every, threads=args.threads, workers=args.workers, device=args.device,
        amp=not args.no_amp, seed=args.seed, algm=args.algm, algm_thresholds=thresholds, resume=args.resume,
        progress=not args.no_progress, ema_decay=args.ema_decay, ema_warmup_power=args.ema_warmup_power,
    )


def run_train(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    summary = train(config_from_args(args))
    log.info("training done: %s", summary)
    if args.export:
        from ..models.bundled import export_run

        weights = "best_ema.pt" if args.ema_decay is not None else "best.pt"
        folder = export_run(Path(args.out) / weights, args.export)
        log.info("exported %s", folder)
    return 0
