"""The paper's automatic threshold (Sec. 3.3): τ = μ + σ of the cosine similarities of all token pairs
after the attention block of a merging layer, over a data set, measured on the unmerged model.

For the CLAP layer the statistics of the k×k-window mean similarities (the quantity CLAP thresholds) are
reported too. The "auto" thresholds follow the paper: the all-pairs τ of the local layer for CLAP and of
the global layer for GBM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..capture import block_tokens
from ..merging import window_index, window_similarity
from ..models.variant import MAX_VARIANT_BYTES, read_variant
from ..patch import find_vit
from .inference import merging_disabled, prepare

__all__ = ["calibrate", "store_thresholds", "SimilarityStats"]


class SimilarityStats:
    """Running count, mean and standard deviation of a stream of similarities (float64 sums)."""

    def __init__(self) -> None:
        self.count = 0.0
        self.total = 0.0
        self.squares = 0.0

    def add(self, count: float, total: float, squares: float) -> None:
        self.count += count
        self.total += total
        self.squares += squares

    def result(self) -> dict[str, float]:
        """``{"mean", "std", "tau" = mean + std, "count"}`` (NaN without data)."""
        if self.count == 0:
            return {"mean": math.nan, "std": math.nan, "tau": math.nan, "count": 0}
        mean = self.total / self.count
        std = math.sqrt(max(self.squares / self.count - mean * mean, 0.0))
        return {"mean": mean, "std": std, "tau": mean + std, "count": int(self.count)}


def pair_sums(tokens: Tensor) -> tuple[float, float, float]:
    """Number, sum and sum of squares of the cosine similarities of all ordered pairs ``i != j`` of
    ``tokens`` ``[B, N, C]``, per image, summed over the batch. O(N·C²), no N×N matrix:
    ``Σ_{i≠j} s_ij = |Σ u|² - Σ|u|²`` and ``Σ_{i≠j} s_ij² = |UᵀU|²_F - Σ|u|⁴`` for unit rows ``u``."""
    unit = F.normalize(tokens.double(), dim=-1)
    norms = unit.pow(2).sum(-1)  # [B, N], 1 (0 for zero tokens)
    total = unit.sum(1).pow(2).sum() - norms.sum()
    gram = unit.transpose(1, 2) @ unit  # [B, C, C]
    squares = gram.pow(2).sum() - norms.pow(2).sum()
    batch, n = tokens.shape[:2]
    return float(batch * n * (n - 1)), float(total), float(squares)


def _as_batch(model: nn.Module, item: Any, short_side: int | None, device: torch.device | str) -> Tensor:
    if isinstance(item, Tensor):
        if item.ndim != 4:
            raise ValueError(f"image tensors must be normalised [B, 3, H, W], got shape {tuple(item.shape)}")
        return item.to(device)
    return prepare(model, np.asarray(item), short_side, device)


def calibrate(
    model: nn.Module,
    images: Iterable[Any],
    layers: tuple[int, int] = (1, 5),
    window: tuple[int, int] | int = (2, 2),
    *,
    short_side: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Similarity statistics and automatic thresholds of ``model`` (run unmerged) over ``images``.

    Args:
        images: ``[H, W, 3]`` uint8 images (resized to ``short_side``, normalised) or normalised
            ``[B, 3, H, W]`` tensors.
        layers: 1-based ``(local_layer, global_layer)``; tokens are taken after the attention residual
            of these blocks, prefix tokens excluded.
        window: CLAP window for the window statistics of the local layer.
    Returns:
        ``{"layers": {"<l>": {"mean", "std", "tau", "count"}}, "window": {"layer", "size", "mean",
        "std", "tau", "count"}, "thresholds": {"local", "global"}, "local", "global", "images"}``;
        ``thresholds`` (= ``local``/``global``) use the all-pairs τ of each layer (the paper's).
    """
    vit = find_vit(model)
    depth = len(vit.blocks)
    if len(layers) != 2 or not all(1 <= l <= depth for l in layers):
        raise ValueError(f"layers must be (local_layer, global_layer) within 1..{depth}, got {layers}")
    kh, kw = (window, window) if isinstance(window, int) else tuple(window)
    if kh * kw < 2:
        raise ValueError(f"window must hold at least two tokens, got {(kh, kw)}")
    prefix = getattr(vit, "num_prefix_tokens", 1)
    patch = int(vit.patch_embed.patch_size[0])
    stats = {layer: SimilarityStats() for layer in dict.fromkeys(layers)}
    window_stats = SimilarityStats()
    grid: list[tuple[int, int]] = []

    def observe(layer: int, tokens: Tensor) -> None:
        tokens = tokens[:, prefix:]
        stats[layer].add(*pair_sums(tokens))
        if layer == layers[0]:
            height, width = grid[0]
            if height * width != tokens.shape[1]:
                raise ValueError(f"{tokens.shape[1]} tokens do not fill a {height}×{width} patch grid")
            mu = window_similarity(tokens, window_index((height, width), (kh, kw), tokens.device)).double()
            window_stats.add(mu.numel(), float(mu.sum()), float(mu.pow(2).sum()))

    count = 0
    with block_tokens(vit, stats, observe), merging_disabled(model), torch.inference_mode():
        for item in tqdm(images, total=total, desc="calibrate", disable=not progress):
            batch = _as_batch(model, item, short_side, device)
            grid[:] = [(-(-batch.shape[-2] // patch), -(-batch.shape[-1] // patch))]
            model(batch)
            count += batch.shape[0]
    if count == 0:
        raise ValueError("no images to calibrate on")
    per_layer = {str(layer): s.result() for layer, s in stats.items()}
    thresholds = {"local": per_layer[str(layers[0])]["tau"], "global": per_layer[str(layers[1])]["tau"]}
    return {
        "layers": per_layer,
        "window": {"layer": layers[0], "size": [kh, kw], **window_stats.result()},
        "thresholds": thresholds,
        **thresholds,
        "images": count,
    }


def store_thresholds(model_dir: str | Path, result: dict[str, Any]) -> Path:
    """Store ``result["thresholds"]`` (``{"local", "global"}``) with a model, so "auto" τ uses it.

    An official-format folder (``variant.yml``) gets the ``algm_thresholds`` key (read by
    ``load_segmenter``) plus the full statistics under ``algm_calibration``; a bundled model folder
    (``config.json``) gets the same keys in its JSON. Returns the file written.
    """
    folder = Path(model_dir)
    folder = folder.parent if folder.is_file() else folder
    thresholds = {key: float(result["thresholds"][key]) for key in ("local", "global")}
    if any(math.isnan(v) for v in thresholds.values()):
        raise ValueError(f"refusing to store NaN thresholds {thresholds}")
    calibration = {key: result[key] for key in ("layers", "window", "images") if key in result}
    variant, config = folder / "variant.yml", folder / "config.json"
    if variant.is_file():
        data = read_variant(variant)
        data.update(algm_thresholds=thresholds, algm_calibration=calibration)
        text = yaml.safe_dump(data, sort_keys=False)
        if len(text.encode()) > MAX_VARIANT_BYTES:
            raise ValueError(f"variant.yml with the calibration would exceed {MAX_VARIANT_BYTES} bytes, "
                             "more than load_segmenter reads")
        variant.write_text(text)
        return variant
    if config.is_file():
        data = json.loads(config.read_text())
        data.update(algm_thresholds=thresholds, algm_calibration=calibration)
        config.write_text(json.dumps(data, indent=2))
        return config
    raise ValueError(f"{folder} holds neither variant.yml nor config.json: cannot store thresholds with the model")
