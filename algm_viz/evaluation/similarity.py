"""Intra- vs inter-class cosine similarity of tokens (paper Fig. 2), from ground-truth labels.

(a) Local: pairs of tokens inside each full k×k window of the local layer (k = 2..8).
(b) Global: all token pairs of an image, per layer.
Tokens are taken after the attention residual (where ALGM merges) of the unmerged model, prefix tokens
excluded; a token's class is the majority label of its patch, and tokens without labelled pixels take
part in no pair. Pairs are ordered (i, j), i != j; means are over all pairs of the data set.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..capture import block_tokens
from ..datasets import IGNORE_INDEX
from ..merging import window_index
from ..patch import find_vit
from .inference import merging_disabled, prepare_labelled
from .tokens import patch_class_counts, token_classes

__all__ = ["similarity_analysis", "window_pair_sums", "global_pair_sums"]


def window_pair_sums(tokens: Tensor, classes: Tensor, grid: tuple[int, int], k: int) -> Tensor:
    """``[4]`` float64: (intra sum, intra pairs, inter sum, inter pairs) over the pairs inside the full
    k×k windows. ``tokens`` ``[B, N, C]``, ``classes`` ``[B, N]`` (-1 = unlabelled)."""
    index = window_index(grid, (k, k), tokens.device)  # [S, K]
    if index.numel() == 0:
        return torch.zeros(4, dtype=torch.float64)
    unit = F.normalize(tokens[:, index].double(), dim=-1)  # [B, S, K, C]
    sims = unit @ unit.transpose(-1, -2)  # [B, S, K, K]
    cls = classes[:, index]  # [B, S, K]
    labelled = cls >= 0
    pairs = labelled[..., :, None] & labelled[..., None, :] & ~torch.eye(k * k, dtype=torch.bool, device=tokens.device)
    same = cls[..., :, None] == cls[..., None, :]
    intra, inter = pairs & same, pairs & ~same
    return torch.stack([sims[intra].sum(), intra.sum().double(), sims[inter].sum(), inter.sum().double()]).cpu()


def global_pair_sums(tokens: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """``[4]`` float64 (intra sum, intra pairs, inter sum, inter pairs) over all token pairs per image,
    in O(N·K·C) via class sums of unit vectors (no N×N matrix)."""
    unit = F.normalize(tokens.double(), dim=-1)
    labelled = classes >= 0
    onehot = F.one_hot(classes.clamp_min(0), num_classes).double() * labelled[..., None]  # [B, N, K]
    self_sims = (unit.pow(2).sum(-1) * labelled).sum()
    class_sums = onehot.transpose(1, 2) @ unit  # [B, K, C]
    intra = class_sums.pow(2).sum() - self_sims
    every = (unit * labelled[..., None]).sum(1).pow(2).sum() - self_sims
    sizes = onehot.sum(1)  # [B, K]
    intra_pairs = (sizes.pow(2) - sizes).sum()
    n = labelled.sum(1).double()
    all_pairs = (n.pow(2) - n).sum()
    return torch.stack([intra, intra_pairs, every - intra, all_pairs - intra_pairs]).cpu()


def _means(sums: Tensor) -> dict[str, float]:
    intra, intra_pairs, inter, inter_pairs = sums.tolist()
    return {
        "intra": intra / intra_pairs if intra_pairs else float("nan"),
        "inter": inter / inter_pairs if inter_pairs else float("nan"),
        "intra_pairs": int(intra_pairs),
        "inter_pairs": int(inter_pairs),
    }


@torch.inference_mode()
def similarity_analysis(
    model: nn.Module,
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    window_sizes: Sequence[int] = tuple(range(2, 9)),
    local_layer: int = 1,
    layers: Sequence[int] | None = None,
    short_side: int | None = None,
    device: torch.device | str = "cpu",
    ignore_index: int = IGNORE_INDEX,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Mean intra-/inter-class cosine similarity over ``samples`` (``[H, W, 3]`` uint8 image, ``[H, W]``
    label with ``ignore_index``), images resized to ``short_side`` and labels with them (nearest).

    Returns ``{"local_layer", "local": {"<k>": {"intra", "inter", "intra_pairs", "inter_pairs"}},
    "global": {"<layer>": {...}}, "images"}``; ``layers`` (1-based) defaults to all.
    """
    vit = find_vit(model)
    depth = len(vit.blocks)
    layers = list(range(1, depth + 1)) if layers is None else list(layers)
    if not all(1 <= l <= depth for l in [*layers, local_layer]) or any(k < 2 for k in window_sizes):
        raise ValueError(f"layers must be within 1..{depth} and window sizes >= 2")
    prefix = getattr(vit, "num_prefix_tokens", 1)
    patch = int(vit.patch_embed.patch_size[0])
    local = {k: torch.zeros(4, dtype=torch.float64) for k in window_sizes}
    per_layer = {layer: torch.zeros(4, dtype=torch.float64) for layer in layers}
    current: dict[str, Any] = {}

    def observe(layer: int, tokens: Tensor) -> None:
        tokens, classes = tokens[:, prefix:], current["classes"]
        if layer in per_layer:
            per_layer[layer] += global_pair_sums(tokens, classes, num_classes)
        if layer == local_layer:
            for k in window_sizes:
                local[k] += window_pair_sums(tokens, classes, current["grid"], k)

    count = 0
    with block_tokens(vit, sorted({*layers, local_layer}), observe), merging_disabled(model):
        for image, label in tqdm(samples, total=total, desc="analyze", disable=not progress or None):
            x, labels = prepare_labelled(model, image, label, short_side, device, "similarity analysis")
            height, width = x.shape[-2:]
            current["classes"] = token_classes(patch_class_counts(labels, patch, num_classes, ignore_index))
            current["grid"] = (-(-height // patch), -(-width // patch))
            model(x)
            count += 1
    if count == 0:
        raise ValueError("no samples to analyse")
    return {
        "local_layer": local_layer,
        "local": {str(k): _means(v) for k, v in local.items()},
        "global": {str(layer): _means(v) for layer, v in per_layer.items()},
        "images": count,
    }
