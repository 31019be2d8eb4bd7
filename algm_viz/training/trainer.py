"""Train a Segmenter on a segmentation data set: ``train(TrainConfig(...))``.

AdamW, linear warm-up then poly decay (stepped per iteration), cross-entropy with ignore pixels, mixed
precision on CUDA only, optional ALGM during training (batch-wise minimum merging, as the paper
trains). After every epoch ``<out>/last.pt`` holds everything a resumed run needs to continue exactly
where it stopped (model, optimizer, scheduler, scaler, epoch, RNG state); ``<out>/best.pt`` holds the
weights with the best validation mIoU and ``<out>/log.jsonl`` one JSON object per logged event. With
``ema_decay`` set, an exponential moving average of the weights is kept as well (timm's ``ModelEmaV3``),
validated next to the raw weights, and its best epoch saved to ``<out>/best_ema.pt``.
Augmentation randomness is drawn from ``(seed, epoch, index)``, so it does not depend on the order
samples are drawn in or on the number of data-loader workers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from timm.layers import resample_abs_pos_embed
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ..datasets import IGNORE_INDEX, SegmentationFolder, open_dataset, sequence_of
from ..evaluation.metrics import confusion_matrix, miou
from ..models import Segmenter
from ..models.bundled import build_from_config
from ..patch import apply_algm, find_vit
from .augment import Augment, class_mix, resize_short_side

__all__ = ["TrainConfig", "TrainSet", "train", "evaluate", "load_init_weights", "median_frequency_weights"]

log = logging.getLogger(__name__)

#: Parameters never decayed: biases, norms (all 1-D) and these embeddings.
_NO_DECAY = ("pos_embed", "cls_token", "cls_emb", "reg_token")


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoints).

    Attributes:
        out: run folder (``last.pt``, ``best.pt``, ``log.jsonl``).
        dataset, data_root, train_split, val_split, class_names: as :func:`algm_viz.datasets.open_dataset`;
            ``val_split=None`` skips validation (``best.pt`` and ``best_ema.pt`` are then the last epoch's). A
            CamVid split may join folders (``"train+val"``).
        train_sequences, val_sequences: keep only the images of these sequences (file-name prefixes, e.g.
            ``("0001TP", "0016E5")`` / ``("0006R0",)``), None = all: a validation set that shares no recording
            with the training set. Sharing an image is an error; sharing a sequence is logged as a warning.
        val_root: root of the validation data where it differs from ``data_root`` (a ``folder`` data
            set has no splits); None = ``data_root``.
        backbone, decoder, decoder_layers, normalization, encoder_kwargs: as :func:`create_segmenter`.
        init: weights to start from (a bundled/official model folder, ``.safetensors``, or a ``.pt`` of
            this trainer); tensors whose name and shape match are loaded. None = random initialisation.
        short_side: images are resized to this short side before augmentation, and for validation.
        crop_size: ``(h, w)`` training crops; also the size the position embedding is laid out for.
        scale_range, flip_p, jitter: augmentation (see :class:`Augment`).
        class_mix_p: probability that a training sample receives half the classes of another sample of its
            batch (:func:`class_mix`); 0 = off.
        epochs, batch_size, lr, weight_decay: optimisation (AdamW).
        warmup_iters, warmup_ratio: linear warm-up length in iterations, from ``lr * warmup_ratio``.
        poly_power: exponent of the poly decay to 0 after warm-up.
        grad_clip: max gradient norm, None = no clipping.
        drop_path_rate: stochastic depth of the encoder.
        class_weighting: ``"none"`` or ``"median_freq"`` (cross-entropy weights median(f)/f_c from the
            training labels' class frequencies f, as SegNet trains on CamVid).
        eval_every, eval_batch_size: validate every this many epochs (and after the last one), with
            this many images per forward.
        log_every: write the loss to ``log.jsonl`` every this many iterations.
        seed: seeds the initialisation, the shuffling and the augmentation.
        threads: torch/OpenCV CPU threads, None = library default.
        workers: data-loader worker processes.
        device: ``"cpu"``, ``"cuda"``, ...; ``amp`` enables fp16 autocast (CUDA only).
        algm: train with ALGM applied (``batch_min=True``) at ``algm_thresholds`` (None = defaults).
        resume: continue from ``<out>/last.pt`` when it exists.
        progress: show a tqdm progress bar.
        ema_decay: keep an exponential moving average of the weights with at most this decay (None = off);
            the decay warms up as ``1 - (1 + step) ** -ema_warmup_power`` (timm ``ModelEmaV3``).
    """

    out: str = "runs/train"
    dataset: str = "camvid"
    data_root: str = "../shared/data/camvid"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    train_sequences: Optional[Sequence[str]] = None
    val_sequences: Optional[Sequence[str]] = None
    val_root: Optional[str] = None
    class_names: Optional[Sequence[str]] = None
    backbone: str = "vit_tiny_patch16_384"
    decoder: str = "mask_transformer"
    decoder_layers: int = 2
    normalization: str = "vit"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    init: Optional[str] = None
    short_side: int = 240
    crop_size: tuple[int, int] = (240, 240)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_p: float = 0.5
    jitter: float = 0.25
    class_mix_p: float = 0.0
    epochs: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_iters: int = 200
    warmup_ratio: float = 1e-3
    poly_power: float = 0.9
    grad_clip: Optional[float] = 1.0
    drop_path_rate: float = 0.1
    class_weighting: str = "none"
    eval_every: int = 2
    eval_batch_size: int = 4
    log_every: int = 10
    threads: Optional[int] = None
    workers: int = 0
    device: str = "cpu"
    amp: bool = True
    seed: int = 0
    algm: bool = False
    algm_thresholds: Optional[dict[str, float]] = None
    resume: bool = False
    progress: bool = True
    ema_decay: Optional[float] = None
    ema_warmup_power: float = 2 / 3

    def __post_init__(self) -> None:
        self.crop_size = tuple(int(s) for s in self.crop_size)
        self.scale_range = tuple(float(s) for s in self.scale_range)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "short_side": self.short_side,
                    "eval_every": self.eval_every, "eval_batch_size": self.eval_batch_size, "log_every": self.log_every}
        bad = {k: v for k, v in positive.items() if int(v) <= 0}
        if bad:
            raise ValueError(f"these settings must be positive: {bad}")
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be two positive ints, got {self.crop_size}")
        if self.class_weighting not in ("none", "median_freq"):
            raise ValueError(f"class_weighting must be 'none' or 'median_freq', got {self.class_weighting!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_iters < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_iters >= 0")
        if not 0 <= self.class_mix_p <= 1:
            raise ValueError(f"class_mix_p must be in [0, 1], got {self.class_mix_p}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("train_sequences", "val_sequences"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [value] if isinstance(value, str) else list(value))

    def model_config(self, num_classes: int) -> dict[str, Any]:
        """Keyword arguments of :func:`create_segmenter` that rebuild the trained network."""
        return {"backbone": self.backbone, "decoder": self.decoder, "num_classes": num_classes,
                "image_size": list(self.crop_size), "normalization": self.normalization,
                "decoder_layers": self.decoder_layers, **self.encoder_kwargs}


def load_init_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors of ``path`` whose name and shape match into ``model``; returns the names skipped.

    A position embedding laid out for another image size is resampled to the model's grid first (the
    source grid comes from the file's model config where it has one, else a square grid is assumed).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "checkpoint.pth", path / "best.pt"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{candidates[0].parent} holds no model.safetensors, checkpoint.pth or best.pt")
    if not path.is_file():
        raise FileNotFoundError(f"initial weights {path} do not exist")
    model_config: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        config_file = path.with_name("config.json")
        if config_file.is_file():
            model_config = json.loads(config_file.read_text()).get("model", {})
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint)
        model_config = checkpoint.get("model_config") or {}
    own = model.state_dict()
    state = _fit_position_embeddings(model, state, own, model_config.get("image_size"))
    matched = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"no tensor of {path} fits this model")
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(own) - set(matched))
    log.info("initialised %d tensors from %s (%d left at random: %s)", len(matched), path, len(skipped), skipped[:5])
    return skipped


def _fit_position_embeddings(model: nn.Module, state: dict[str, Tensor], own: dict[str, Tensor],
                             source_image_size: Optional[Sequence[int] | int]) -> dict[str, Tensor]:
    """Resample each ``*pos_embed`` ``[1, P + h*w, C]`` of ``state`` laid out for another grid than the
    model's to the model's grid (bicubic, the ``P`` prefix tokens kept). The source grid is
    ``source_image_size // patch`` where known; otherwise a square grid if the token counts differ."""
    vit = find_vit(model)
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    patch_h, patch_w = vit.patch_embed.patch_size
    target_grid = [int(n) for n in vit.patch_embed.grid_size]
    fitted = dict(state)
    for name, tensor in state.items():
        wanted = own.get(name)
        if not name.endswith("pos_embed") or wanted is None or tensor.ndim != 3 or tensor.shape[-1] != wanted.shape[-1]:
            continue
        tokens = tensor.shape[1] - prefix
        if source_image_size is not None:
            height, width = (source_image_size,) * 2 if isinstance(source_image_size, int) else source_image_size
            source_grid = [int(height) // patch_h, int(width) // patch_w]
        elif tensor.shape != wanted.shape:
            source_grid = [math.isqrt(tokens)] * 2
        else:
            continue
        if source_grid == target_grid:
            continue
        if source_grid[0] * source_grid[1] != tokens:
            log.warning("%s holds %d grid tokens, not a %dx%d grid: not resampled", name, tokens, *source_grid)
            continue
        fitted[name] = resample_abs_pos_embed(tensor.float(), target_grid, source_grid, num_prefix_tokens=prefix)
        log.info("resampled %s from a %dx%d to a %dx%d grid", name, *source_grid, *target_grid)
    return fitted


class TrainSet(Dataset):
    """A :class:`SegmentationFolder` held in memory at ``short_side``, augmented per item.

    ``ds[i]`` -> ``([3, h, w]`` uint8 image, ``[h, w]`` long label``)`` at the augmentation's crop size.
    Call :meth:`set_epoch` before each epoch: the randomness of item ``i`` is seeded by ``(seed, epoch, i)``.
    """

    def __init__(self, folder: SegmentationFolder, short_side: int, augment: Augment, seed: int = 0) -> None:
        if folder.labels is None:
            raise ValueError(f"{folder.images} has no label maps to train on")
        pairs = [resize_short_side(*folder[i], short_side) for i in range(len(folder))]
        self.images, self.labels = [p[0] for p in pairs], [p[1] for p in pairs]
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def class_frequencies(self, num_classes: int) -> np.ndarray:
        """``[K]`` share of the labelled pixels in each class."""
        counts = sum(np.bincount(label.ravel(), minlength=256)[:num_classes] for label in self.labels)
        return counts / max(counts.sum(), 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image, label = self.augment(self.images[index], self.labels[index], rng)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label).long()


def median_frequency_weights(frequencies: np.ndarray) -> Tensor:
    """``[K]`` class frequencies -> ``[K]`` loss weights ``median(f) / f_c`` (1 for absent classes)."""
    present = frequencies > 0
    weight = np.ones(len(frequencies), dtype=np.float32)
    weight[present] = np.median(frequencies[present]) / frequencies[present]
    return torch.from_numpy(weight)


def _normalise(images: Tensor, model: Segmenter) -> Tensor:
    """``[B, 3, H, W]`` uint8 -> float, normalised as ``model`` expects."""
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in model.mean_std)
    return (images.float() / 255 - mean) / std


def _val_batches(folder: SegmentationFolder, short_side: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of equally sized ``([B, h, w, 3]`` resized images, ``[B, H, W]`` original labels``)``."""
    items = [(resize_short_side(image, None, short_side)[0], label) for image, label in (folder[i] for i in range(len(folder)))]
    by_shape: dict[tuple, list[int]] = {}
    for i, (image, label) in enumerate(items):
        by_shape.setdefault((image.shape, label.shape), []).append(i)
    chunks = [indices[start : start + batch_size] for indices in by_shape.values() for start in range(0, len(indices), batch_size)]
    return [(np.stack([items[i][0] for i in chunk]), np.stack([items[i][1] for i in chunk])) for chunk in chunks]


@torch.no_grad()
def evaluate(model: Segmenter, folder: SegmentationFolder, short_side: int, batch_size: int = 4,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Single-scale whole-image validation: inputs resized to ``short_side``, logits upsampled to the
    label's size. Returns ``{"miou": %, "iou": {class: %}}`` (classes absent everywhere are left out)."""
    return _evaluate_batches(model, _val_batches(folder, short_side, batch_size), folder.class_names, device)


@torch.no_grad()
def _evaluate_batches(model: Segmenter, batches: Sequence[tuple[np.ndarray, np.ndarray]], class_names: Sequence[str],
                      device: str | torch.device) -> dict[str, Any]:
    """:func:`evaluate` on batches prepared once by :func:`_val_batches`."""
    was_training = model.training
    model.eval()
    k = len(class_names)
    confusion = torch.zeros(k, k, dtype=torch.long, device=device)
    for images, labels in batches:
        inputs = _normalise(torch.from_numpy(images).to(device).permute(0, 3, 1, 2), model)
        logits = F.interpolate(model(inputs).float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), torch.from_numpy(labels).to(device), k)
    model.train(was_training)
    mean, iou = miou(confusion.cpu())
    return {"miou": mean, "iou": {name: round(float(v), 2) for name, v in zip(class_names, iou) if not math.isnan(v)}}


def _check_disjoint(train_folder: SegmentationFolder, val_folder: SegmentationFolder) -> list[str]:
    """Raise when the validation set holds a training image; warn when the two share a sequence. Returns the
    shared sequences (what a model card says of its validation mIoU)."""
    shared_files = {p.resolve() for p in train_folder.files} & {p.resolve() for p in val_folder.files}
    if shared_files:
        raise ValueError(f"{len(shared_files)} validation images are also training images, e.g. {min(shared_files).name}")
    shared = sorted({sequence_of(p) for p in train_folder.files} & {sequence_of(p) for p in val_folder.files})
    if shared:
        log.warning("training and validation images share sequence(s) %s: the validation mIoU is optimistic", shared)
    return shared


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or any(key in name for key in _NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(total: int, warmup: int, ratio: float, power: float):
    def factor(step: int) -> float:
        if step < warmup:
            return ratio + (1 - ratio) * step / warmup
        return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power
    return factor


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically (a killed run never leaves a half-written checkpoint)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _append_json(path: Path, **record: Any) -> None:
    """Append ``record`` as one line of JSON to ``path``."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training. Returns ``{"best_miou", "best_epoch", "epochs", "steps", "wall_s"}``."""
    if config.threads:
        torch.set_num_threads(config.threads)
        cv2.setNumThreads(config.threads)
    device = torch.device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train_folder = open_dataset(config.dataset, config.data_root, config.train_split, config.class_names,
                                config.train_sequences)
    val_root = config.val_root or config.data_root
    val_folder = (open_dataset(config.dataset, val_root, config.val_split, config.class_names, config.val_sequences)
                  if config.val_split else None)
    shared_sequences = _check_disjoint(train_folder, val_folder) if val_folder is not None else []
    val_batches = _val_batches(val_folder, config.short_side, config.eval_batch_size) if val_folder is not None else []
    augment = Augment(config.crop_size, config.scale_range, config.flip_p, config.jitter)
    train_set = TrainSet(train_folder, config.short_side, augment, config.seed)

    torch.manual_seed(config.seed)
    model_config = config.model_config(train_folder.num_classes)
    model = build_from_config(model_config, drop_path_rate=config.drop_path_rate).to(device)
    if config.init:
        load_init_weights(model, config.init)
    if config.algm:
        thresholds = config.algm_thresholds or {}
        apply_algm(model, local_threshold=thresholds.get("local"), global_threshold=thresholds.get("global"), batch_min=True)
    ema = (ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, warmup_power=config.ema_warmup_power)
           if config.ema_decay is not None else None)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, config.warmup_iters, config.warmup_ratio, config.poly_power))
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    weight = None
    if config.class_weighting == "median_freq":
        weight = median_frequency_weights(train_set.class_frequencies(train_folder.num_classes)).to(device)
        log.info("class weights: %s", [round(float(w), 3) for w in weight])
    criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)

    start_epoch, step, best, best_epoch, wall = 0, 0, -1.0, -1, 0.0
    best_ema, best_ema_epoch = -1.0, -1
    last_path, best_path, best_ema_path = out / "last.pt", out / "best.pt", out / "best_ema.pt"
    if config.resume and last_path.is_file():
        # On the CPU: the RNG states must stay CPU byte tensors; load_state_dict moves the rest to the device.
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start_epoch, step, best, best_epoch, wall = (ckpt[k] for k in ("epoch", "step", "best_miou", "best_epoch", "wall_s"))
        best_ema, best_ema_epoch = ckpt.get("best_ema_miou", -1.0), ckpt.get("best_ema_epoch", -1)
        log.info("resumed from %s after epoch %d (step %d)", last_path, start_epoch, step)
    elif last_path.is_file():
        raise ValueError(f"{last_path} exists: pass resume to continue that run, or choose another output folder")
    log_path = out / "log.jsonl"
    _append_json(log_path, event="start" if start_epoch == 0 else "resume", epoch=start_epoch, config=asdict(config),
                 model_config=model_config, steps_per_epoch=steps_per_epoch, train_images=len(train_set),
                 val_images=len(val_folder) if val_folder is not None else 0,
                 device=str(device), threads=torch.get_num_threads())

    meta = {"model_config": model_config, "config": asdict(config), "class_names": list(train_folder.class_names),
            "colors": [list(c) for c in train_folder.colors], "shared_sequences": shared_sequences}
    model.train()
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, num_workers=config.workers,
                            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress, leave=False)
        running, seen = 0.0, 0
        mix_generator = torch.Generator().manual_seed(2 * (config.seed * 100_003 + epoch) + 1)  # apart from the loader seeds
        for images, labels in bar:
            if config.class_mix_p:
                images, labels = class_mix(images, labels, mix_generator, config.class_mix_p, train_folder.num_classes)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = criterion(model(_normalise(images, model)).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update(model, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"loss became {value} at step {step}; lower the learning rate")
            running, seen = running + value, seen + 1
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % config.log_every == 0:
                _append_json(log_path, event="train", epoch=epoch + 1, step=step, loss=value, lr=scheduler.get_last_lr()[0])
        wall += time.perf_counter() - began
        record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "step": step, "loss": running / max(seen, 1),
                                  "wall_s": round(wall, 1)}
        if val_folder is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            metrics = _evaluate_batches(model, val_batches, val_folder.class_names, device)
            record.update(val_miou=metrics["miou"], val_iou=metrics["iou"])
            if metrics["miou"] > best:
                best, best_epoch = metrics["miou"], epoch + 1
                save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "val_miou": best, **meta}, best_path)
            if ema is not None:
                ema_metrics = _evaluate_batches(ema.module, val_batches, val_folder.class_names, device)
                record.update(ema_val_miou=ema_metrics["miou"], ema_val_iou=ema_metrics["iou"])
                if ema_metrics["miou"] > best_ema:
                    best_ema, best_ema_epoch = ema_metrics["miou"], epoch + 1
                    save_checkpoint({"model": ema.module.state_dict(), "epoch": epoch + 1, "val_miou": best_ema, **meta},
                                    best_ema_path)
        elif val_folder is None:
            best_epoch = epoch + 1
            save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "val_miou": None, **meta}, best_path)
            if ema is not None:
                best_ema_epoch = epoch + 1
                save_checkpoint({"model": ema.module.state_dict(), "epoch": epoch + 1, "val_miou": None, **meta},
                                best_ema_path)
        _append_json(log_path, **record)
        log.info("epoch %d/%d: loss %.4f%s%s", epoch + 1, config.epochs, record["loss"],
                 f", val mIoU {record['val_miou']:.2f}" if "val_miou" in record else "",
                 f", EMA val mIoU {record['ema_val_miou']:.2f}" if "ema_val_miou" in record else "")
        state = {"rng": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **state,
                         "epoch": epoch + 1, "step": step, "best_miou": best, "best_epoch": best_epoch,
                         "best_ema_miou": best_ema, "best_ema_epoch": best_ema_epoch,
                         "wall_s": wall, **meta}, last_path)
    summary = {"best_miou": best if best >= 0 else None, "best_epoch": best_epoch, "epochs": config.epochs,
               "steps": step, "wall_s": round(wall, 1)}
    if ema is not None:
        summary.update(best_ema_miou=best_ema if best_ema >= 0 else None, best_ema_epoch=best_ema_epoch)
    if start_epoch < config.epochs:
        _append_json(log_path, event="done", **summary)
    return summary
