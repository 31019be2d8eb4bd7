"""The models the app offers, and loading them once (with download progress and clear errors).

Keys: ``"bundled:<name>"`` (shipped, offline), ``"untrained"`` (random weights, for trying the UI),
``"official:<name>"`` (:data:`algm_viz.models.KNOWN_MODELS`, downloaded and cached on first use) and
``"path:<folder>"`` (a local checkpoint folder in the official Segmenter format), all resolved by
:func:`algm_viz.models.loading.load_model`; the registry adds what this server allows.

Loaded models are kept least-recently-used first within a count and memory budget (the default model
stays); checkpoints from the server's own folders load only where :func:`server_paths_allowed` says so.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
import torch

from ..evaluation.inference import autocast
from ..models import KNOWN_MODELS, CheckpointError, Segmenter
from ..models.bundled import ASSETS_DIR, bundled_dir
from ..models.description import ModelInfo
from ..models.loading import DEFAULT_MODEL, UNTRAINED, load_model
from ..models.variant import DEFAULT_LIMITS, ModelLimits
from ..patch import default_thresholds
from ..render import group_colors
from .gpu import on_zero_gpu

__all__ = ["ModelEntry", "ModelRegistry", "UNTRAINED_LABEL", "default_device", "server_paths_allowed",
           "MAX_UPLOAD_BYTES", "ALLOW_SERVER_PATHS_ENV"]

logger = logging.getLogger(__name__)

UNTRAINED_LABEL = "untrained ViT-Tiny (random weights — for trying the UI only)"
#: Largest uploaded file (the app's ``max_file_size``) and checkpoint file the app reads: 1 GiB holds a
#: ViT-B Segmenter with its optimizer state.
MAX_UPLOAD_BYTES = 2**30
#: Set to 1/true to let remote users load checkpoints from server-side folders (``--allow-server-paths``).
ALLOW_SERVER_PATHS_ENV = "ALGM_VIZ_ALLOW_SERVER_PATHS"


def server_paths_allowed(host: str, share: bool = False, explicit: bool = False) -> bool:
    """Whether the app may load checkpoints from server-side folders: only when it serves a loopback
    address without a public share link, unless ``explicit`` (``--allow-server-paths``) or the environment
    variable :data:`ALLOW_SERVER_PATHS_ENV` says so."""
    if explicit or os.environ.get(ALLOW_SERVER_PATHS_ENV, "").lower() in ("1", "true", "yes"):
        return True
    if share or "SPACE_ID" in os.environ:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ModelEntry:
    """A loaded model and what the app needs to know about it (what the model says of itself is ``model.info``).

    Attributes:
        colors: ``[K, 3]`` uint8 RGB per class (the model's, else the renderer's palette).
        short_side: inputs are resized so their short side has this many pixels (the model's, else the registry's).
        auto_thresholds: ``{"local", "global"}`` τ used when the user asks for "auto" (the model's
            calibrated μ+σ, else the authors' defaults for its width).
        sweep_rows: dataset-level τ curve rows shipped with the model (``sweep.json``), or None.
        sweep_source: what those rows were measured on, for the curve's title (e.g. "camvid val, 101 images"), or None.
        lock: held by whoever runs the model: ALGM's state lives on the model.
    """

    key: str
    label: str
    model: Segmenter
    colors: np.ndarray
    short_side: int
    auto_thresholds: dict[str, float]
    sweep_rows: list[dict[str, Any]] | None = None
    sweep_source: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    dtype: torch.dtype | None = None  # forwards under autocast in this precision; None = float32

    def precision(self) -> ContextManager:
        """The autocast context every forward of this model runs in (:attr:`dtype`)."""
        return autocast(self.device, self.dtype)

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model.info.class_names

    @property
    def trained(self) -> bool:
        return self.model.info.trained

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def depth(self) -> int:
        return len(self.model.encoder.blocks)

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @property
    def nbytes(self) -> int:
        """Memory of the model's parameters and buffers."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def windows(self, largest: int = 4) -> list[int]:
        """CLAP window sides up to ``largest`` that fit the patch grid at the model's input short side."""
        return list(range(1, max(1, min(largest, self.short_side // self.patch_size)) + 1))


def _is_bundled(name: str) -> bool:
    """Whether bundled model ``name`` is part of this installation."""
    try:
        return bundled_dir(name).is_dir()
    except FileNotFoundError:
        return False


def _read_sweep(folder: Path, training: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(rows, source)`` of the dataset-level τ curve in ``folder/sweep.json`` (the sweep command's output, a
    dict with ``rows``, or a bare list of rows; ``(None, None)`` when absent or unreadable). ``source`` names the
    data set, split and image count where the file says them, and warns when the split is one the model was
    trained on (``training``: the model card's ``training`` fields, ``train_split`` e.g. ``"train+val"``)."""
    path = folder / "sweep.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("ignoring %s: not valid JSON", path)
        return None, None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
        return None, None
    return rows, _sweep_source(data if isinstance(data, dict) else {}, rows, training or {})


def _sweep_source(data: Mapping[str, Any], rows: list[dict[str, Any]], training: Mapping[str, Any]) -> str | None:
    """The text naming what a sweep measured: "camvid val, 101 images (images the model was trained on)", or
    "(the split the training chose its best epoch on)" where the card's ``val_split`` is that split, with the
    sequences (recordings) it shares with the training images where the card names them (``shared_sequences``)."""
    dataset, split = data.get("dataset"), data.get("split")
    if not isinstance(split, str):
        return None
    images = next((r.get("images") for r in rows if r.get("method") == "baseline"), None)
    text = " ".join(str(part) for part in (dataset, split) if part) + (f", {images} images" if isinstance(images, int) else "")
    trained_on, chosen_on = training.get("train_split"), training.get("val_split")
    if isinstance(trained_on, str) and set(split.split("+")) <= set(trained_on.split("+")):
        text += " (images the model was trained on: the curve shows what merging costs, not held-out quality)"
    elif chosen_on == split:
        shared = training.get("shared_sequences")
        also = (f", from sequence{'s' if len(shared) > 1 else ''} {', '.join(map(str, shared))} it also trained on"
                if isinstance(shared, list) and shared else "")
        text += f" (the split the training chose its best epoch on{also}: the mIoU is optimistic)"
    return text


class ModelRegistry:
    """Loads each model once per process and hands out :class:`ModelEntry` objects (thread-safe).

    Args:
        device: where models run (default: :func:`default_device`).
        default_short_side: input short side for models that state none (official ADE20K: 512).
        untrained: keyword arguments of :func:`create_segmenter` for the untrained placeholder model
            (default: ViT-Tiny/16, mask transformer, 11 classes).
        include_bundled: offer the bundled model (when installed) as the default.
        allow_paths: load checkpoints from any server-side folder given as ``"path:<folder>"`` or
            ``"bundled:<folder>"`` (default: yes, except on a Hugging Face Space; the app passes
            :func:`server_paths_allowed`); uploaded ones (:meth:`add_folder`) always load.
        max_models, max_model_bytes: loaded models kept at once, and their parameter memory; beyond
            either, the least recently used ones (never the default model) are dropped.
        limits: what a ``variant.yml`` may describe (:class:`~algm_viz.models.variant.ModelLimits`); where
            they state no ``run_size``, it is ``(default_short_side, max_input_side)``: the activation budget
            holds at the largest input the app runs an uploaded model at, whatever its ``image_size`` says.
        max_input_side: long side of the largest input the app runs (the sessions' ``max_side``).
        max_checkpoint_bytes: largest ``checkpoint.pth`` read from an upload or a server-side folder.
    """

    def __init__(self, device: torch.device | str | None = None, default_short_side: int = 512,
                 untrained: dict[str, Any] | None = None, include_bundled: bool = True,
                 allow_paths: bool | None = None, max_models: int = 4, max_model_bytes: int = 3 * 2**30,
                 limits: ModelLimits = DEFAULT_LIMITS, max_checkpoint_bytes: int = MAX_UPLOAD_BYTES,
                 dtype: torch.dtype | None = None, max_input_side: int = 1024) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.device = torch.device(device) if device is not None else default_device()
        self.default_short_side = default_short_side
        self.untrained = {"num_classes": 11, **(untrained or {})}
        self.include_bundled = include_bundled
        self.allow_paths = "SPACE_ID" not in os.environ if allow_paths is None else allow_paths
        self.max_models = max_models
        self.max_model_bytes = max_model_bytes
        self.limits = limits if limits.run_size is not None else replace(limits, run_size=(default_short_side, max_input_side))
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.dtype = dtype
        self._added: set[str] = set()
        self._entries: OrderedDict[str, ModelEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._evict_listeners: list[Callable[[str], None]] = []

    def choices(self) -> list[tuple[str, str]]:
        """``(label, key)`` pairs for a dropdown, default first."""
        out = []
        if self.include_bundled and _is_bundled(DEFAULT_MODEL):
            out.append((f"{DEFAULT_MODEL} (bundled, trained on CamVid, offline)", f"bundled:{DEFAULT_MODEL}"))
        out.append((UNTRAINED_LABEL, UNTRAINED))
        for name, info in KNOWN_MODELS.items():
            label = f"{name} — official Segmenter {info['backbone']} {info['dataset'].upper()} (download)"
            out.append((label, f"official:{name}"))
        return out

    def add_folder(self, folder: str | Path) -> str:
        """Allow the checkpoint folder ``folder`` (e.g. an upload) and return its key."""
        key = f"path:{Path(folder).resolve()}"
        with self._lock:
            self._added.add(key)
        return key

    def default_key(self) -> str:
        return self.choices()[0][1]

    def get(self, key: str) -> ModelEntry:
        """The entry for ``key``, loading it on first use (downloads report progress through tqdm).

        Raises :class:`CheckpointError` or ``ValueError`` with the reason.
        """
        key = str(key or "").strip()
        if key in KNOWN_MODELS or (key and key == Path(key).name and (ASSETS_DIR / key / "config.json").is_file()):
            key = f"{'official' if key in KNOWN_MODELS else 'bundled'}:{key}"  # the CLI's plain names
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per model; other models stay available meanwhile
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return entry
            try:
                entry = self._load(key)
                entry.dtype = self.dtype
            except BaseException:
                with self._lock:  # a refused key leaves nothing behind
                    self._key_locks.pop(key, None)
                raise
            with self._lock:
                self._entries[key] = entry
                evicted = self._evict()
        for old in evicted:
            logger.info("dropped %s from memory (least recently used)", old)
            for listener in self._evict_listeners:
                listener(old)
        return entry

    def on_evict(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` after the model ``key`` was dropped (e.g. to drop caches holding it)."""
        self._evict_listeners.append(listener)

    def loaded(self) -> list[str]:
        """Keys of the models in memory, least recently used first."""
        with self._lock:
            return list(self._entries)

    def _evict(self) -> list[str]:
        """Drop least recently used models beyond the budget (the caller holds ``_lock``); their keys."""
        pinned = self.default_key()
        evicted = []
        while len(self._entries) > 1:
            total = sum(e.nbytes for e in self._entries.values())
            if len(self._entries) <= self.max_models and total <= self.max_model_bytes:
                break
            victim = next((k for k in self._entries if k != pinned), None)
            if victim is None or victim == next(reversed(self._entries)):
                break  # only the default model and the one just used remain
            del self._entries[victim]
            self._key_locks.pop(victim, None)
            evicted.append(victim)
        return evicted

    def _load(self, key: str) -> ModelEntry:
        """The entry for ``key``, once this server's policy allows it; :func:`load_model` resolves it."""
        kind, _, name = key.partition(":")
        if kind == "bundled" and name and not (self.allow_paths or (name == Path(name).name and name not in (".", ".."))):
            raise ValueError("loading models from server-side folders is disabled here: name a bundled model")
        if kind == "path" and name and not (self.allow_paths or key in self._added):
            raise ValueError("loading checkpoints from server-side folders is disabled here: upload the files instead")
        if key != UNTRAINED and not (kind in ("bundled", "official", "path") and name):
            raise ValueError(f"unknown model {key!r}: choose one of {[k for _, k in self.choices()]} or 'path:<folder>'")
        try:
            model = load_model(key, untrained=self.untrained, limits=self.limits, max_checkpoint_bytes=self.max_checkpoint_bytes)
        except FileNotFoundError as error:
            if kind != "bundled":
                raise
            raise CheckpointError(f"the bundled model {name!r} is not part of this installation") from error
        folder = bundled_dir(name) if kind == "bundled" else Path(name).expanduser() if kind == "path" else None
        rows, source = (_read_sweep(folder if folder.is_dir() else folder.parent, model.info.card.get("training"))
                        if folder is not None else (None, None))
        return self._entry(key, _label(key, model.info), model, sweep_rows=rows, sweep_source=source)

    def _entry(self, key: str, label: str, model: Segmenter, *, sweep_rows: list[dict[str, Any]] | None = None,
               sweep_source: str | None = None) -> ModelEntry:
        model = model.to(self.device).eval()
        info = model.info
        colors = info.colors if info.colors is not None else group_colors(np.arange(info.num_classes))
        short_side = info.short_side or self.default_short_side
        if not on_zero_gpu():  # warm-up, so the first request's latency is not the allocator's
            with torch.inference_mode():
                model(torch.zeros(1, 3, short_side, short_side, device=self.device))
        logger.info("loaded %s on %s", label, self.device)
        return ModelEntry(key, label, model, np.asarray(colors, dtype=np.uint8).reshape(-1, 3), short_side,
                          default_thresholds(model), sweep_rows, sweep_source)


def _label(key: str, info: ModelInfo) -> str:
    """The dropdown's words for a loaded model."""
    kind, _, name = key.partition(":")
    if key == UNTRAINED:
        return UNTRAINED_LABEL
    return {"bundled": f"{name} (bundled)", "path": f"checkpoint {Path(name).expanduser()}"}.get(kind, info.name)
