"""Attention balance (paper Sec. 5.4, Tab. 6): per class, the share of tokens and the share of attention
mass they receive, without and with ALGM.

Attention mass received by a class, per image: the softmax weight that the average real query token
puts on the keys of that class (prefix tokens as keys count for no class), averaged over heads and over
the chosen layers. Weights are recomputed from each block's attention input (``norm1`` output) with the
same additive key bias the model uses (proportional attention, padding), since fused attention does not
return them. Key/value-only merges (Segformer++-style) are not reflected: keys are the block's tokens.
A (merged) token's class is the majority pixel label over all patches it holds.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..attention import attention_weights
from ..capture import ATTENTION_INPUT, block_tokens
from ..datasets import IGNORE_INDEX
from ..patch import ALGMConfig, algm_state, find_vit
from ..patch.state import MASKED_BIAS
from .inference import class_argmax, merging_disabled, prepare, prepare_labelled
from .tokens import merge_before_layer, patch_class_counts, token_class_counts, token_classes

__all__ = ["attention_balance", "aggregate_balance", "dataset_balance", "default_balance_layers", "summarize"]


def default_balance_layers(model: nn.Module) -> list[int]:
    """1-based layers whose attention sees the fully merged tokens: after the last merging layer (the
    applied stages', else the paper's GBM layer 5); the last layer if that leaves none."""
    depth = len(find_vit(model).blocks)
    state = algm_state(model)
    merge_layers = [stage.layer for stage in state.stages] if state is not None else []
    last_merge = max(merge_layers) if merge_layers else ALGMConfig().global_layer
    return list(range(last_merge + 1, depth + 1)) or [depth]


def _key_mass(attn: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """``[B, T]``: mean over real queries and heads of the attention weight on each key."""
    weights = attention_weights(attn, x, bias).mean(1)  # [B, T, T]
    if bias is None:
        return weights.mean(1)
    real_queries = (bias.float() > MASKED_BIAS / 2).reshape(x.shape[0], x.shape[1]).to(weights.dtype)  # [B, T]: not padding
    return (weights * real_queries[..., None]).sum(1) / real_queries.sum(1, keepdim=True).clamp_min(1)


def _run(model: nn.Module, images: Tensor, patch_counts: Tensor, layers: Sequence[int], num_classes: int) -> dict[str, Any]:
    """One forward with attention hooks on ``layers``; class token counts and attention mass, summed over the batch."""
    vit = find_vit(model)
    prefix = getattr(vit, "num_prefix_tokens", 1)
    masses: dict[int, Tensor] = {}

    def observe(layer: int, normed: Tensor) -> None:
        state = algm_state(model)
        bias = state.attn_bias if state is not None else None  # what the block adds to its attention
        masses[layer] = _key_mass(vit.blocks[layer - 1].attn, normed, bias)

    with block_tokens(vit, layers, observe, ATTENTION_INPUT), torch.inference_mode():
        model(images)
    state = algm_state(model)
    record = state.record if state is not None else None
    batch = images.shape[0]
    attention = torch.zeros(batch, num_classes, dtype=torch.float64, device=images.device)
    token_count = torch.zeros(num_classes, dtype=torch.long, device=images.device)
    num_tokens = 0.0
    for layer in layers:
        merge = merge_before_layer(record, layer)
        classes = token_classes(token_class_counts(patch_counts, merge))  # [B, T']
        mass = masses[layer][:, prefix : prefix + classes.shape[1]].double()
        labelled = classes >= 0
        attention.scatter_add_(1, classes.clamp_min(0), mass * labelled)
        if layer == layers[-1]:
            token_count = torch.bincount(classes[labelled], minlength=num_classes)
            num_tokens = float(merge.counts.sum()) if merge is not None else float(classes.numel())
    return {
        "images": batch,
        "num_tokens": num_tokens,
        "token_count": token_count.cpu().tolist(),
        "attention_mass": (attention / len(layers)).sum(0).cpu().tolist(),
    }


def _entropy_gini(shares: Sequence[float]) -> tuple[float, float]:
    """Entropy (nats) and Gini coefficient of a distribution over ``shares`` (renormalised)."""
    p = torch.tensor(shares, dtype=torch.float64)
    if p.numel() == 0 or float(p.sum()) <= 0:
        return math.nan, math.nan
    p = p / p.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    gini = float((p[:, None] - p[None, :]).abs().sum() / (2 * p.numel()))
    return entropy, gini


def summarize(run: dict[str, Any], present: Sequence[int]) -> dict[str, Any]:
    """Add shares and the scalar summaries to a run with raw ``token_count``/``attention_mass``.

    ``present``: the classes the summaries range over (those with tokens before merging).
    """
    counts = torch.tensor(run["token_count"], dtype=torch.float64)
    mass = torch.tensor(run["attention_mass"], dtype=torch.float64)
    token_share = counts / counts.sum().clamp_min(1)
    attention_share = mass / mass.sum() if float(mass.sum()) > 0 else torch.zeros_like(mass)
    entropy, gini = _entropy_gini([float(attention_share[c]) for c in present])
    token_entropy, token_gini = _entropy_gini([float(token_share[c]) for c in present])
    return {
        **run,
        "token_share": token_share.tolist(),
        "attention_share": attention_share.tolist(),
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(len(present)) if len(present) > 1 else math.nan,
        "gini": gini,
        "token_entropy": token_entropy,
        "token_gini": token_gini,
        "mean_tokens": run["num_tokens"] / max(run["images"], 1),
    }


def _finish(baseline: dict[str, Any], algm: dict[str, Any] | None, layers: Sequence[int]) -> dict[str, Any]:
    present = [c for c, n in enumerate(baseline["token_count"]) if n > 0]
    return {
        "layers": list(layers),
        "classes": present,
        "baseline": summarize(baseline, present),
        "algm": summarize(algm, present) if algm is not None else None,
    }


def attention_balance(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    layer: int | Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Class token shares and attention shares of ``model`` without and with its ALGM config.

    Args:
        images: ``[B, 3, H, W]`` normalised model input.
        labels: ``[B, H, W]`` pixel classes at the size of ``images`` (ground truth or prediction),
            ``ignore_index`` skipped.
        layer: 1-based layer(s) to average over; default :func:`default_balance_layers`. Token counts
            are those of the last of them.
    Returns:
        ``{"layers", "classes" (present before merging), "baseline": run, "algm": run or None}``; a run
        holds per class ``token_count``, ``token_share``, ``attention_mass`` (summed per-image means
        over queries), ``attention_share``, and ``entropy``/``entropy_normalized``/``gini`` of the
        class attention distribution (``token_entropy``/``token_gini`` of the token distribution),
        ``mean_tokens`` per image. ``algm`` is None when ALGM is not applied. The model is left as it was.
    """
    if images.ndim != 4 or labels.ndim != 3 or images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"need images [B, 3, H, W] and labels [B, H, W] of the same B, H, W; got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    vit = find_vit(model)
    depth = len(vit.blocks)
    layers = default_balance_layers(model) if layer is None else sorted({layer} if isinstance(layer, int) else set(layer))
    if not layers or any(not 1 <= l <= depth for l in layers):
        raise ValueError(f"layers {layers} must be within 1..{depth}")
    patch_size = int(vit.patch_embed.patch_size[0])
    patch_counts = patch_class_counts(labels.to(images.device), patch_size, num_classes, ignore_index)
    with merging_disabled(model):
        baseline = _run(model, images, patch_counts, layers, num_classes)
    algm = _run(model, images, patch_counts, layers, num_classes) if algm_state(model) is not None else None
    return _finish(baseline, algm, layers)


def aggregate_balance(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine :func:`attention_balance` results (e.g. one per image) into one for the data set:
    token counts and attention masses are summed, shares and summaries recomputed."""
    if not stats:
        raise ValueError("nothing to aggregate")

    def total(key: str) -> dict[str, Any] | None:
        runs = [s[key] for s in stats]
        if any(r is None for r in runs):
            return None
        return {
            "images": sum(r["images"] for r in runs),
            "num_tokens": sum(r["num_tokens"] for r in runs),
            "token_count": [sum(v) for v in zip(*(r["token_count"] for r in runs))],
            "attention_mass": [sum(v) for v in zip(*(r["attention_mass"] for r in runs))],
        }

    return _finish(total("baseline"), total("algm"), stats[0]["layers"])


def dataset_balance(
    model: nn.Module,
    samples: Iterable[tuple[np.ndarray, np.ndarray | None]],
    num_classes: int,
    *,
    short_side: int | None,
    device: torch.device | str,
    labels: str = "gt",
    layer: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """:func:`aggregate_balance` of :func:`attention_balance` over ``samples`` (image ``[H, W, 3]`` uint8,
    label map ``[H, W]`` or None), plus ``images``. Token classes come from the label map (``labels="gt"``,
    resized to the model input by nearest neighbour) or, with ``"pred"`` or without a label map, from the
    model's own prediction with merging off."""
    if labels not in ("gt", "pred"):
        raise ValueError(f"labels is 'gt' or 'pred', got {labels!r}")
    per_image = []
    for image, label in samples:
        if labels == "pred" or label is None:
            x = prepare(model, image, short_side, device)
            with merging_disabled(model), torch.inference_mode():
                target = class_argmax(model(x))
        else:
            x, target = prepare_labelled(model, image, label, short_side, device, "the attention balance")
        per_image.append(attention_balance(model, x, target, num_classes, layer=layer))
    return {**aggregate_balance(per_image), "images": len(per_image)}
