"""The models the app offers, and loading them once (with download progress and clear errors).

Keys: ``"bundled:<name>"`` (shipped, offline), ``"untrained"`` (random weights, for trying the UI),
``"official:<name>"`` (:data:`algm_viz.models.KNOWN_MODELS`, downloaded and cached on first use) and
``"path:<folder>"`` (a local checkpoint folder in the official Segmenter format).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import KNOWN_MODELS, CheckpointError, Segmenter, create_segmenter, load_segmenter
from ..patch import default_thresholds
from ..render import group_colors
from .gpu import on_zero_gpu

__all__ = ["ModelEntry", "ModelRegistry", "UNTRAINED_LABEL", "default_device"]

logger = logging.getLogger(__name__)

UNTRAINED_LABEL = "untrained ViT-Tiny (random weights — for trying the UI only)"
BUNDLED_NAME = "camvid-vit-tiny"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ModelEntry:
    """A loaded model and what the app needs to know about it.

    Attributes:
        short_side: inputs are resized so their short side has this many pixels.
        auto_thresholds: ``{"local", "global"}`` τ used when the user asks for "auto" (the model's
            calibrated μ+σ, else the authors' defaults for its width).
        sweep_rows: dataset-level τ curve rows shipped with the model (``sweep.json``), or None.
        lock: held by whoever runs the model: ALGM's state lives on the model.
    """

    key: str
    label: str
    model: Segmenter
    class_names: tuple[str, ...]
    colors: np.ndarray
    short_side: int
    auto_thresholds: dict[str, float]
    trained: bool
    sweep_rows: list[dict[str, Any]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def depth(self) -> int:
        return len(self.model.encoder.blocks)

    @property
    def patch_size(self) -> int:
        return self.model.patch_size


def _bundled_folder(name: str) -> Path | None:
    """The folder of bundled model ``name``, None while it is not part of this installation."""
    try:
        return importlib.import_module("algm_viz.models.bundled").bundled_dir(name)
    except (ImportError, FileNotFoundError):
        return None


def _read_sweep(folder: Path) -> list[dict[str, Any]] | None:
    """Dataset-level τ curve rows in ``folder/sweep.json``: the sweep command's output (a dict with
    ``rows``) or a bare list of rows. None when absent or unreadable."""
    path = folder / "sweep.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("ignoring %s: not valid JSON", path)
        return None
    rows = data.get("rows") if isinstance(data, dict) else data
    return rows if isinstance(rows, list) and rows else None


class ModelRegistry:
    """Loads each model once per process and hands out :class:`ModelEntry` objects (thread-safe).

    Args:
        device: where models run (default: :func:`default_device`).
        default_short_side: input short side for models that state none (official ADE20K: 512).
        untrained: keyword arguments of :func:`create_segmenter` for the untrained placeholder model
            (default: ViT-Tiny/16, mask transformer, 11 classes).
        include_bundled: offer the bundled model (when installed) as the default.
        allow_paths: load checkpoints from any server-side folder given as ``"path:<folder>"``
            (default: yes, except on a Hugging Face Space); uploaded ones (:meth:`add_folder`) always load.
    """

    def __init__(self, device: torch.device | str | None = None, default_short_side: int = 512,
                 untrained: dict[str, Any] | None = None, include_bundled: bool = True,
                 allow_paths: bool | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.default_short_side = default_short_side
        self.untrained = {"num_classes": 11, **(untrained or {})}
        self.include_bundled = include_bundled
        self.allow_paths = "SPACE_ID" not in os.environ if allow_paths is None else allow_paths
        self._added: set[str] = set()
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    def choices(self) -> list[tuple[str, str]]:
        """``(label, key)`` pairs for a dropdown, default first."""
        out = []
        if self.include_bundled and _bundled_folder(BUNDLED_NAME) is not None:
            out.append((f"{BUNDLED_NAME} (bundled, trained on CamVid, offline)", f"bundled:{BUNDLED_NAME}"))
        out.append((UNTRAINED_LABEL, "untrained"))
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
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per model; other models stay available meanwhile
            if key not in self._entries:
                self._entries[key] = self._load(key)
            return self._entries[key]

    def _load(self, key: str) -> ModelEntry:
        kind, _, name = key.partition(":")
        if kind == "untrained" and not name:
            torch.manual_seed(0)
            model = create_segmenter(**self.untrained)
            names = tuple(f"class {i}" for i in range(model.num_classes))
            return self._entry(key, UNTRAINED_LABEL, model, names, None, self.default_short_side, trained=False)
        if kind == "bundled" and name:
            folder = _bundled_folder(name)
            if folder is None:
                raise CheckpointError(f"the bundled model {name!r} is not part of this installation")
            model = importlib.import_module("algm_viz.models.bundled").load_bundled(folder)
            rows = _read_sweep(folder)
            return self._entry(key, f"{name} (bundled)", model, tuple(model.class_names), model.colors,
                               int(model.input_short_side), trained=True, sweep_rows=rows)
        if kind == "official" and name in KNOWN_MODELS:
            model = load_segmenter(name)
            names = tuple(f"class {i}" for i in range(model.num_classes))
            return self._entry(key, name, model, names, None, self.default_short_side, trained=True)
        if kind == "path" and name:
            if not (self.allow_paths or key in self._added):
                raise ValueError("loading checkpoints from server-side folders is disabled here: upload the files instead")
            folder = Path(name).expanduser()
            model = load_segmenter(folder)
            names = tuple(getattr(model, "class_names", None) or (f"class {i}" for i in range(model.num_classes)))
            rows = _read_sweep(folder if folder.is_dir() else folder.parent)
            return self._entry(key, f"checkpoint {folder}", model, names, getattr(model, "colors", None),
                               int(getattr(model, "input_short_side", self.default_short_side)), trained=True, sweep_rows=rows)
        raise ValueError(f"unknown model {key!r}: choose one of {[k for _, k in self.choices()]} or 'path:<folder>'")

    def _entry(self, key: str, label: str, model: Segmenter, names: tuple[str, ...], colors: Any, short_side: int,
               *, trained: bool, sweep_rows: list[dict[str, Any]] | None = None) -> ModelEntry:
        model = model.to(self.device).eval()
        palette = np.asarray(colors, dtype=np.uint8).reshape(-1, 3) if colors is not None else group_colors(np.arange(len(names)))
        if len(palette) < len(names):
            raise CheckpointError(f"{label}: {len(palette)} colours for {len(names)} classes")
        if not on_zero_gpu():  # warm-up, so the first request's latency is not the allocator's
            with torch.inference_mode():
                model(torch.zeros(1, 3, short_side, short_side, device=self.device))
        logger.info("loaded %s on %s", label, self.device)
        return ModelEntry(key, label, model, names, palette, short_side, default_thresholds(model), trained, sweep_rows)
