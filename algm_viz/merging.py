"""Token-merging primitives as pure tensor functions.

Shapes: ``B`` images, ``N`` input tokens, ``N'`` (padded) output tokens, ``C`` channels.

* :func:`local_merge` is ALGM's CLAP (Conditional Local Average Pooling): the tokens of a k×k window
  on the patch grid become one token when their mean pairwise cosine similarity exceeds τ (τ = -inf:
  plain k×k pooling, Segformer++'s 2-D neighbour merging).
* :func:`global_merge` is ALGM's GBM (Global Bipartite Matching): A = even, B = odd positions; each A
  token keeps its best edge to B, and edges above τ are merged into their B token. It is one case of
  :func:`bipartite_merge`, which also does ToMe's fixed-``r`` matching and Segformer++'s matching onto
  a strided grid of destinations (:func:`grid_destinations`).
* :func:`budget_window_merge` merges the best windows under a fixed budget (CTS-style sharing).

All return a :class:`Merge`, which maps every input token to an output slot (``groups``) and merges
or unmerges any tensor laid out like the input with one scatter or one gather: bookkeeping is
O(N) per image, never O(N²). Merging is adaptive per image: every image merges exactly what it would
merge alone, and images with fewer output tokens are padded at the end (``Merge.mask``). The paper
code's batch-minimum behaviour (every image merges as many tokens as the image that merges fewest) is
available with ``batch_min=True``.

Output order: each output token sits at the position of its representative input token (the window's
top-left token for CLAP, the B token for GBM), so outputs keep the raster order of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Merge",
    "alternate_destinations",
    "bipartite_merge",
    "budget_window_merge",
    "global_merge",
    "grid_destinations",
    "local_merge",
    "window_index",
    "window_merge",
    "window_similarity",
]


@dataclass(frozen=True)
class Merge:
    """A many-to-one assignment of input tokens to output tokens, per image.

    Attributes:
        groups: ``[B, N]`` long, the output slot of each input token. Padding input tokens (where
            ``input_mask`` is False) point at slot ``num_out``, which merging discards.
        counts: ``[B]`` long, real output tokens per image; slots ``>= counts[b]`` are padding.
        num_out: ``N'`` = ``max(counts)``, the padded output length.
        input_mask: ``[B, N]`` bool, True for real input tokens, or None when all are real.
    """

    groups: Tensor
    counts: Tensor
    num_out: int
    input_mask: Tensor | None = None

    @property
    def num_in(self) -> int:
        return self.groups.shape[1]

    @property
    def mask(self) -> Tensor | None:
        """``[B, N']`` bool, True for real output tokens; None when no image is padded."""
        if bool((self.counts == self.num_out).all()):
            return None
        return torch.arange(self.num_out, device=self.counts.device) < self.counts[:, None]

    def merge(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Size-weighted mean of the tokens in each group.

        Args:
            x: ``[B, N, C]`` tokens.
            size: ``[B, N, 1]`` patches represented by each token (default 1).
        Returns:
            ``([B, N', C]`` means, ``[B, N', 1]`` summed sizes``)``; padding slots are 0 with size 0.
            Sums are accumulated in fp32 for half-precision inputs.
        """
        batch, _, channels = x.shape
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        weight = torch.ones_like(x[..., :1], dtype=acc_dtype) if size is None else size.to(acc_dtype)
        if self.input_mask is not None:
            weight = weight * self.input_mask[..., None]
        weighted = x.to(acc_dtype)
        if size is not None or self.input_mask is not None:
            weighted = weighted * weight
        index = self.groups[..., None]
        sums = x.new_zeros(batch, self.num_out + 1, channels, dtype=acc_dtype)
        sums.scatter_add_(1, index.expand(-1, -1, channels), weighted)
        sizes = x.new_zeros(batch, self.num_out + 1, 1, dtype=acc_dtype).scatter_add_(1, index, weight)
        sums, sizes = sums[:, : self.num_out], sizes[:, : self.num_out]
        means = sums / sizes.clamp_min(torch.finfo(acc_dtype).tiny)
        out_size_dtype = size.dtype if size is not None else x.dtype
        return means.to(x.dtype), sizes.to(out_size_dtype)

    def unmerge(self, x: Tensor) -> Tensor:
        """``[B, N', C]`` -> ``[B, N, C]``: every input token takes its group's value (one gather)."""
        index = self.groups if self.input_mask is None else self.groups.clamp_max(self.num_out - 1)
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def then(self, later: "Merge") -> "Merge":
        """The composition ``later ∘ self``: input tokens of ``self`` to output slots of ``later``."""
        if later.num_in != self.num_out:
            raise ValueError(f"cannot compose: {self.num_out} outputs feed a merge of {later.num_in} inputs")
        groups = later.groups.gather(1, self.groups.clamp_max(self.num_out - 1))
        if self.input_mask is not None:
            groups = groups.masked_fill(~self.input_mask, later.num_out)
        return Merge(groups, later.counts, later.num_out, self.input_mask)

    @staticmethod
    def identity(batch: int, num_tokens: int, device: torch.device | str | None = None) -> "Merge":
        """The merge that keeps every one of ``num_tokens`` tokens."""
        groups = torch.arange(num_tokens, device=device).expand(batch, num_tokens).contiguous()
        counts = torch.full((batch,), num_tokens, dtype=torch.long, device=device)
        return Merge(groups, counts, num_tokens)


def _merge_from_targets(targets: Tensor, input_mask: Tensor | None) -> Merge:
    """Build a :class:`Merge` from ``targets`` ``[B, N]``: the representative input token of each
    token's group (a representative is its own target)."""
    positions = torch.arange(targets.shape[1], device=targets.device)
    is_rep = targets == positions
    if input_mask is not None:
        is_rep &= input_mask
    rank = is_rep.cumsum(1) - 1
    counts = is_rep.sum(1)
    num_out = int(counts.max()) if counts.numel() else 0
    groups = rank.gather(1, targets)
    if input_mask is not None:
        groups = groups.masked_fill(~input_mask, num_out)
    return Merge(groups, counts, num_out, input_mask)


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN; use a number (τ >= 1 merges nothing, τ < -1 merges all)")
    return threshold


def _keep_best(eligible: Tensor, score: Tensor, count: int) -> Tensor:
    """Keep, per image, the ``count`` best-scoring eligible candidates (fewer where fewer are eligible).

    eligible, score: ``[B, M]``. Returns ``[B, M]`` bool.
    """
    count = min(count, eligible.shape[1])
    keep = torch.zeros_like(eligible)
    if count > 0:
        best = score.masked_fill(~eligible, float("-inf")).topk(count, dim=1).indices
        keep.scatter_(1, best, True)
    return keep & eligible


def _keep_batch_min(eligible: Tensor, score: Tensor) -> Tensor:
    """Keep, per image, as many of its best candidates as the image of the batch with fewest eligible."""
    fewest = int(eligible.sum(1).min())
    return eligible if fewest == eligible.shape[1] else _keep_best(eligible, score, fewest)


def _check_window(grid: tuple[int, int], window: tuple[int, int] | int, num_tokens: int) -> tuple[int, int]:
    kh, kw = (window, window) if isinstance(window, int) else tuple(window)
    if kh <= 0 or kw <= 0:
        raise ValueError(f"window must be positive, got {(kh, kw)}")
    height, width = grid
    if height <= 0 or width <= 0 or height * width != num_tokens:
        raise ValueError(f"grid {tuple(grid)} does not match {num_tokens} tokens")
    return kh, kw


def window_index(grid: tuple[int, int], window: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """``[S, K]`` raster indices of the tokens in each full ``window`` on a row-major ``grid``.

    Windows are tiled from the top-left; partial windows at the right/bottom edge are left out.
    ``S = (H // kh) * (W // kw)``, ``K = kh * kw``; the first column is each window's top-left token.
    """
    (height, width), (kh, kw) = grid, window
    rows = torch.arange((height // kh) * kh, device=device).view(-1, kh)  # [H//kh, kh]
    cols = torch.arange((width // kw) * kw, device=device).view(-1, kw)  # [W//kw, kw]
    index = rows[:, None, :, None] * width + cols[None, :, None, :]  # [H//kh, W//kw, kh, kw]
    return index.reshape(-1, kh * kw)


def window_similarity(tokens: Tensor, index: Tensor) -> Tensor:
    """Mean pairwise cosine similarity (self-pairs excluded) of the tokens in each window.

    Args:
        tokens: ``[B, N, C]``.
        index: ``[S, K]`` token indices per window, ``K >= 2``.
    Returns:
        ``[B, S]`` fp32, clamped to [-1, 1] (so τ >= 1 never merges). Uses
        ``sum_{i != j} u_i·u_j = |sum_i u_i|² - sum_i |u_i|²`` for unit ``u``: O(K·C) per window.
    """
    k = index.shape[1]
    unit = F.normalize(tokens[:, index].float(), dim=-1)  # [B, S, K, C]
    total = unit.sum(2).pow(2).sum(-1)
    self_pairs = unit.pow(2).sum((2, 3))
    return ((total - self_pairs) / (k * (k - 1))).clamp_(-1.0, 1.0)


def window_merge(selected: Tensor, index: Tensor, num_tokens: int) -> Merge:
    """Merge each selected window into one token (its top-left token is the representative).

    Args:
        selected: ``[B, S]`` bool, which windows merge.
        index: ``[S, K]`` from :func:`window_index`.
        num_tokens: ``N``.
    """
    batch = selected.shape[0]
    targets = torch.arange(num_tokens, device=selected.device).expand(batch, num_tokens).contiguous()
    if index.numel():
        window_targets = torch.where(selected[..., None], index[:, :1], index)  # [B, S, K]
        targets.scatter_(1, index.flatten().expand(batch, -1), window_targets.flatten(1))
    return _merge_from_targets(targets, None)


def local_merge(
    tokens: Tensor,
    grid: tuple[int, int],
    window: tuple[int, int] | int,
    threshold: float,
    *,
    batch_min: bool = False,
) -> Merge:
    """CLAP: merge each full window whose mean pairwise cosine similarity is greater than ``threshold``.

    Args:
        tokens: ``[B, N, C]`` patch tokens, row-major on ``grid = (H, W)``, ``N = H * W``.
        window: ``(kh, kw)`` (or one int for a square window).
        threshold: τ; τ >= 1 merges nothing, τ < -1 merges every full window (plain k×k average
            pooling, as Segformer++'s 2-D neighbour merging).
        batch_min: merge, per image, only as many windows (its most similar ones) as the image of the
            batch that merges fewest (the paper code's behaviour; no padding).
    """
    threshold = _check_threshold(threshold)
    batch, num_tokens, _ = tokens.shape
    kh, kw = _check_window(grid, window, num_tokens)
    index = window_index(tuple(grid), (kh, kw), tokens.device)
    if index.numel() == 0 or kh * kw == 1:
        return window_merge(torch.zeros(batch, index.shape[0], dtype=torch.bool, device=tokens.device), index, num_tokens)
    similarity = window_similarity(tokens, index)  # [B, S]
    selected = similarity > threshold
    if batch_min:
        selected = _keep_batch_min(selected, similarity)
    return window_merge(selected, index, num_tokens)


def budget_window_merge(scores: Tensor, grid: tuple[int, int], window: tuple[int, int] | int, budget: int) -> Merge:
    """Merge the ``budget`` best-scoring full windows of each image (CTS-style token sharing).

    Args:
        scores: ``[B, S]`` a policy's score per window (higher = more likely one class), windows as
            :func:`window_index` orders them.
        budget: windows merged per image (clipped to the number of full windows).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    batch = scores.shape[0]
    height, width = grid
    kh, kw = _check_window(grid, window, height * width)
    index = window_index((height, width), (kh, kw), scores.device)
    if scores.shape[1] != index.shape[0]:
        raise ValueError(f"{scores.shape[1]} window scores for {index.shape[0]} windows")
    eligible = torch.ones(batch, index.shape[0], dtype=torch.bool, device=scores.device)
    return window_merge(_keep_best(eligible, scores.float(), budget), index, height * width)


def alternate_destinations(num_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """``[N]`` bool: the odd positions (ToMe's and GBM's set B)."""
    return torch.arange(num_tokens, device=device) % 2 == 1


def grid_destinations(grid: tuple[int, int], stride: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """``[N]`` bool: tokens on a strided 2-D grid, every ``stride = (sy, sx)``-th row and column
    (Segformer++'s destination set)."""
    (height, width), (sy, sx) = grid, stride
    if sy <= 0 or sx <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    rows = torch.arange(height, device=device) % sy == 0
    cols = torch.arange(width, device=device) % sx == 0
    return (rows[:, None] & cols[None, :]).flatten()


def bipartite_merge(
    tokens: Tensor,
    destinations: Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    size: Tensor | None = None,
    batch_min: bool = False,
) -> Merge:
    """Bipartite matching: each source token keeps only its edge to its most similar destination.

    Either ``threshold`` (merge the edges whose cosine similarity is greater than it; GBM) or ``r``
    (merge each image's ``r`` most similar edges; ToMe) says which edges merge. Destinations are never
    sources, so a group is one destination plus the sources matched to it.

    Args:
        tokens: ``[B, N, C]`` the matching metric (tokens, or ToMe's attention keys).
        destinations: ``[N]`` bool, the set B (the rest is the set A of sources).
        size: ``[B, N, 1]`` token sizes from an earlier merge; size-0 tokens are padding and take no
            part in matching.
        batch_min: with ``threshold``, every image merges only as many sources (its best edges) as
            the image of the batch that merges fewest.
    """
    if (threshold is None) == (r is None):
        raise ValueError("give exactly one of threshold and r")
    if threshold is not None:
        threshold = _check_threshold(threshold)
    elif r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    batch, num_tokens, _ = tokens.shape
    if destinations.shape != (num_tokens,):
        raise ValueError(f"destinations must be [{num_tokens}] bool, got {tuple(destinations.shape)}")
    valid = None if size is None else size[..., 0] > 0
    if valid is not None and bool(valid.all()):
        valid = None
    targets = torch.arange(num_tokens, device=tokens.device).expand(batch, num_tokens).contiguous()
    src = (~destinations).nonzero().flatten().to(tokens.device)
    dst = destinations.nonzero().flatten().to(tokens.device)
    if src.numel() == 0 or dst.numel() == 0:
        return _merge_from_targets(targets, valid)
    unit = F.normalize(tokens.float(), dim=-1)
    scores = (unit[:, src] @ unit[:, dst].transpose(1, 2)).clamp_(-1.0, 1.0)  # [B, Na, Nb]
    if valid is not None:
        scores.masked_fill_(~valid[:, None, dst], float("-inf"))
    best_score, best_dst = scores.max(-1)  # [B, Na]
    eligible = best_score > float("-inf")
    if valid is not None:
        eligible &= valid[:, src]
    if threshold is not None:
        merged = eligible & (best_score > threshold)
        if batch_min:
            merged = _keep_batch_min(merged, best_score)
    else:
        merged = _keep_best(eligible, best_score, r)
    targets[:, src] = torch.where(merged, dst[best_dst], src)
    return _merge_from_targets(targets, valid)


def global_merge(
    tokens: Tensor,
    threshold: float,
    size: Tensor | None = None,
    *,
    batch_min: bool = False,
) -> Merge:
    """GBM: bipartite matching with a similarity threshold instead of a fixed count.

    A = even positions, B = odd positions of ``tokens``. Each A token keeps only its edge to its most
    similar B token (cosine similarity); edges greater than ``threshold`` merge the A token into that
    B token (see :func:`bipartite_merge`).

    Args:
        tokens: ``[B, N, C]``.
        threshold: τ; τ >= 1 merges nothing, τ < -1 merges every real A token.
        size: ``[B, N, 1]`` token sizes from an earlier merge; size-0 tokens are padding.
        batch_min: the paper code's batch-minimum behaviour (see :func:`bipartite_merge`).
    """
    destinations = alternate_destinations(tokens.shape[1], tokens.device)
    return bipartite_merge(tokens, destinations, threshold=threshold, size=size, batch_min=batch_min)
