"""Sweep τ: segmentation quality, throughput, GFLOPs and token counts per merging method and threshold.

Evaluation is single-scale on the whole image: each image is resized so that its short side is
``short_side`` (default: the model's ``info.short_side``, else kept), normalised with the model's
statistics, and the predicted labels are the arg-max of the logits resized bilinearly to the label size,
computed in tiles without the label-size logits (:func:`~.inference.resized_argmax`). Batches hold
consecutive images of one size (a size change starts a new batch), so no padding tokens take part in
merging.

Under ``torchrun`` every process evaluates every ``world_size``-th image; confusion matrices and token
sums are summed exactly over processes.

Every row of a method carries its difference in pooled mIoU to the baseline with a paired bootstrap
interval over images (the same seeded resamples of the per-image confusion matrices for every row), and
GFLOPs and token counts are averaged over every evaluated image unless ``flops_images`` caps them. The GFLOPs of
each image are exact without a counted forward for each: :class:`~algm_viz.flops.TokenCountFlops` counts a few
forwards per configuration and input shape and takes the rest from the token counts the merges left.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..datasets import IGNORE_INDEX, spread_indices
from ..flops import TokenCountFlops
from ..timing import rate_summary, timed
from .. import methods as engine_methods
from ..patch import ONLINE, algm_state, find_vit, merging_restored, remove_algm
from .distributed import Context, all_gather_objects, all_reduce_sum
from .inference import autocast, default_short_side, prepare, resized_argmax
from .metrics import confusion_matrices, miou, paired_bootstrap
from .rows import SweepRow

__all__ = ["available_methods", "SweepConfig", "parse_taus", "sweep", "evaluate", "measured_row", "configure_method",
           "add_intervals"]

logger = logging.getLogger(__name__)

_STAGES = ("patches", "local", "global", "final")


def available_methods() -> list[str]:
    """``baseline``, then the engine's methods (:data:`algm_viz.methods.METHODS`: the ALGM variants first)."""
    return ["baseline", *engine_methods.METHODS]


@dataclass
class SweepConfig:
    """What to sweep and how to measure.

    Attributes:
        taus: thresholds of the τ methods; one τ is used for every stage a method runs.
        methods: names from :func:`available_methods`; ``baseline`` is measured once.
        values: knob values of non-τ methods (e.g. ``{"tome": [4, 8]}``); default: the registry's.
        local_layer, global_layer, window: the ALGM placement (paper defaults).
        short_side: resize images to this short side; None = the model's ``info.short_side`` or none.
        batch_size: images per forward (at most; a size change ends a batch).
        warmup: untimed forwards on the first batch before each configuration is timed.
        flops_images: GFLOPs are averaged over the first batches holding at least this many images per process
            (an estimate; it saves little since every image's count is exact and cheap);
            None = every evaluated image (each row says how many it averaged over).
        limit: evaluate only ``limit`` images spread over the whole set (:func:`spread_indices`: seeded,
            stratified by file-name prefix); None = all.
        seed: seeds the ``limit`` draw and the bootstrap resamples.
        bootstrap: resamples of the paired bootstrap of ΔmIoU against the baseline; 0 = no interval.
        confidence: level of the bootstrap interval.
        log_every_s: when stdout is not a terminal, log images done, rate and ETA at most this often.
        dtype: run the forwards under autocast in this precision (``torch.float16``/``torch.bfloat16``);
            None = float32.
    """

    taus: Sequence[float] = field(default_factory=lambda: parse_taus("0.80:0.98:0.02"))
    methods: Sequence[str] = ("baseline", "algm")
    values: dict[str, Sequence[float]] = field(default_factory=dict)
    local_layer: int = 1
    global_layer: int = 5
    window: tuple[int, int] = (2, 2)
    short_side: int | None = None
    batch_size: int = 1
    warmup: int = 2
    flops_images: int | None = None
    limit: int | None = None
    seed: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    log_every_s: float = 30.0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        known = available_methods()
        unknown = [m for m in [*self.methods, *self.values] if m not in known]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: choose from {', '.join(known)}")
        if not self.methods:
            raise ValueError("no methods to sweep")
        if any(knob(m) == "τ" for m in self.methods) and not self.taus:
            raise ValueError("no thresholds to sweep")
        if self.batch_size <= 0 or self.warmup < 0 or (self.limit is not None and self.limit <= 0):
            raise ValueError("batch_size and limit must be positive and warmup >= 0")
        if self.flops_images is not None and self.flops_images < 0:
            raise ValueError("flops_images must be >= 0 (or None for all images)")
        if self.bootstrap < 0 or not 0 < self.confidence < 1:
            raise ValueError("bootstrap must be >= 0 and confidence in (0, 1)")

    def runs(self) -> list[tuple[str, float | None]]:
        """``(method, knob value)`` in sweep order: the baseline first, then each method's values."""
        runs: list[tuple[str, float | None]] = [(m, None) for m in self.methods if m == "baseline"]
        for method in self.methods:
            if method != "baseline":
                values = self.taus if knob(method) == "τ" else self.values.get(method, engine_methods.METHODS[method].values)
                runs += [(method, v if v in (AUTO, OFFICIAL) else float(v)) for v in values]
        return runs


def knob(method: str) -> str | None:
    """What a method's value is (``"τ"``, ``"r"``, ``"ratio"``, ...); None for the baseline."""
    if method == "baseline":
        return None
    return engine_methods.METHODS[method].knob


#: A τ "value" meaning: the model's calibrated (local, global) pair, ``model.info.thresholds``.
AUTO = "auto"
#: A τ "value" meaning: the official ALGM code's mode, GBM's online threshold (CLAP at the calibrated τ).
OFFICIAL = ONLINE


def parse_taus(text: str) -> list[float | str]:
    """``"start:stop:step"`` (stop included) or ``"a,b,c"`` -> sorted thresholds; an ``auto`` item
    (alone or in the list) adds the model's calibrated τ pair, an ``official`` item the official code's
    mode (online GBM threshold, see :func:`~algm_viz.patch.apply_algm`), after the numbers."""
    items = [item.strip() for item in text.split(",")]
    auto = [name for name in (AUTO, OFFICIAL) if name in items]
    text = ",".join(item for item in items if item not in (AUTO, OFFICIAL))
    if not text and auto:
        return auto
    try:
        if ":" in text:
            values = _inclusive_range(text)
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"cannot read thresholds {text!r} (use start:stop:step or a,b,c): {error}") from error
    if not values or any(math.isnan(v) for v in values):
        raise ValueError(f"no thresholds in {text!r}")
    return sorted(values) + auto


def _inclusive_range(text: str) -> list[float]:
    """``"a:b:s"`` -> ``a, a+s, ..., <= b`` computed in decimal, so ``0.70:0.96:0.04`` ends at 0.96."""
    try:
        start, stop, step = (Decimal(v.strip()) for v in text.split(":"))
    except (InvalidOperation, TypeError) as error:
        raise ValueError(f"not three numbers: {error}") from error
    if not all(v.is_finite() for v in (start, stop, step)):
        raise ValueError("start, stop and step must be finite")
    if step <= 0:
        raise ValueError("step must be positive")
    count = int((stop - start) // step) + 1
    return [float(start + i * step) for i in range(max(count, 0))]


def configure_method(model: nn.Module, method: str, value: float | None, config: SweepConfig) -> None:
    """Set ``model`` up for ``method`` at knob ``value`` (removing merging for the baseline)."""
    if method == "baseline":
        remove_algm(model)
    elif engine_methods.METHODS[method].algm:  # placed by the sweep's layers and window; "auto": calibrated τ,
        # "official": the official code's mode
        engine_methods.apply_method(model, method, None if value == AUTO else value, local_layer=config.local_layer,
                                    global_layer=config.global_layer, window=config.window)
    else:
        engine_methods.apply_method(model, method, value)


def _batches(model: nn.Module, dataset: Any, indices: Sequence[int], batch_size: int, short_side: int | None,
             device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """``([B, 3, h, w]`` inputs, ``[B, H, W]`` long labels``)`` of consecutive same-size images."""
    images: list[Tensor] = []
    labels: list[np.ndarray] = []

    def flush() -> tuple[Tensor, Tensor]:
        batch = torch.cat(images), torch.from_numpy(np.stack(labels)).long().to(device)
        images.clear()
        labels.clear()
        return batch

    for index in indices:
        image, label = dataset[index]
        if label is None:
            raise ValueError(f"image {index} of the data set has no label map: the sweep needs labels")
        if labels and (label.shape != labels[0].shape or len(images) == batch_size):
            yield flush()
        images.append(prepare(model, image, short_side, device))
        labels.append(label)
    if images:
        yield flush()


def _token_sums(model: nn.Module, batch: int, grid_tokens: int, method: str) -> tuple[Tensor, Tensor]:
    """Summed tokens over the batch's images: ``[4]`` patches, after the stage named ``local`` (CLAP), after
    ``global`` (GBM) and after the last stage; and ``[S]`` after each token-reducing stage, in order.

    For an ALGM variant an absent stage counts as the one before it (CLAP only: global = local); for the
    other methods, which have no CLAP or GBM stage, ``local``/``global`` are NaN (their counts are the
    per-stage ones); the baseline keeps every patch."""
    state = algm_state(model)
    record = state.record if state is not None else None
    stages = record.stages if record is not None else []
    patches = float(batch * grid_tokens)
    per_stage = torch.tensor([float(merge.counts.sum()) for _, _, merge in stages], dtype=torch.float64)
    final = float(per_stage[-1]) if stages else patches
    if method == "baseline" or engine_methods.METHODS[method].algm:
        counts = record.token_counts() if record is not None else {}
        local = float(counts["local"].sum()) if "local" in counts else patches
        global_ = float(counts["global"].sum()) if "global" in counts else local
    else:
        local = global_ = math.nan
    return torch.tensor([patches, local, global_, final], dtype=torch.float64), per_stage


def _threshold_sums(model: nn.Module) -> Tensor:
    """``[S]`` the similarity thresholds the batch's images were merged with, summed, per token-reducing
    stage (NaN for a stage no threshold decides)."""
    state = algm_state(model)
    stages = state.record.stages if state is not None and state.record is not None else []
    return torch.tensor([math.nan if m.threshold is None else float(m.threshold.sum()) for _, _, m in stages],
                        dtype=torch.float64)


def _stage_names(model: nn.Module) -> list[dict[str, Any]]:
    """``[{"name", "layer"}]`` of the stages the last forward ran."""
    state = algm_state(model)
    record = state.record if state is not None else None
    return [{"name": name, "layer": int(layer)} for name, layer, _ in (record.stages if record is not None else [])]


class _ProgressLog:
    """Logs ``images done / total, images/s, ETA`` at most every ``every_s`` seconds (for logs and pipes, where
    tqdm draws nothing); ``total`` counts the images of every configuration still to come."""

    def __init__(self, total: int, every_s: float, enabled: bool) -> None:
        self.total, self.every_s, self.enabled = total, every_s, enabled
        self.done, self.began = 0, time.perf_counter()
        self.last = self.began

    def update(self, images: int, label: str, force: bool = False) -> None:
        self.done += images
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        rate = self.done / max(now - self.began, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        logger.info("%s: %d/%d images, %.2f images/s, ETA %s", label, self.done, self.total, rate, _duration(eta))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class _DecodedOnce:
    """``dataset`` whose decoded ``(image, label)`` items are kept, up to ``budget_bytes`` of arrays, so that the
    configurations of one sweep decode each image once; other attributes are the dataset's."""

    def __init__(self, dataset: Any, budget_bytes: int = 2**30) -> None:
        self.dataset, self.budget_bytes = dataset, budget_bytes
        self._items: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index in self._items:
            return self._items[index]
        item = self.dataset[index]
        size = sum(np.asarray(part).nbytes for part in item if part is not None)
        if self._bytes + size <= self.budget_bytes:
            self._items[index] = item
            self._bytes += size
        return item

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


def _indices(dataset: Any, config: SweepConfig, context: Context) -> list[int]:
    """This process's share of the images the sweep evaluates."""
    return spread_indices(dataset, config.limit, config.seed)[context.rank :: context.world_size]


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Any, config: SweepConfig, context: Context, *, progress: bool = True,
             description: str = "", method: str = "baseline", progress_log: _ProgressLog | None = None) -> dict[str, Any]:
    """Evaluate ``model`` as configured now (as ``method``) over this process's share of ``dataset``; reduced
    over processes.

    Returns ``{"confusion": [K, K] long, "image_confusions": [N, K, K] long (in data-set order), "images",
    "images_per_s", "images_per_s_spread", "gflops", "flops_images", "tokens": {stage: mean per image},
    "stages": [{"name", "layer", "tokens", "threshold"}]}`` (``threshold``: the mean over images of the
    similarity threshold a stage merged with, e.g. the official online GBM threshold; None without one).
    """
    device = context.device
    num_classes = dataset.num_classes
    indices = _indices(dataset, config, context)
    short_side = config.short_side if config.short_side is not None else default_short_side(model)
    patch = int(find_vit(model).patch_embed.patch_size[0])
    per_image: list[Tensor] = []
    tokens = torch.zeros(len(_STAGES), dtype=torch.float64)
    stage_tokens: Tensor | None = None
    stage_thresholds: Tensor | None = None
    stage_names: list[dict[str, Any]] = []
    flops = torch.zeros(2, dtype=torch.float64)  # GFLOPs sum, images counted
    rates: list[float] = []
    flops_limit = math.inf if config.flops_images is None else config.flops_images
    flops_of = TokenCountFlops(model)  # per configuration: its law depends on the stages
    first = True
    batches = _batches(model, dataset, indices, config.batch_size, short_side, device)
    for images, labels in tqdm(batches, desc=description, leave=False, disable=not progress or None,
                               total=math.ceil(len(indices) / config.batch_size)):
        with autocast(images.device, config.dtype):
            if first:
                for _ in range(config.warmup):
                    model(images)
                first = False
            logits, seconds = timed(lambda: model(images).float(), device)
        rates.append(images.shape[0] / seconds)
        grid_tokens = math.ceil(images.shape[-2] / patch) * math.ceil(images.shape[-1] / patch)
        sums, per_stage = _token_sums(model, images.shape[0], grid_tokens, method)
        tokens += sums
        if stage_tokens is None:
            stage_tokens, stage_thresholds, stage_names = per_stage, _threshold_sums(model), _stage_names(model)
        elif per_stage.shape == stage_tokens.shape:
            stage_tokens += per_stage
            stage_thresholds += _threshold_sums(model)
        else:
            raise RuntimeError(f"{description}: the number of merge stages changed between batches")
        if flops[1] < flops_limit:
            with autocast(images.device, config.dtype):
                flops += torch.tensor([flops_of(images) / 2e9, images.shape[0]], dtype=torch.float64)
        predicted = resized_argmax(logits, labels.shape[-2:])  # never the label-size [B, K, H, W] logits
        per_image.append(confusion_matrices(predicted, labels, num_classes, IGNORE_INDEX).cpu())
        if progress_log is not None:
            progress_log.update(images.shape[0], description)
    logger.debug("%s: the GFLOPs of %d images from %d counted forwards", description, int(flops[1]), flops_of.counted)
    local = torch.cat(per_image) if per_image else torch.zeros(0, num_classes, num_classes, dtype=torch.long)
    gathered = all_gather_objects((indices, local), context)
    order = torch.tensor([i for ranks_indices, _ in gathered for i in ranks_indices], dtype=torch.long)
    image_confusions = torch.cat([c for _, c in gathered])[torch.argsort(order)]
    stage_tokens = stage_tokens if stage_tokens is not None else torch.zeros(0, dtype=torch.float64)
    stage_thresholds = stage_thresholds if stage_thresholds is not None else torch.zeros(0, dtype=torch.float64)
    images_done = torch.tensor([float(len(indices))], dtype=torch.float64)
    tokens, stage_tokens, stage_thresholds, flops, images_done = (
        all_reduce_sum(t, context) for t in (tokens, stage_tokens, stage_thresholds, flops, images_done))
    all_rates = [r for ranks in all_gather_objects(rates, context) for r in ranks]
    speed = rate_summary(all_rates, scale=context.world_size)
    total = max(float(images_done), 1.0)
    return {
        "confusion": image_confusions.sum(0),
        "image_confusions": image_confusions,
        "images": int(images_done),
        "images_per_s": speed["median"],
        "images_per_s_spread": [speed["p25"], speed["p75"]],
        "gflops": float(flops[0] / flops[1]) if flops[1] > 0 else math.nan,
        "flops_images": int(flops[1]),
        "tokens": {stage: (None if math.isnan(v) else float(v) / total) for stage, v in zip(_STAGES, tokens.tolist())},
        "stages": [{**names, "tokens": float(v) / total, "threshold": None if math.isnan(t) else t / total}
                   for names, v, t in zip(stage_names, stage_tokens.tolist(), stage_thresholds.tolist())],
    }


def measured_row(method: str, value: float | str | None, result: dict[str, Any], state: Any = None) -> SweepRow:
    """The row of ``method`` at knob ``value`` from :func:`evaluate`'s ``result`` (``state``: the model's
    :func:`algm_state` after it, for the thresholds an ALGM variant ran at)."""
    mean, per_class = miou(result["confusion"])
    algm = state.config if state is not None and state.config is not None else None  # None: not an ALGM variant
    return SweepRow(
        method=method,
        local_threshold=algm.local_threshold if algm and algm.local_layer is not None else None,
        global_threshold=algm.global_threshold if algm and algm.global_layer is not None else None,
        knob=knob(method),
        value=value,
        miou=mean,
        per_class_iou=[None if math.isnan(v) else v for v in per_class.tolist()],
        images_per_s=result["images_per_s"],
        images_per_s_spread=result["images_per_s_spread"],
        gflops=result["gflops"],
        flops_images=result["flops_images"],
        tokens=result["tokens"],
        stages=result["stages"],
        thresholds_used={s["name"]: s["threshold"] for s in result["stages"] if s.get("threshold") is not None},
        images=result["images"],
        confusion=result["confusion"].tolist(),
    )


def add_intervals(rows: Sequence[dict[str, Any]], confusions: Sequence[Tensor], config: SweepConfig) -> None:
    """Add ``delta_miou``, ``delta_miou_ci`` (paired bootstrap against the baseline row), ``miou_ci`` and
    ``bootstrap`` to ``rows`` in place, from their ``[N, K, K]`` per-image ``confusions``. Without a baseline
    row the differences are None; with ``config.bootstrap == 0`` the intervals are None."""
    baseline = next((c for r, c in zip(rows, confusions) if r["method"] == "baseline"), None)
    for row, confusion in zip(rows, confusions):
        reference = baseline if baseline is not None else confusion
        if config.bootstrap > 0 and confusion.shape[0] > 0:
            result = paired_bootstrap(reference, confusion, config.bootstrap, config.seed, config.confidence)
        else:
            result = {"delta": float(miou(confusion.sum(0))[0] - miou(reference.sum(0))[0]), "delta_ci": None, "ci": None}
        row["miou_ci"] = result["ci"]
        row["delta_miou"] = result["delta"] if baseline is not None else None
        row["delta_miou_ci"] = result["delta_ci"] if baseline is not None else None
        row["bootstrap"] = {"resamples": config.bootstrap, "seed": config.seed, "confidence": config.confidence,
                            "paired_with": "baseline" if baseline is not None else None}


def sweep(model: nn.Module, dataset: Any, config: SweepConfig, context: Context | None = None,
          *, progress: bool = True, quality: str = "mIoU") -> list[dict[str, Any]]:
    """Rows (:meth:`SweepRow.to_dict`) for the baseline and every method × knob value of ``config``, with
    their bootstrap intervals (:func:`add_intervals`). The model's merging
    configuration is restored afterwards. ``quality`` names the rows' ``miou`` in the log (``"agreement"``
    where the labels are the baseline's prediction)."""
    context = context or Context(0, 1, torch.device("cpu"))
    model.eval()
    dataset = _DecodedOnce(dataset)
    rows, confusions = [], []
    runs = config.runs()
    progress_log = _ProgressLog(len(runs) * len(_indices(dataset, config, context)), config.log_every_s,  # this process's
                                enabled=progress and context.is_main and not sys.stdout.isatty())
    with merging_restored(model):
        for method, value in tqdm(runs, desc="sweep", disable=not (progress and context.is_main) or None):
            configure_method(model, method, value, config)
            label = method if value is None else f"{method} {knob(method)}={value}"
            result = evaluate(model, dataset, config, context, progress=progress and context.is_main, description=label,
                              method=method, progress_log=progress_log)
            rows.append(measured_row(method, value, result, algm_state(model)).to_dict())
            confusions.append(result["image_confusions"])
            progress_log.update(0, f"{label} done ({len(rows)}/{len(runs)} configurations)", force=True)
            logger.info("%s: %s %.2f, %.2f images/s, %.2f GFLOPs", label, quality, rows[-1]["miou"],
                        rows[-1]["images_per_s"], rows[-1]["gflops"])
    add_intervals(rows, confusions, config)
    return rows
