"""timm ``Attention`` internals in one place: the projections, the weights, and the attention itself.

The engine needs what timm's ``Attention.forward`` hides (the keys, an additive key bias, key/value
merging); the analyses need the softmax weights. Both read the module the same way here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["project_qkv", "attention_weights", "attend"]


def project_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values ``[B, heads, T, d]`` of timm ``Attention`` ``attn`` for input ``x`` ``[B, T, C]``
    (its ``q_norm``/``k_norm`` applied, as in its forward)."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_weights(attn: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """Softmax attention ``[B, heads, T, T]`` (fp32) of ``attn`` for input ``x`` ``[B, T, C]``, with the
    additive key bias ``bias`` (broadcastable to ``[B, 1, 1, T]``, e.g. a large negative on padding)."""
    q, k, _ = project_qkv(attn, x)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(-1)


def attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """``softmax(q kᵀ · scale + bias) v`` ``[B, heads, T, d]``, fused (SDPA) when ``attn.fused_attn`` is set,
    as timm does, else written out; ``attn.attn_drop`` while training."""
    if getattr(attn, "fused_attn", True):
        dropout = attn.attn_drop.p if attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return attn.attn_drop(logits.softmax(-1)) @ v
