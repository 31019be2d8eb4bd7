"""Every token reducer over its own knob on one image (the sweep's code on a one-image data set), and
the final merge maps of chosen methods side by side: the work behind ``algm-viz compare`` and the app's
compare tab.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable, ContextManager, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .. import render
from ..methods import METHODS, apply_method
from ..models.description import describe
from ..patch import algm_state, group_map, merging_restored, remove_algm
from .inference import default_short_side, predict_labels, prepare, resized_shape
from .sweep import SweepConfig, add_intervals, knob, sweep

__all__ = ["OneImage", "compare", "merge_maps", "parse_spec"]


class OneImage:
    """One image and its label map, ``repeats`` times: the data-set protocol the sweep reads."""

    name = "one image"

    def __init__(self, image: np.ndarray, label: np.ndarray, class_names: Sequence[str], repeats: int) -> None:
        if label.shape != image.shape[:2]:
            raise ValueError(f"label map {label.shape} and image {image.shape[:2]} differ in size")
        self.image, self.label, self.class_names, self.repeats = image, label, list(class_names), repeats

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.image, self.label


def _free(done: int, total: int) -> ContextManager[None]:
    return nullcontext()


@torch.inference_mode()
def compare(
    model: nn.Module,
    image: np.ndarray,
    methods: Sequence[str],
    *,
    label: np.ndarray | None = None,
    taus: Sequence[float] | None = None,
    values: dict[str, Sequence[float]] | None = None,
    repeats: int = 5,
    short_side: int | None = None,
    step: Callable[[int, int], ContextManager[None]] = _free,
) -> list[dict[str, Any]]:
    """Sweep rows (see :mod:`algm_viz.plots`) for the baseline and every method × knob value on
    ``image`` ``[H, W, 3]``; ``miou`` is against ``label`` (ignore = 255) or else the baseline's prediction.

    The work runs one configuration at a time, each inside ``step(done, total)`` (the label forward
    first, then each configuration; ``total`` counts both): a context manager that may hold a lock on a
    shared model or raise to stop the work between configurations (a time budget). One image gives no
    bootstrap interval (``miou_ci`` None); ``delta_miou`` is against the baseline row."""
    short_side = short_side or default_short_side(model)
    config = SweepConfig(
        taus=list(taus) if taus is not None else list(METHODS["algm"].values), methods=["baseline", *methods],
        values=dict(values or {}), short_side=short_side, warmup=1, flops_images=1, bootstrap=0,
    )
    runs = config.runs()
    total = len(runs) + (label is None)
    quality = "mIoU" if label is not None else "agreement with the baseline"
    if label is None:
        with step(0, total), merging_restored(model):
            remove_algm(model)
            label = predict_labels(model, image, short_side=short_side).cpu().numpy().astype(np.uint8)
    data = OneImage(image, label, describe(model).class_names, repeats)
    rows = []
    for method, value in runs:
        one = replace(config, methods=[method], taus=[value] if knob(method) == "τ" else config.taus,
                      values={method: [value]} if knob(method) not in (None, "τ") else {})
        with step(total - len(runs) + len(rows), total):
            rows.extend(sweep(model, data, one, progress=False, quality=quality))
    add_intervals(rows, [torch.tensor(row["confusion"])[None] for row in rows], config)
    return rows


@torch.inference_mode()
def merge_maps(model: nn.Module, image: np.ndarray, specs: Sequence[tuple[str, float]], short_side: int | None = None) -> np.ndarray:
    """``[h, n·w, 3]`` uint8: for each ``(method, value)``, the final merge groups painted on the model
    input (one colour per merged group, unmerged patches clear), side by side, each titled."""
    short_side = short_side or default_short_side(model)
    height, width = resized_shape(*image.shape[:2], short_side)
    shown = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) if (height, width) != image.shape[:2] else image
    patch = model.patch_size
    panels = []
    with merging_restored(model):
        for method, value in specs:
            apply_method(model, method, value)
            model(prepare(model, shown, None))
            record = algm_state(model).record
            groups = group_map(record, record.final)  # key/value-only merging: every patch its own token
            merged = render.merged_mask(groups)
            panel = render.group_overlay(shown, groups, merged, patch)
            kept = int(groups.max()) + 1
            title = f"{METHODS[method].label}, {METHODS[method].knob} = {value:g}: {kept}/{groups.size} tokens"
            panels.append(_titled(panel, title))
    return np.concatenate(panels, axis=1)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((28, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def parse_spec(text: Any) -> tuple[str, float]:
    """``"METHOD:VALUE"`` (e.g. ``"tome:8"``) -> ``(method, value)``; ``ValueError`` saying what is wrong
    otherwise (unknown method, a value that is not a finite number, or one the method refuses, e.g.
    ``tome:inf`` or ``grid:2``), before any model work."""
    if not isinstance(text, str):
        raise ValueError(f"a merge map is given as METHOD:VALUE text, got {type(text).__name__} {str(text)[:40]!r}")
    method, _, value = text.strip().partition(":")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if method not in METHODS or not math.isfinite(number):
        raise ValueError(f"expected METHOD:VALUE with a method from {', '.join(METHODS)} and a finite number, "
                         f"got {text[:40]!r}")
    spec = METHODS[method]
    if not spec.algm:
        if spec.knob in ("r", "k") and not float(number).is_integer():
            raise ValueError(f"{method}'s {spec.knob} is a whole number, got {number:g}")
        try:
            spec.build(number, 1)  # the stages check their own values
        except (ValueError, TypeError, OverflowError) as error:
            raise ValueError(f"{method}:{number:g} is not a valid setting: {error}") from None
    return method, number
