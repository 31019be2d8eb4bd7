"""Per-image work cache: preprocessing and the baseline forward once, an ALGM forward per setting.

Thread safety: ALGM's configuration lives on the model, so every forward holds the model's lock
(:attr:`ModelEntry.lock`) from :func:`apply_algm` to reading the merge record. Sessions are shared by
all users that send the same image to the same model, so results depend only on the inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

import cv2
import numpy as np
import torch

from ..datasets import IGNORE_INDEX
from ..evaluation.balance import attention_balance
from ..evaluation.metrics import confusion_matrix, miou
from ..evaluation.compare import OneImage
from ..evaluation.inference import class_argmax
from ..evaluation.distributed import Context
from ..evaluation.sweep import SweepConfig, evaluate, measured_row
from ..flops import count_gflops
from ..inspector import TokenCapture, capture_tokens
from ..patch import ONLINE, MergeRecord, algm_state, apply_algm, group_map, remove_algm
from ..preprocess import ImageError, check_label, normalize, to_rgb_uint8
from ..timing import Timing, time_once, timed
from .inputs import resize_for_model
from .models import ModelEntry

__all__ = [
    "Settings",
    "ForwardResult",
    "MergeMaps",
    "ImageSession",
    "Latency",
    "SessionCache",
]

V = TypeVar("V")

#: τ the app accepts; τ >= 1 merges nothing.
TAU_RANGE = (0.0, 1.0)
#: Largest CLAP window side the app accepts.
MAX_WINDOW = 8


class LRU(Generic[V]):
    """A small thread-safe least-recently-used map that computes missing values once."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = compute()
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Settings:
    """One ALGM configuration: τ per stage, square CLAP window side, 1-based layers, and whether attention
    weighs a merged token by the patches it holds (``prop_attn``). ``global_threshold`` may be
    ``"official"`` (:data:`~algm_viz.merging.ONLINE`): the official ALGM code's mode, GBM's online τ.

    Checked once, when built: the values become plain Python numbers (τ rounded to 6 decimals, so equal
    settings are one cache key) or ``ValueError`` says what is wrong. Whether the layers exist is the model's
    to say (:func:`~algm_viz.patch.apply_algm` refuses a layer beyond its depth).
    """

    local_threshold: float
    global_threshold: float | str
    window: int = 2
    global_layer: int = 5
    local_layer: int = 1
    prop_attn: bool = False

    def __post_init__(self) -> None:
        for name in ("local_threshold", "global_threshold"):
            value = getattr(self, name)
            if name == "global_threshold" and value == ONLINE:
                object.__setattr__(self, name, ONLINE)
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
            if math.isnan(value) or not TAU_RANGE[0] <= value <= TAU_RANGE[1]:
                raise ValueError(f"{name} must be in [{TAU_RANGE[0]}, {TAU_RANGE[1]}], got {value}")
            object.__setattr__(self, name, round(value, 6))
        for name, high in (("window", MAX_WINDOW), ("local_layer", None), ("global_layer", None)):
            value = getattr(self, name)
            if isinstance(value, float) and (math.isnan(value) or not value.is_integer()):
                raise ValueError(f"{name} must be a whole number, got {value}")
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a whole number, got {value!r}") from None
            if value < 1 or (high is not None and value > high):
                raise ValueError(f"{name} must be in 1..{high or 'the model depth'}, got {value}")
            object.__setattr__(self, name, value)
        if self.global_layer < self.local_layer:
            raise ValueError("the global layer must not come before the local layer (layer 1)")
        if not isinstance(self.prop_attn, (bool, np.bool_)):
            raise ValueError(f"prop_attn must be true or false, got {self.prop_attn!r}")
        object.__setattr__(self, "prop_attn", bool(self.prop_attn))


@dataclass(frozen=True)
class MergeMaps:
    """What one ALGM forward merged, on the patch grid ``(gh, gw)``, as numpy arrays.

    Attributes:
        local_groups: ``[gh, gw]`` CLAP output slot of each patch.
        final_groups: ``[gh, gw]`` final token of each patch.
        global_merged: ``[gh, gw]`` bool, True where the patch's final token merged several GBM inputs.
        tokens: ``{"patches": N, "local": N', "global": N''}``.
        thresholds: ``{"local", "global"}`` the similarity threshold each stage merged with (the official
            online GBM τ is set per image); a stage that did not run is absent.
    """

    local_groups: np.ndarray
    final_groups: np.ndarray
    global_merged: np.ndarray
    tokens: dict[str, int]
    thresholds: dict[str, float]

    @staticmethod
    def from_record(record: MergeRecord) -> "MergeMaps":
        grid = record.grid
        patches = grid[0] * grid[1]
        local, glob, final = record.stage("local"), record.stage("global"), record.final
        local_groups, final_groups = group_map(record, local), group_map(record, final)
        if glob is not None:
            sizes = np.bincount(glob.groups[0].cpu().numpy(), minlength=glob.num_out + 1)
            global_merged = sizes[final_groups] > 1
        else:
            global_merged = np.zeros(grid, dtype=bool)
        counts = {name: int(value[0]) for name, value in record.token_counts().items()}
        tokens = {"patches": patches, "local": counts.get("local", patches)}
        tokens["global"] = counts.get("global", tokens["local"])
        thresholds = {name: float(value[0]) for name, value in record.thresholds().items()}
        return MergeMaps(local_groups, final_groups, global_merged, tokens, thresholds)


@dataclass(frozen=True)
class ForwardResult:
    """One forward: ``prediction`` ``[H, W]`` int16 class ids, wall-clock ``latency_s``, merges (ALGM only),
    and what the token inspector reads (:class:`~algm_viz.inspector.TokenCapture`)."""

    prediction: np.ndarray
    latency_s: float
    maps: MergeMaps | None
    capture: TokenCapture | None = None


def _configure(entry: ModelEntry, settings: Settings | None) -> None:
    """Patch (or unpatch, for ``None``) the model; the caller holds ``entry.lock``."""
    if settings is None:
        remove_algm(entry.model)
    else:
        apply_algm(entry.model, settings.local_layer, settings.global_layer, (settings.window, settings.window),
                   settings.local_threshold, settings.global_threshold, prop_attn=settings.prop_attn)


def run_forward(entry: ModelEntry, images: torch.Tensor, settings: Settings | None) -> ForwardResult:
    """Timed forward of ``images`` ``[1, 3, H, W]`` (baseline when ``settings`` is None)."""
    layers = () if settings is None else (settings.local_layer, settings.global_layer)
    with entry.lock, torch.inference_mode(), entry.precision():
        _configure(entry, settings)
        with capture_tokens(entry.model, layers, attention_layer=entry.depth) as capture:
            logits, latency = timed(lambda: entry.model(images), images.device)
        state = algm_state(entry.model)
        maps = MergeMaps.from_record(state.record) if settings is not None else None
    prediction = class_argmax(logits)[0].to(torch.int16).cpu().numpy()
    return ForwardResult(prediction, latency, maps, capture)


def run_gflops(entry: ModelEntry, images: torch.Tensor, settings: Settings | None) -> float:
    """GFLOPs of one forward of ``images`` (baseline when ``settings`` is None)."""
    with entry.lock, entry.precision():
        _configure(entry, settings)
        return count_gflops(entry.model, images)


#: Rounds of the readout's latency: each times the baseline, then the setting (as ``algm-viz bench`` does).
LATENCY_ROUNDS = 5


@dataclass(frozen=True)
class Latency:
    """Seconds per forward of the baseline and of one setting, timed side by side (``rounds`` interleaved
    rounds after the analysis forwards, which serve as warm-up)."""

    baseline: Timing
    algm: Timing

    @property
    def speedup(self) -> float:
        """Median baseline time over median ALGM time (as ``algm-viz bench``'s ``speedup``)."""
        return self.baseline.median / self.algm.median


def run_latency(entry: ModelEntry, images: torch.Tensor, settings: Settings, rounds: int) -> Latency:
    """Time the baseline and ``settings`` on ``images`` in ``rounds`` interleaved rounds, so that a drift
    of the machine's load hits both alike; holds ``entry.lock`` throughout."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    samples: dict[Settings | None, list[float]] = {None: [], settings: []}
    with entry.lock, torch.inference_mode(), entry.precision():
        for _ in range(rounds):
            for config, times in samples.items():
                _configure(entry, config)
                times.append(time_once(lambda: entry.model(images), images.device))
    return Latency(Timing.from_samples(samples[None]), Timing.from_samples(samples[settings]))


def run_balance(entry: ModelEntry, images: torch.Tensor, classes: np.ndarray, settings: Settings) -> dict[str, Any]:
    """Attention balance of ``images`` ``[1, 3, H, W]`` for pixel classes ``classes`` ``[H, W]``."""
    labels = torch.from_numpy(classes.astype(np.int64))[None].to(images.device)
    with entry.lock, entry.precision():
        _configure(entry, settings)
        return attention_balance(entry.model, images, labels, entry.model.num_classes)


class ImageSession:
    """One image (and optional label map) prepared for one model, with its forwards cached.

    Args:
        entry: the model.
        image: ``[H, W, 3]`` uint8 RGB as uploaded.
        label: ``[H, W]`` class ids as uploaded, or None. Stored resized to the model input, pixels
            outside ``0..K-1`` set to :data:`IGNORE_INDEX` (``label_note`` says how many, when other
            than :data:`IGNORE_INDEX` itself); a map with no class of the model raises :class:`ImageError`.
        max_side: cap on the long side after resizing.
        cache_size: ALGM settings remembered per image.
    """

    def __init__(self, entry: ModelEntry, image: np.ndarray, label: np.ndarray | None = None,
                 max_side: int = 1024, cache_size: int = 32) -> None:
        self.entry = entry
        original = to_rgb_uint8(image)
        self.original_shape: tuple[int, int] = original.shape[:2]
        self.image = resize_for_model(original, entry.short_side, max_side, entry.patch_size)
        self.label = None
        self.label_note: str | None = None
        if label is not None:
            label = np.asarray(label)
            if label.shape[:2] != original.shape[:2]:
                raise ImageError(f"the label map is {label.shape[1]}×{label.shape[0]} but the image is "
                                 f"{original.shape[1]}×{original.shape[0]}")
            checked, self.label_note = check_label(label, entry.model.num_classes, IGNORE_INDEX)
            self.label = cv2.resize(checked.astype(np.int32), self.image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        mean, std = entry.model.mean_std
        self.tensor = normalize(self.image, mean, std, entry.device)
        self._lock = threading.Lock()
        self._baseline: ForwardResult | None = None
        self._algm: LRU[ForwardResult] = LRU(cache_size)
        self._gflops: LRU[float] = LRU(cache_size)
        self._balance: LRU[dict[str, Any]] = LRU(cache_size)
        self._curves: LRU[list[dict[str, Any]]] = LRU(cache_size)
        self._latency: LRU[Latency] = LRU(cache_size)

    @property
    def num_patches(self) -> int:
        """Patch tokens of the (padded) model input."""
        p = self.entry.patch_size
        return -(-self.image.shape[0] // p) * -(-self.image.shape[1] // p)

    def baseline(self) -> ForwardResult:
        """The baseline forward (computed once)."""
        with self._lock:
            if self._baseline is None:
                self._baseline = run_forward(self.entry, self.tensor, None)
            return self._baseline

    def algm(self, settings: Settings) -> ForwardResult:
        """The ALGM forward for ``settings`` (cached)."""
        return self._algm.get(settings, lambda: run_forward(self.entry, self.tensor, settings))

    def latency(self, settings: Settings, rounds: int = LATENCY_ROUNDS) -> Latency:
        """Baseline and ``settings`` timed in ``rounds`` interleaved rounds (cached per setting and rounds)."""
        return self._latency.get((settings, rounds), lambda: run_latency(self.entry, self.tensor, settings, rounds))

    def gflops(self, settings: Settings | None) -> float:
        """GFLOPs for ``settings`` (None = baseline; cached)."""
        return self._gflops.get(settings, lambda: run_gflops(self.entry, self.tensor, settings))

    def balance(self, settings: Settings) -> dict[str, Any]:
        """Attention balance per predicted (baseline) class, without and with ALGM (cached);
        see :func:`algm_viz.evaluation.balance.attention_balance`."""
        return self._balance.get(settings, lambda: run_balance(self.entry, self.tensor, self.baseline().prediction, settings))

    def agreement(self, prediction: np.ndarray) -> tuple[float, list[float]]:
        """mIoU (%) and per-class IoU of ``prediction`` against the baseline prediction."""
        return _miou(prediction, self.baseline().prediction, self.entry.model.num_classes)

    def label_miou(self, prediction: np.ndarray) -> float | None:
        """mIoU (%) against the uploaded label map, None without one."""
        if self.label is None:
            return None
        return _miou(prediction, self.label, self.entry.model.num_classes)[0]

    def curve_rows(self, thresholds: Sequence[float], window: int, global_layer: int,
                   prop_attn: bool = False, check: Callable[[int, int], None] | None = None,
                   vary: str = "both", fixed: float | None = None) -> list[dict[str, Any]]:
        """Sweep rows (:meth:`~algm_viz.evaluation.rows.SweepRow.to_dict`): the baseline, then one per τ (method
        ``algm``, or ``algm_prop`` with ``prop_attn``), measured by the sweep's own code on this image with
        ``miou`` = agreement with the baseline's prediction (%), one timed forward and counted GFLOPs. ``vary``: ``"both"`` (the same τ for both stages), ``"local"`` or ``"global"`` (that stage's
        τ, the other one at ``fixed``). Cached: a τ release re-plots the same rows with a new marker.
        ``check(done, total)`` runs before each τ and may raise to stop (a time budget); nothing is cached then."""
        if vary not in ("both", "local", "global") or (vary != "both") != (fixed is not None):
            raise ValueError(f"vary must be 'both' (no fixed τ) or 'local'/'global' with a fixed τ, got {vary!r}, {fixed!r}")
        key = (tuple(float(t) for t in thresholds), window, global_layer, prop_attn, vary, fixed)
        return self._curves.get(key, lambda: self._curve_rows(thresholds, window, global_layer, prop_attn,
                                                              check or (lambda done, total: None), vary, fixed))

    def _curve_rows(self, thresholds: Sequence[float], window: int, global_layer: int,
                    prop_attn: bool, check: Callable[[int, int], None], vary: str = "both",
                    fixed: float | None = None) -> list[dict[str, Any]]:
        """The sweep's own measurement (:func:`~algm_viz.evaluation.sweep.evaluate`) on a one-image data set
        whose label map is the baseline's prediction, one setting at a time under the model's lock."""
        check(0, len(thresholds) + 1)
        data = OneImage(self.image, self.baseline().prediction, self.entry.class_names, repeats=1)
        method = "algm_prop" if prop_attn else "algm"
        # how to measure (what to run is set here, one setting at a time): at the image's size, no warm-up
        config = SweepConfig(taus=(), methods=["baseline"], short_side=min(self.image.shape[:2]), warmup=0,
                             bootstrap=0, dtype=self.entry.dtype)
        context = Context(0, 1, self.entry.device)

        def measure(name: str, settings: Settings | None) -> dict[str, Any]:
            with self.entry.lock:
                _configure(self.entry, settings)
                result = evaluate(self.entry.model, data, config, context, progress=False, method=name)
                row = measured_row(name, None, result, algm_state(self.entry.model))
            return dataclasses.replace(row, confusion=None).to_dict()  # one image: its matrix says nothing more

        rows = [measure("baseline", None)]
        for done, tau in enumerate(thresholds, 1):
            check(done, len(thresholds) + 1)
            local = float(tau) if vary in ("both", "local") else float(fixed)
            global_ = float(tau) if vary in ("both", "global") else fixed  # a number, or the official online τ
            rows.append(measure(method, Settings(local, global_, window, global_layer, prop_attn=prop_attn)))
        return rows


def _miou(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[float, list[float | None]]:
    """mIoU (%) and per-class IoU (None for a class in neither map, as in sweep rows: NaN is not JSON)."""
    value, per_class = miou(confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target), num_classes))
    return float(value), [None if math.isnan(v) else v for v in per_class.tolist()]


def _digest(array: np.ndarray | None) -> str:
    if array is None:
        return "-"
    array = np.ascontiguousarray(array)
    return hashlib.sha1(array.tobytes() + str((array.shape, array.dtype)).encode()).hexdigest()


class SessionCache:
    """Image sessions shared by all users, keyed by model and image content (least recently used go first)."""

    def __init__(self, capacity: int = 8, max_side: int = 1024) -> None:
        self.max_side = max_side
        self.capacity = capacity
        self._sessions: LRU[ImageSession] = LRU(capacity)

    def get(self, entry: ModelEntry, image: np.ndarray, label: np.ndarray | None = None) -> ImageSession:
        key = (entry.key, _digest(image), _digest(label), self.max_side)
        return self._sessions.get(key, lambda: ImageSession(entry, image, label, self.max_side))
