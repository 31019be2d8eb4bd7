"""Tokens and GFLOPs per encoder layer of one forward: where a token reducer saves its work (ALGM's two
steps, ToMe's steady decline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from ..flops import count_gflops  # noqa: F401  (registers the CPU attention FLOP formula)
from ..patch import algm_state, find_vit

__all__ = ["layer_flow"]


@torch.no_grad()
def layer_flow(model: nn.Module, images: Tensor) -> dict[str, Any]:
    """Run ``model`` (with whatever merging it has) on ``images`` ``[B, 3, H, W]`` once and return, per
    encoder layer in order: ``"attention_tokens"`` and ``"mlp_tokens"`` (tokens, prefix included, that the
    layer's attention and MLP see, mean over the batch; merges run between the two) and ``"gflops"`` (the
    layer's multiply-adds in 1e9, summed over the batch, as :func:`~algm_viz.flops.count_gflops` counts)."""
    vit = find_vit(model)
    name = next(n for n, module in model.named_modules() if module is vit)
    prefix = ".".join(part for part in (type(model).__name__, name, "blocks") if part)
    with flop_counter.FlopCounterMode(display=False) as counter:
        model(images)
    counts = counter.get_flop_counts()
    depth = len(vit.blocks)
    gflops = [sum(counts.get(f"{prefix}.{i}", {}).values()) / 2e9 for i in range(depth)]
    extra = getattr(vit, "num_prefix_tokens", 1)
    state = algm_state(model)
    stages = state.record.stages if state is not None and state.record is not None else []
    patches = float(vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))[0]
                    * vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))[1])

    def tokens_after(layer: int, inclusive: bool) -> float:
        done = [merge for _, stage_layer, merge in stages if stage_layer < layer or (inclusive and stage_layer == layer)]
        return extra + (float(done[-1].counts.float().mean()) if done else patches)

    return {
        "attention_tokens": [tokens_after(layer, False) for layer in range(1, depth + 1)],
        "mlp_tokens": [tokens_after(layer, True) for layer in range(1, depth + 1)],
        "gflops": gflops,
    }
