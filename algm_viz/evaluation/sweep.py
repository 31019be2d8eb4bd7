"""Sweep τ: segmentation quality, throughput, GFLOPs and token counts per merging method and threshold.

Evaluation is single-scale on the whole image: each image is resized so that its short side is
``short_side`` (default: the model's ``input_short_side``, else kept), normalised with the model's
statistics, and the logits are resized back to the label size. Batches hold consecutive images of one
size (a size change starts a new batch), so no padding tokens take part in merging.

Under ``torchrun`` every process evaluates every ``world_size``-th image; confusion matrices and token
sums are summed exactly over processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..datasets import IGNORE_INDEX
from ..flops import count_gflops
from ..timing import rate_summary, timed
from .. import methods as engine_methods
from ..patch import algm_state, find_vit, merging_restored, remove_algm
from .distributed import Context, all_gather_objects, all_reduce_sum
from .inference import default_short_side, prepare
from .metrics import confusion_matrix, miou

__all__ = ["available_methods", "SweepConfig", "parse_taus", "sweep", "evaluate", "configure_method"]

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
        short_side: resize images to this short side; None = the model's ``input_short_side`` or none.
        batch_size: images per forward (at most; a size change ends a batch).
        warmup: untimed forwards on the first batch before each configuration is timed.
        flops_images: GFLOPs are averaged over (at most) this many images per process; None = all.
        limit: evaluate only the first ``limit`` images.
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
    flops_images: int | None = 8
    limit: int | None = None

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

    def runs(self) -> list[tuple[str, float | None]]:
        """``(method, knob value)`` in sweep order: the baseline first, then each method's values."""
        runs: list[tuple[str, float | None]] = [(m, None) for m in self.methods if m == "baseline"]
        for method in self.methods:
            if method != "baseline":
                values = self.taus if knob(method) == "τ" else self.values.get(method, engine_methods.METHODS[method].values)
                runs += [(method, v if v == AUTO else float(v)) for v in values]
        return runs


def knob(method: str) -> str | None:
    """What a method's value is (``"τ"``, ``"r"``, ``"ratio"``, ...); None for the baseline."""
    if method == "baseline":
        return None
    return engine_methods.METHODS[method].knob


#: A τ "value" meaning: the model's calibrated (local, global) pair, ``model.algm_thresholds``.
AUTO = "auto"


def parse_taus(text: str) -> list[float | str]:
    """``"start:stop:step"`` (stop included) or ``"a,b,c"`` -> sorted thresholds; an ``auto`` item
    (alone or in the list) adds the model's calibrated τ pair, after the numbers."""
    items = [item.strip() for item in text.split(",")]
    auto = [AUTO] if AUTO in items else []
    text = ",".join(item for item in items if item != AUTO)
    if not text and auto:
        return auto
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError("step must be positive")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(max(count, 0))]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"cannot read thresholds {text!r} (use start:stop:step or a,b,c): {error}") from error
    if not values or any(math.isnan(v) for v in values):
        raise ValueError(f"no thresholds in {text!r}")
    return sorted(values) + auto


def configure_method(model: nn.Module, method: str, value: float | None, config: SweepConfig) -> None:
    """Set ``model`` up for ``method`` at knob ``value`` (removing merging for the baseline)."""
    if method == "baseline":
        remove_algm(model)
    elif engine_methods.METHODS[method].algm:  # placed by the sweep's layers and window; "auto": calibrated τ
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


def _token_sums(model: nn.Module, batch: int, grid_tokens: int) -> Tensor:
    """``[4]`` summed tokens over the batch's images: patches, after the stage named ``local`` (CLAP),
    after ``global`` (GBM), and after the last stage (each stage absent = the one before it)."""
    state = algm_state(model)
    record = state.record if state is not None else None
    counts = record.token_counts() if record is not None else {}
    patches = float(batch * grid_tokens)
    local = float(counts["local"].sum()) if "local" in counts else patches
    global_ = float(counts["global"].sum()) if "global" in counts else local
    final = float(record.stages[-1][2].counts.sum()) if record is not None and record.stages else patches
    return torch.tensor([patches, local, global_, final], dtype=torch.float64)


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Any, config: SweepConfig, context: Context, *, progress: bool = True,
             description: str = "") -> dict[str, Any]:
    """Evaluate ``model`` as configured now over this process's share of ``dataset``; reduced over processes.

    Returns ``{"confusion": [K, K] long, "images", "images_per_s", "images_per_s_spread", "gflops",
    "tokens": {stage: mean per image}}``.
    """
    device = context.device
    num_classes = dataset.num_classes
    count = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    indices = list(range(context.rank, count, context.world_size))
    short_side = config.short_side if config.short_side is not None else default_short_side(model)
    patch = int(find_vit(model).patch_embed.patch_size[0])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    tokens = torch.zeros(len(_STAGES), dtype=torch.float64)
    flops = torch.zeros(2, dtype=torch.float64)  # GFLOPs sum, images counted
    rates: list[float] = []
    flops_limit = math.inf if config.flops_images is None else config.flops_images
    first = True
    batches = _batches(model, dataset, indices, config.batch_size, short_side, device)
    for images, labels in tqdm(batches, desc=description, leave=False, disable=not progress or None,
                               total=math.ceil(len(indices) / config.batch_size)):
        if first:
            for _ in range(config.warmup):
                model(images)
            first = False
        logits, seconds = timed(lambda: model(images), device)
        rates.append(images.shape[0] / seconds)
        grid_tokens = math.ceil(images.shape[-2] / patch) * math.ceil(images.shape[-1] / patch)
        tokens += _token_sums(model, images.shape[0], grid_tokens)
        if flops[1] < flops_limit:
            flops += torch.tensor([count_gflops(model, images), images.shape[0]], dtype=torch.float64)
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), labels, num_classes, IGNORE_INDEX)
    images_done = torch.tensor([float(len(indices))], dtype=torch.float64)
    confusion = all_reduce_sum(confusion, context)
    tokens, flops, images_done = (all_reduce_sum(t, context) for t in (tokens, flops, images_done))
    all_rates = [r for ranks in all_gather_objects(rates, context) for r in ranks]
    speed = rate_summary(all_rates, scale=context.world_size)
    total = max(float(images_done), 1.0)
    return {
        "confusion": confusion.cpu(),
        "images": int(images_done),
        "images_per_s": speed["median"],
        "images_per_s_spread": [speed["p25"], speed["p75"]],
        "gflops": float(flops[0] / flops[1]) if flops[1] > 0 else math.nan,
        "tokens": {stage: float(v) / total for stage, v in zip(_STAGES, tokens)},
    }


def _row(method: str, value: float | str | None, result: dict[str, Any], state: Any = None) -> dict[str, Any]:
    mean, per_class = miou(result["confusion"])
    algm = state.config if state is not None and state.config is not None else None  # None: not an ALGM variant
    return {
        "method": method,
        "local_threshold": algm.local_threshold if algm and algm.local_layer is not None else None,
        "global_threshold": algm.global_threshold if algm and algm.global_layer is not None else None,
        "knob": knob(method),
        "value": value,
        "miou": mean,
        "per_class_iou": [None if math.isnan(v) else v for v in per_class.tolist()],
        "images_per_s": result["images_per_s"],
        "images_per_s_spread": result["images_per_s_spread"],
        "gflops": result["gflops"],
        "tokens": result["tokens"],
        "images": result["images"],
        "confusion": result["confusion"].tolist(),
    }


def sweep(model: nn.Module, dataset: Any, config: SweepConfig, context: Context | None = None,
          *, progress: bool = True) -> list[dict[str, Any]]:
    """Rows (see :mod:`algm_viz.plots`) for the baseline and every method × knob value of ``config``,
    plus ``"knob"``, ``"value"``, ``"images"`` and the ``"confusion"`` matrix. The model's merging
    configuration is restored afterwards."""
    context = context or Context(0, 1, torch.device("cpu"))
    model.eval()
    rows = []
    with merging_restored(model):
        for method, value in tqdm(config.runs(), desc="sweep", disable=not (progress and context.is_main) or None):
            configure_method(model, method, value, config)
            label = method if value is None else f"{method} {knob(method)}={value}"
            result = evaluate(model, dataset, config, context, progress=progress and context.is_main, description=label)
            rows.append(_row(method, value, result, algm_state(model)))
            logger.info("%s: mIoU %.2f, %.2f images/s, %.2f GFLOPs", label, rows[-1]["miou"],
                        rows[-1]["images_per_s"], rows[-1]["gflops"])
    return rows
