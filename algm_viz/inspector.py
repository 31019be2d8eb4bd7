"""Look inside the merge for one patch: what it merged with, how similar the tokens were, where it attends.

:func:`capture_tokens` records, during an ordinary forward (merged or not), what the inspector needs of
image 0 of the batch: the patch tokens after the attention residual of chosen blocks (where CLAP and GBM
compare tokens), the normalised input and key bias of one block's attention, and the merge record.
:func:`inspect_patch` then answers for any patch without another forward: its CLAP window, its final
merge group, its cosine similarity to every patch at each merge stage (the tokens that stage compared,
each patch taking its token's value), and its attention row in the captured block, per patch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import ATTENTION_INPUT, block_tokens
from .merging import Merge
from .patch import MergeRecord, algm_state, find_vit
from .patch.record import compose
from .patch.stages import CLAPStage

__all__ = ["TokenCapture", "Inspection", "capture_tokens", "inspect_patch", "stage_tokens", "attention_row",
           "mean_pairwise_similarity", "class_shares"]


@dataclass
class TokenCapture:
    """What one forward leaves for the inspector, for image 0 of its batch.

    Attributes:
        grid: ``(gh, gw)`` patch grid.
        num_prefix: class/register tokens ahead of the patches.
        tokens: ``{layer: [T, C]}`` fp32 patch tokens after the attention residual of 1-based block
            ``layer``, before that block's merges (the tokens ``layer``'s merge stages compare).
        attention_layer: 1-based block whose attention input was kept (None: none).
        attention_input: ``[prefix + T, C]`` that block's normalised attention input (``norm1`` output).
        attention_bias: ``[prefix + T]`` the additive key bias the block used (proportional attention,
            padding), None for none.
        record: the merge record of the forward (None for an unmerged model).
        windows: ``{stage name: (kh, kw)}`` of the window stages (CLAP).
    """

    grid: tuple[int, int] = (0, 0)
    num_prefix: int = 0
    tokens: dict[int, Tensor] = field(default_factory=dict)
    attention_layer: int | None = None
    attention_input: Tensor | None = None
    attention_bias: Tensor | None = None
    record: MergeRecord | None = None
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Memory held by the captured tensors."""
        tensors = [*self.tokens.values(), self.attention_input, self.attention_bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@contextmanager
def capture_tokens(model: nn.Module, layers: Sequence[int] = (), attention_layer: int | None = None) -> Iterator[TokenCapture]:
    """Within the block, forwards of ``model`` fill the yielded :class:`TokenCapture` (the last forward wins).

    The merge stages' tokens are read before the block's own merging (``norm1``'s input plus the attention
    branch's output), which :func:`algm_viz.capture.block_tokens` does not offer (its MLP input comes after
    the merging); the attention input comes from :func:`~algm_viz.capture.block_tokens`.

    Args:
        layers: 1-based blocks whose post-attention patch tokens to keep.
        attention_layer: 1-based block whose attention input and key bias to keep (None: none).
    """
    vit = find_vit(model)
    depth = len(vit.blocks)
    if any(not 1 <= layer <= depth for layer in [*layers, *([attention_layer] if attention_layer else [])]):
        raise ValueError(f"layers must be within 1..{depth}, got {list(layers)} and {attention_layer}")
    capture = TokenCapture(num_prefix=getattr(vit, "num_prefix_tokens", 1), attention_layer=attention_layer)
    inputs: dict[int, Tensor] = {}
    handles = []

    def keep_input(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[layer] = args[0]
        return hook

    def keep_tokens(layer: int):
        def hook(module: nn.Module, args: tuple, residual: Tensor) -> None:
            capture.tokens[layer] = (inputs.pop(layer) + residual)[0, capture.num_prefix:].detach().float()
        return hook

    def keep_attention(layer: int, normed: Tensor) -> None:
        state = algm_state(model)
        bias = state.attn_bias if state is not None else None  # what the block adds to its attention logits
        capture.attention_input = normed[0].detach()
        capture.attention_bias = None if bias is None else bias[0, 0, 0].detach().float()

    def keep_grid(module: nn.Module, args: tuple) -> None:
        capture.grid = tuple(int(v) for v in module.dynamic_feat_size(tuple(args[0].shape[-2:])))

    handles.append(vit.patch_embed.register_forward_pre_hook(keep_grid))
    for layer in sorted(set(layers)):
        block = vit.blocks[layer - 1]
        handles.append(block.norm1.register_forward_pre_hook(keep_input(layer)))
        handles.append(block.drop_path1.register_forward_hook(keep_tokens(layer)))
    attention_layers = [attention_layer] if attention_layer is not None else []
    try:
        with block_tokens(vit, attention_layers, keep_attention, ATTENTION_INPUT):
            yield capture
    finally:
        for handle in handles:
            handle.remove()
    state = algm_state(model)
    if state is not None:
        capture.record = state.record
        capture.windows = {stage.name: stage.window for stage in state.stages if isinstance(stage, CLAPStage)}


def _sizes(merge: Merge | None, num_patches: int, device: torch.device) -> Tensor:
    """``[T]`` patches per token of ``merge``'s output (all 1 for None)."""
    if merge is None:
        return torch.ones(num_patches, device=device)
    return torch.bincount(merge.groups[0], minlength=merge.num_out + 1)[: merge.num_out].float().to(device)


def stage_tokens(capture: TokenCapture, stage: str) -> tuple[Tensor, Tensor]:
    """The tokens merge stage ``stage`` compared, and each patch's token among them.

    Returns ``([T, C]`` fp32 tokens, ``[N]`` long token of each patch``)``. Stages earlier in the same
    block are applied to the captured tokens as the model applies them (size-weighted means).
    """
    record = capture.record
    names = [name for name, _, _ in record.stages] if record is not None else []
    if stage not in names:
        raise ValueError(f"no merge stage {stage!r} ran (stages: {names or 'none'})")
    index = names.index(stage)
    layer = record.stages[index][1]
    if layer not in capture.tokens:
        raise ValueError(f"the tokens of layer {layer} were not captured")
    tokens = capture.tokens[layer]
    earlier = [merge for _, stage_layer, merge in record.stages[:index] if stage_layer < layer]
    before_layer = compose(earlier)
    size = _sizes(before_layer, capture.grid[0] * capture.grid[1], tokens.device)
    for _, stage_layer, merge in record.stages[len(earlier):index]:  # earlier stages of the same block
        merged, size = merge.merge(tokens[None], size[None, :, None])
        tokens, size = merged[0, : int(merge.counts[0])], size[0, : int(merge.counts[0]), 0]
    before = compose([merge for _, _, merge in record.stages[:index]])
    patch_token = before.groups[0] if before is not None else torch.arange(tokens.shape[0], device=tokens.device)
    return tokens, patch_token.to(tokens.device)


def mean_pairwise_similarity(tokens: Tensor) -> float | None:
    """Mean cosine similarity over the ordered pairs ``i != j`` of ``tokens`` ``[n, C]`` (None for n < 2),
    as CLAP scores a window: ``(|Σ u|² − Σ |u|²) / (n (n − 1))`` for unit vectors ``u``."""
    n = tokens.shape[0]
    if n < 2:
        return None
    unit = F.normalize(tokens.double(), dim=-1)
    return float((unit.sum(0).pow(2).sum() - unit.pow(2).sum()) / (n * (n - 1)))


def attention_row(attn: nn.Module, normed: Tensor, bias: Tensor | None, query: int) -> Tensor:
    """``[T]`` fp32: the softmax attention of token ``query`` over all keys, mean over heads, as timm's
    ``Attention`` computes it for its input ``normed`` ``[T, C]`` with additive key bias ``bias`` ``[T]``."""
    tokens, _ = normed.shape
    with torch.inference_mode():
        qkv = attn.qkv(normed[None]).reshape(1, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [1, h, T, d]
        logits = ((q[0, :, query, None].float() * attn.scale) @ k[0].float().transpose(-2, -1))[:, 0]  # [h, T]
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(-1).mean(0)


def class_shares(classes: np.ndarray, region: np.ndarray, num_classes: int, ignore_index: int) -> dict[int, float]:
    """``{class: share}`` of the pixels of ``classes`` ``[H, W]`` inside ``region`` ``[H, W]`` bool
    (``ignore_index`` and ids outside ``0..num_classes-1`` left out), largest first; empty if none."""
    values = np.asarray(classes)[np.asarray(region, dtype=bool)].astype(np.int64)
    values = values[(values != ignore_index) & (values >= 0) & (values < num_classes)]
    if values.size == 0:
        return {}
    counts = np.bincount(values, minlength=num_classes)
    order = np.argsort(-counts, kind="stable")
    return {int(c): float(counts[c] / values.size) for c in order if counts[c] > 0}


@dataclass(frozen=True)
class Inspection:
    """One patch seen through the merge; grid maps are ``[gh, gw]`` numpy arrays.

    Attributes:
        patch: ``(row, col)`` on the patch grid.
        window: bool, the patches of the patch's CLAP window (all False where the patch lies in a
            partial edge window, which CLAP never merges).
        window_merged: whether CLAP merged that window.
        window_similarity: its mean pairwise similarity at the CLAP layer (CLAP's score), or None.
        group: bool, the patches of the patch's final merge group (itself alone when unmerged).
        group_inputs: GBM input tokens inside the group (1 when GBM did not merge it).
        similarity: ``{stage: float map}`` cosine similarity of the patch's token to every patch's token
            among the tokens ``stage`` compared.
        thresholds: ``{stage: τ}`` the threshold each stage merged with.
        group_similarity: ``{stage: mean pairwise similarity}`` of the group's distinct tokens at each
            stage (None where the group holds one token there).
        attention: ``{"baseline", "merged"}`` float maps: the patch's attention row in the captured
            block, per patch; a merged token's weight is spread evenly over its patches, so each map sums
            to ``1 - attention_prefix``.
        attention_prefix: ``{"baseline", "merged"}`` weight on the prefix (class) tokens.
    """

    patch: tuple[int, int]
    window: np.ndarray
    window_merged: bool
    window_similarity: float | None
    group: np.ndarray
    group_inputs: int
    similarity: dict[str, np.ndarray]
    thresholds: dict[str, float]
    group_similarity: dict[str, float | None]
    attention: dict[str, np.ndarray]
    attention_prefix: dict[str, float]


def _window_mask(grid: tuple[int, int], window: tuple[int, int], row: int, col: int) -> np.ndarray:
    (gh, gw), (kh, kw) = grid, window
    mask = np.zeros(grid, dtype=bool)
    top, left = row // kh * kh, col // kw * kw
    if top + kh <= gh and left + kw <= gw:
        mask[top : top + kh, left : left + kw] = True
    return mask


def _attention_map(attn: nn.Module, capture: TokenCapture, patch: int) -> tuple[np.ndarray, float]:
    """Per-patch attention of ``patch``'s token in the captured block, and its weight on the prefix."""
    prefix, (gh, gw) = capture.num_prefix, capture.grid
    merges = [m for _, layer, m in capture.record.stages if layer < capture.attention_layer] if capture.record else []
    before = compose(merges)
    device = capture.attention_input.device
    token_of = before.groups[0].to(device) if before is not None else torch.arange(gh * gw, device=device)
    row = attention_row(attn, capture.attention_input, capture.attention_bias, prefix + int(token_of[patch]))
    sizes = _sizes(before, gh * gw, device)
    per_patch = row[prefix:][token_of] / sizes[token_of]
    return per_patch.reshape(gh, gw).cpu().numpy(), float(row[:prefix].sum())


def inspect_patch(model: nn.Module, merged: TokenCapture, baseline: TokenCapture | None, row: int, col: int) -> Inspection:
    """What the merged forward (``merged``) did with patch ``(row, col)``, and its attention beside the
    unmerged forward's (``baseline``, may be None). ``model`` supplies the attention weights."""
    grid, record = merged.grid, merged.record
    if record is None or not record.stages:
        raise ValueError("the captured forward merged nothing: inspect a forward with merging applied")
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise ValueError(f"patch ({row}, {col}) is outside the {grid[0]}×{grid[1]} patch grid")
    patch = row * grid[1] + col
    final = record.final.groups[0]
    group = final == final[patch]
    recorded = record.thresholds()
    similarity, group_similarity, thresholds, token_index = {}, {}, {}, {}
    for name, layer, _ in record.stages:
        if name in recorded:
            thresholds[name] = float(recorded[name][0])
        if layer not in merged.tokens:
            continue
        tokens, token_of = stage_tokens(merged, name)
        unit = F.normalize(tokens, dim=-1)
        similarity[name] = (unit @ unit[token_of[patch]])[token_of].reshape(grid).cpu().numpy()
        group_similarity[name] = mean_pairwise_similarity(tokens[torch.unique(token_of[group.to(token_of.device)])])
        token_index[name] = (tokens, token_of)
    window_mask, window_merged, window_score = np.zeros(grid, dtype=bool), False, None
    local = next(((name, merge) for name, _, merge in record.stages if name in merged.windows), None)
    if local is not None:
        name, merge = local
        window_mask = _window_mask(grid, merged.windows[name], row, col)
        members = torch.from_numpy(window_mask.ravel()).to(merge.groups.device)
        window_merged = int(window_mask.sum()) > 1 and bool((merge.groups[0][members] == merge.groups[0][patch]).all())
        if name in token_index and window_mask.any():
            tokens, token_of = token_index[name]
            window_score = mean_pairwise_similarity(tokens[token_of[members.to(token_of.device)]])
    before_last = compose([merge for _, _, merge in record.stages[:-1]])
    last_input = before_last.groups[0] if before_last is not None else torch.arange(grid[0] * grid[1], device=final.device)
    group_inputs = int(torch.unique(last_input[group.to(last_input.device)]).numel())
    attention, prefix_weight = {}, {}
    if merged.attention_layer is not None:
        attn = find_vit(model).blocks[merged.attention_layer - 1].attn
        for key, capture in (("baseline", baseline), ("merged", merged)):
            if capture is not None and capture.attention_input is not None:
                attention[key], prefix_weight[key] = _attention_map(attn, capture, patch)
    return Inspection(
        patch=(row, col), window=window_mask, window_merged=window_merged, window_similarity=window_score,
        group=group.cpu().numpy().reshape(grid), group_inputs=group_inputs, similarity=similarity,
        thresholds=thresholds, group_similarity=group_similarity, attention=attention, attention_prefix=prefix_weight,
    )
