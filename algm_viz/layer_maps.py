"""Merge maps after any encoder layer: which patches share a token once layer L has run, for any method.

A forward's :class:`~algm_viz.patch.MergeRecord` lists its token-reducing stages with their layers; the
groups after layer L are the stages of layers 1..L composed (:func:`~algm_viz.patch.merge_before_layer` of
layer L + 1; a stage runs inside its layer, before the MLP or before the attention). Key/value-only merges keep every token and do not show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from . import render
from .evaluation.inference import default_short_side, prepare, resized_shape
from .methods import METHODS, apply_method
from .patch import MergeRecord, algm_state, group_map, merge_before_layer, merging_restored

__all__ = ["groups_after", "LayerMaps", "layer_maps", "layer_picture", "representative_specs"]


def groups_after(record: MergeRecord, layer: int, image: int = 0) -> np.ndarray:
    """``[gh, gw]`` token of each patch of image ``image`` after 1-based encoder ``layer``: the record's stages
    of layers ``<= layer`` composed (what block ``layer + 1`` sees); every patch its own token before the first."""
    return group_map(record, merge_before_layer(record, layer + 1), image)


@dataclass
class LayerMaps:
    """One image's merge groups per layer for several ``(method, value)`` specs: ``image`` ``[H, W, 3]`` uint8
    (the model input), ``groups[i]`` ``[depth, gh, gw]`` the groups of spec ``i`` after each layer 1..depth."""

    image: np.ndarray
    specs: list[tuple[str, float]]
    groups: list[np.ndarray]
    patch_size: int

    @property
    def depth(self) -> int:
        return self.groups[0].shape[0] if self.groups else 0


def layer_maps(model: nn.Module, image: np.ndarray, specs: Sequence[tuple[str, float]],
               short_side: int | None = None) -> LayerMaps:
    """One forward of ``image`` ``[H, W, 3]`` uint8 per ``(method, value)`` (resized so its short side is
    ``short_side``, default the model's), its merge groups read after every encoder layer. The model's
    merging is restored afterwards."""
    if not specs:
        raise ValueError("give at least one (method, value) to map")
    short_side = short_side or default_short_side(model)
    height, width = resized_shape(*image.shape[:2], short_side)
    shown = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) if (height, width) != image.shape[:2] else image
    depth = len(model.encoder.blocks)
    groups = []
    with merging_restored(model), torch.inference_mode():
        tensor = prepare(model, shown, None, next(model.parameters()).device)
        for method, value in specs:
            apply_method(model, method, value)
            model(tensor)
            record = algm_state(model).record
            groups.append(np.stack([groups_after(record, layer) for layer in range(1, depth + 1)]))
    return LayerMaps(shown, [(m, v) for m, v in specs], groups, model.patch_size)


def layer_picture(maps: LayerMaps, layer: int) -> np.ndarray:
    """``[28 + h, n·w, 3]`` uint8: each spec's groups after ``layer`` (1..depth) painted on the image (one colour
    per token of several patches, clear = a patch still its own token), side by side, titled with the
    method, its value and the tokens left."""
    if not 1 <= layer <= maps.depth:
        raise ValueError(f"the layer must be in 1..{maps.depth}, got {layer}")
    panels = []
    for (method, value), groups in zip(maps.specs, maps.groups):
        after = groups[layer - 1]
        panel = render.group_overlay(maps.image, after, render.merged_mask(after), maps.patch_size)
        spec = METHODS[method]
        title = f"{spec.label}, {spec.knob} = {value:g}: {len(np.unique(after))}/{after.size} tokens"
        bar = np.full((28, panel.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(np.concatenate([bar, panel], axis=0))
    return np.concatenate(panels, axis=1)


def representative_specs(methods: Sequence[str], chosen: Sequence[tuple[str, float]] = ()) -> list[tuple[str, float]]:
    """``chosen`` specs first, then each other method of ``methods`` at the middle value of its knob grid."""
    named = {method for method, _ in chosen}
    rest = [(m, METHODS[m].values[len(METHODS[m].values) // 2]) for m in methods if m not in named]
    return list(dict.fromkeys([*chosen, *rest]))
