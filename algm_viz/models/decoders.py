"""More Segmenter decoders, so the app can show both places where ALGM unmerges.

* :class:`SETRNaive` and :class:`SETRProgressive` (SETR, Zheng et al., CVPR 2021) are convolutional and
  need the full patch grid: the tokens are unmerged *before* them (``unmerge_before = True``), and they
  return dense logits ``[B, K, h, w]``.
* :class:`AttentionToMask` (SegViT's ATM decoder, Zhang et al., NeurIPS 2022) only attends to the
  tokens, so it runs on the merged ones and its per-token scores are unmerged *after* it
  (``unmerge_before = False``).

SETR's SyncBN is replaced by ``BatchNorm2d`` (switch to ``nn.SyncBatchNorm.convert_sync_batchnorm`` for
multi-GPU training). The encoder's output already passes through its final LayerNorm, so the extra
LayerNorm that mmsegmentation's SETR head puts on the tokens is left out.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SETRNaive", "SETRProgressive", "AttentionToMask", "tokens_to_grid"]


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, H*W, C]`` row-major tokens -> ``[B, C, H, W]`` feature map."""
    height, width = grid
    batch, count, channels = tokens.shape
    if count != height * width:
        raise ValueError(f"{count} tokens do not fill a {height}x{width} grid (unmerge them first)")
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias, the norm has one) -> BatchNorm2d -> ReLU, size-preserving."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SETRNaive(nn.Module):
    """SETR-Naive: 1×1 conv -> BatchNorm2d -> ReLU -> 1×1 conv to classes, at patch resolution.

    Args:
        num_classes: ``K``.
        d_encoder: channels of the encoder tokens.
        channels: hidden channels (SETR: 256).
        dropout: ``Dropout2d`` rate before the classifier (SETR: 0).
    """

    unmerge_before = True

    def __init__(self, num_classes: int, d_encoder: int, channels: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = _conv_norm_relu(d_encoder, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, tokens: Tensor, key_bias: Optional[Tensor] = None, *, grid: tuple[int, int]) -> Tensor:
        """``[B, H*W, C]`` unmerged tokens on ``grid = (H, W)`` -> ``[B, K, H, W]`` logits (``key_bias`` unused)."""
        return self.classifier(self.dropout(self.hidden(tokens_to_grid(tokens, grid))))


class SETRProgressive(nn.Module):
    """SETR-PUP: ``stages`` × (3×3 conv -> BatchNorm2d -> ReLU -> 2× bilinear upsampling), then a 1×1
    conv to classes.

    Upsampling stops once the map reaches ``patch_size`` times the grid (4 stages = ×16 for 16-pixel
    patches; with 8-pixel patches the 4th stage only convolves); the Segmenter resizes the rest.

    Args:
        num_classes: ``K``.
        d_encoder: channels of the encoder tokens.
        channels: channels of every stage (SETR: 256).
        stages: conv stages (SETR: 4).
        patch_size: the encoder's patch size, the cap on the total upsampling.
        dropout: ``Dropout2d`` rate before the classifier (SETR: 0).
    """

    unmerge_before = True

    def __init__(
        self,
        num_classes: int,
        d_encoder: int,
        channels: int = 256,
        stages: int = 4,
        patch_size: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if stages < 1 or patch_size < 1:
            raise ValueError(f"stages and patch_size must be positive, got {stages} and {patch_size}")
        upsamplings = min(stages, int(math.log2(patch_size)))
        upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.stages = nn.Sequential(
            *(
                nn.Sequential(
                    _conv_norm_relu(d_encoder if i == 0 else channels, channels, 3),
                    upsample if i < upsamplings else nn.Identity(),
                )
                for i in range(stages)
            )
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, tokens: Tensor, key_bias: Optional[Tensor] = None, *, grid: tuple[int, int]) -> Tensor:
        """``[B, H*W, C]`` unmerged tokens on ``grid = (H, W)`` -> ``[B, K, s*H, s*W]`` logits, ``s`` the
        total upsampling (``key_bias`` unused)."""
        return self.classifier(self.dropout(self.stages(tokens_to_grid(tokens, grid))))


class _Attention(nn.Module):
    """Multi-head attention of ``query`` ``[B, Q, D]`` to ``memory`` ``[B, T, D]`` with an additive key bias."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.scale = (d_model // n_heads) ** -0.5
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, heads, N, D / heads]``."""
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def _project(self, query: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full-width ``q`` ``[B, Q, D]``, ``k`` and ``v`` ``[B, T, D]``."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.q(query), k, v

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor]) -> Tensor:
        """Attention output ``[B, Q, D]``; ``key_bias`` ``[B, 1, 1, T]`` is added to the logits."""
        out = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v), attn_mask=key_bias,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, query: Tensor, memory: Tensor, key_bias: Optional[Tensor] = None) -> Tensor:
        """``[B, Q, D]`` attending to ``[B, T, D]`` -> ``[B, Q, D]``."""
        return self._mix(*self._project(query, memory), key_bias)

    def forward_with_similarity(
        self, query: Tensor, memory: Tensor, key_bias: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`forward`, plus the ``[B, Q, T]`` head-averaged scaled similarity ``q·k / sqrt(d)``."""
        q, k, v = self._project(query, memory)
        # mean over heads of q_h·k_h * scale = full-width q·k * scale / heads: one [Q, T] product
        similarity = (q @ k.transpose(1, 2)) * (self.scale / self.n_heads)
        return self._mix(q, k, v, key_bias), similarity


class _ATMLayer(nn.Module):
    """Post-norm decoder layer on the class queries: cross-attention to the tokens, self-attention, MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.cross_attn = _Attention(d_model, n_heads, dropout)
        self.self_attn = _Attention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: Tensor, memory: Tensor, key_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``[B, K, D]`` queries, ``[B, T, D]`` tokens -> (``[B, K, D]`` queries, ``[B, K, T]`` mask logits)."""
        attended, similarity = self.cross_attn.forward_with_similarity(queries, memory, key_bias)
        queries = self.norms[0](queries + self.drop(attended))
        queries = self.norms[1](queries + self.drop(self.self_attn(queries, queries)))
        queries = self.norms[2](queries + self.drop(self.mlp(queries)))
        return queries, similarity


class AttentionToMask(nn.Module):
    """SegViT's attention-to-mask (ATM) decoder, single level.

    One learnable query per class (query ``k`` is tied to class ``k``, so no Hungarian matching is
    needed). The tokens are projected (Linear + LayerNorm); each layer is a post-norm (as SegViT)
    cross-attention of the queries to the tokens, self-attention among the queries and an MLP. The mask of
    class ``k`` on token ``t`` is ``m_kt = sigmoid(s_kt)``, ``s`` the head-averaged scaled query·token
    similarity of the last layer's cross-attention; it is weighted by the class probability
    ``p_k = sigmoid(w·q_k + b)`` of the final query (SegViT's class head, reduced to "class ``k`` present
    or not" because queries are tied to classes). The decoder returns ``log(p_k · m_kt)``: its argmax is
    that of the weighted masks, and it can be used as logits by a cross-entropy loss. ``key_bias`` enters
    the cross-attention, so padding and merged-token sizes are handled; ``s`` itself does not use it.

    Args:
        num_classes: ``K``.
        d_encoder: channels of the encoder tokens.
        d_model: decoder width (default ``d_encoder``).
        n_layers: decoder layers (SegViT: 3 per level; 2 here, as the mask transformer and ``create_segmenter``).
        n_heads: attention heads (default ``max(1, d_model // 64)``).
        d_ff: MLP hidden width (default ``4 * d_model``).
        dropout: dropout rate of attention and MLP.
    """

    unmerge_before = False

    def __init__(
        self,
        num_classes: int,
        d_encoder: int,
        d_model: Optional[int] = None,
        n_layers: int = 2,
        n_heads: Optional[int] = None,
        d_ff: Optional[int] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be positive, got {n_layers}")
        d_model = d_model or d_encoder
        n_heads = n_heads or max(1, d_model // 64)
        self.input_proj = nn.Linear(d_encoder, d_model)
        self.input_norm = nn.LayerNorm(d_model)
        self.queries = nn.Parameter(torch.randn(1, num_classes, d_model) * 0.02)
        self.layers = nn.ModuleList(_ATMLayer(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.class_head = nn.Linear(d_model, 1)

    def forward(
        self, tokens: Tensor, key_bias: Optional[Tensor] = None, *, grid: Optional[tuple[int, int]] = None
    ) -> Tensor:
        """``[B, T, C]`` tokens (``key_bias`` ``[B, 1, 1, T]`` for merged/padded ones; ``grid`` unused)
        -> ``[B, T, K]`` class-weighted log-masks ``log(p_k · m_kt)``."""
        memory = self.input_norm(self.input_proj(tokens))
        # a copy, not an expanded view: FlopCounterMode's module tracker rejects no-grad views of parameters
        queries = self.queries.repeat(tokens.shape[0], 1, 1)
        for layer in self.layers:
            queries, similarity = layer(queries, memory, key_bias)
        log_masks = F.logsigmoid(similarity) + F.logsigmoid(self.class_head(queries))  # [B, K, T] + [B, K, 1]
        return log_masks.transpose(1, 2)
