"""Every token reducer over its own knob on one image (the sweep's code on a one-image data set), and
the final merge maps of chosen methods side by side: the work behind ``algm-viz compare`` and the app's
compare tab.

A merge map is ``METHOD:VALUE`` or, after the first map, ``METHOD:match``: the method's knob chosen so that its
GFLOPs on the image come closest to the first map's (:func:`match_knob`, a bisection over the knob's range),
e.g. ToMe at ALGM's GFLOPs.
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
from ..flops import count_gflops
from ..methods import METHODS, apply_method
from ..models.description import describe
from ..patch import algm_state, group_map, merging_restored, remove_algm
from .inference import default_short_side, predict_labels, prepare, resized_shape
from .sweep import SweepConfig, add_intervals, knob, sweep

__all__ = ["DEFAULT_MAPS", "MATCH", "MATCH_RANGES", "OneImage", "check_specs", "compare", "match_knob", "merge_maps", "parse_spec",
           "resolve_specs"]

#: The value of a merge-map spec whose knob matches the first map's GFLOPs (``tome:match``).
MATCH = "match"
#: The merge maps drawn unless others are asked for (CLI and app): ALGM, and ToMe at ALGM's GFLOPs.
DEFAULT_MAPS = ("algm:0.9", f"tome:{MATCH}")
#: The knob range ``METHOD:match`` searches, per method whose GFLOPs move monotonically with one knob
#: (Segformer++'s pooling, a few whole-number sizes, is left out). ToMe's upper r of None: half the patches
#: (ToMe merges at most half of a layer's tokens); its r is a whole number.
MATCH_RANGES: dict[str, tuple[float, float | None]] = {
    **{name: (0.0, 1.0) for name, method in METHODS.items() if method.algm},  # τ
    "tome": (0, None),
    "grid": (0.0, 1.0), "kv_grid": (0.0, 1.0), "cts": (0.0, 1.0),
    "expedite": (0.01, 1.0), "ailurus": (0.01, 1.0), "ailurus_prop": (0.01, 1.0),
}
#: A match stops searching once its GFLOPs are within this fraction of the target.
MATCH_TOLERANCE = 0.005
#: Height of one line of a merge map's title (pixels).
TITLE_LINE = 18
#: Most forwards one match may count (bisection steps after the two ends).
MATCH_STEPS = 14


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
def merge_maps(model: nn.Module, image: np.ndarray, specs: Sequence[tuple[str, float | str]],
               short_side: int | None = None) -> np.ndarray:
    """``[h, n·w, 3]`` uint8: for each ``(method, value)`` (a value of :data:`MATCH`: see
    :func:`resolve_specs`), the final merge groups painted on the model input (one colour per merged group,
    unmerged patches clear), side by side, each titled with the setting, its GFLOPs and its tokens."""
    shown = _shown(model, image, short_side)
    x = prepare(model, shown, None)
    resolved = _resolve(model, x, specs)
    patch = model.patch_size
    panels = []
    with merging_restored(model):
        for (method, value), (_, asked) in zip(resolved, specs):
            apply_method(model, method, value)
            gflops = count_gflops(model, x)  # the forward whose record is drawn
            record = algm_state(model).record
            groups = group_map(record, record.final)  # key/value-only merging: every patch its own token
            merged = render.merged_mask(groups)
            panel = render.group_overlay(shown, groups, merged, patch)
            kept = int(groups.max()) + 1
            matched = " (matched to A's GFLOPs)" if asked == MATCH else ""
            knob = METHODS[method].knob.replace("τ", "tau")  # OpenCV's fonts have no Greek
            panels.append(_titled(panel, [f"{METHODS[method].label}, {knob} = {value:g}{matched}",
                                          f"{gflops:.2f} GFLOPs, {kept}/{groups.size} tokens"]))
    return np.concatenate(panels, axis=1)


def _shown(model: nn.Module, image: np.ndarray, short_side: int | None) -> np.ndarray:
    """``image`` ``[H, W, 3]`` at the model's input size (short side ``short_side``, None: the model's)."""
    height, width = resized_shape(*image.shape[:2], short_side or default_short_side(model))
    if (height, width) == image.shape[:2]:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


@torch.inference_mode()
def resolve_specs(model: nn.Module, image: np.ndarray, specs: Sequence[tuple[str, float | str]],
                  short_side: int | None = None) -> list[tuple[str, float]]:
    """``specs`` with each ``(method, MATCH)`` given the knob value whose GFLOPs on ``image`` ``[H, W, 3]``
    (resized to ``short_side``, None: the model's) come closest to the first spec's (:func:`match_knob`);
    the other specs unchanged. ``ValueError`` (:func:`check_specs`) before any forward for a first spec
    of ``match``."""
    return _resolve(model, prepare(model, _shown(model, image, short_side), None), specs)


def _resolve(model: nn.Module, x: torch.Tensor, specs: Sequence[tuple[str, float | str]]) -> list[tuple[str, float]]:
    """:func:`resolve_specs` on the model input ``x`` ``[1, 3, h, w]``."""
    check_specs(specs)
    if all(value != MATCH for _, value in specs):
        return [(method, float(value)) for method, value in specs]
    with merging_restored(model):
        apply_method(model, *specs[0])
        target = count_gflops(model, x)
    return [(method, match_knob(model, x, method, target)[0] if value == MATCH else float(value))
            for method, value in specs]


@torch.inference_mode()
def match_knob(model: nn.Module, x: torch.Tensor, method: str, target: float) -> tuple[float, float]:
    """``(value, GFLOPs)``: the value of ``method``'s knob in :data:`MATCH_RANGES` whose GFLOPs on the model
    input ``x`` ``[1, 3, h, w]`` come closest to ``target``, by bisection from the range's ends (whole
    numbers for ToMe's r, 4 decimals otherwise), stopped within :data:`MATCH_TOLERANCE` of the target or
    after :data:`MATCH_STEPS` counted forwards. A target beyond what the range reaches gives the nearer end.
    The model's merging is left as it was."""
    if method not in MATCH_RANGES:
        raise ValueError(f"{method}:{MATCH} is not offered; matchable methods: {', '.join(MATCH_RANGES)}")
    low, high = MATCH_RANGES[method]
    whole = METHODS[method].knob == "r"
    if high is None:  # half the patch tokens
        high = math.ceil(x.shape[-2] / model.patch_size) * math.ceil(x.shape[-1] / model.patch_size) // 2
    seen: dict[float, float] = {}

    def gflops(value: float) -> float:
        if value not in seen:
            apply_method(model, method, value)
            seen[value] = count_gflops(model, x)
        return seen[value]

    with merging_restored(model):
        above_low = gflops(low) > target
        if above_low != (gflops(high) > target):  # the target lies between the ends
            while len(seen) < MATCH_STEPS:
                middle = (low + high) // 2 if whole else round((low + high) / 2, 4)
                if middle in (low, high) or abs(gflops(middle) - target) <= MATCH_TOLERANCE * target:
                    break
                low, high = (middle, high) if (gflops(middle) > target) == above_low else (low, middle)
    value = min(seen, key=lambda v: abs(seen[v] - target))
    return float(value), seen[value]


def check_specs(specs: Sequence[tuple[str, float | str]]) -> None:
    """``ValueError`` unless the first merge map has a value: a ``METHOD:match`` map takes its GFLOPs from it."""
    if specs and specs[0][1] == MATCH:
        raise ValueError(f"{specs[0][0]}:{MATCH} matches the first merge map's GFLOPs, so it cannot be the first: "
                         f"give map A a value (e.g. algm:0.9) and map B {specs[0][0]}:{MATCH}")


def _titled(panel: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``panel`` under a white bar of ``lines`` (:data:`TITLE_LINE` pixels each, plus a margin)."""
    bar = np.full((TITLE_LINE * len(lines) + 10, panel.shape[1], 3), 255, np.uint8)
    for index, line in enumerate(lines):
        cv2.putText(bar, line, (6, 19 + TITLE_LINE * index), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def parse_spec(text: Any) -> tuple[str, float | str]:
    """``"METHOD:VALUE"`` (e.g. ``"tome:8"``) -> ``(method, value)``, ``"METHOD:match"`` -> ``(method, MATCH)``
    for a method in :data:`MATCH_RANGES`; ``ValueError`` saying what is wrong otherwise (unknown method, a
    value that is neither a finite number nor ``match``, a method that cannot match, or a value the method
    refuses, e.g. ``tome:inf`` or ``grid:2``), before any model work."""
    if not isinstance(text, str):
        raise ValueError(f"a merge map is given as METHOD:VALUE text, got {type(text).__name__} {str(text)[:40]!r}")
    method, _, value = text.strip().partition(":")
    if method in METHODS and value.strip() == MATCH:
        if method not in MATCH_RANGES:
            raise ValueError(f"{method}:{MATCH} is not offered ({METHODS[method].knob} has too few settings to match "
                             f"a budget); matchable methods: {', '.join(MATCH_RANGES)}")
        return method, MATCH
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if method not in METHODS or not math.isfinite(number):
        raise ValueError(f"expected METHOD:VALUE with a method from {', '.join(METHODS)} and a finite number "
                         f"(or METHOD:{MATCH}: the knob at the first map's GFLOPs), got {text[:40]!r}")
    spec = METHODS[method]
    if not spec.algm:
        if spec.knob in ("r", "k") and not float(number).is_integer():
            raise ValueError(f"{method}'s {spec.knob} is a whole number, got {number:g}")
        try:
            spec.build(number, 1)  # the stages check their own values
        except (ValueError, TypeError, OverflowError) as error:
            raise ValueError(f"{method}:{number:g} is not a valid setting: {error}") from None
    return method, number
