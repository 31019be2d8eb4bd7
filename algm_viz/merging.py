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
* ``official=True`` (CLAP) and :func:`official_global_merge` (GBM) follow the official ALGM code where
  it differs from the paper: ``>=`` comparisons, the official output order and A/B partition, and
  GBM's online threshold (:data:`ONLINE`), set per forward from the best-edge similarities.

All return a :class:`Merge`, which maps every input token to an output slot (``groups``) and merges
or unmerges any tensor laid out like the input with one scatter or one gather: bookkeeping is
O(N) per image, never O(N²). Merging is adaptive per image: every image merges exactly what it would
merge alone, and images with fewer output tokens are padded at the end (``Merge.mask``). The paper
code's batch-minimum behaviour (every image merges as many tokens as the image that merges fewest) is
available with ``batch_min=True``.

Output order: each output token sits at the position of its representative input token (the window's
top-left token for CLAP, the B token for GBM), so outputs keep the raster order of the input. The
official CLAP order is different (merged windows first, by descending similarity; see :func:`local_merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ONLINE",
    "Merge",
    "alternate_destinations",
    "bipartite_merge",
    "budget_window_merge",
    "forced_length",
    "global_merge",
    "grid_destinations",
    "local_merge",
    "official_global_merge",
    "online_threshold",
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
        threshold: ``[B]`` fp32, the similarity threshold each image was merged with, where a threshold
            decided the merge (CLAP, GBM); None otherwise.
    """

    groups: Tensor
    counts: Tensor
    num_out: int
    input_mask: Tensor | None = None
    threshold: Tensor | None = None

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


def forced_length(merge: Merge, num_out: int) -> Merge:
    """The inputs of ``merge`` merged into exactly ``num_out`` tokens per image instead: input ``i`` goes to slot
    ``min(i, num_out - 1)`` (padding inputs are still discarded). Only for measuring a forward at chosen token
    counts (:func:`algm_viz.flops.TokenCountFlops`): what follows sees the shapes of a real merge to ``num_out``."""
    if not 1 <= num_out <= merge.num_in:
        raise ValueError(f"cannot force {merge.num_in} input tokens to {num_out} outputs")
    batch, num_in = merge.groups.shape
    groups = torch.arange(num_in, device=merge.groups.device).clamp_max(num_out - 1).expand(batch, num_in)
    if merge.input_mask is not None:
        groups = groups.masked_fill(~merge.input_mask, num_out)
    counts = torch.full((batch,), num_out, dtype=torch.long, device=merge.counts.device)
    return Merge(groups.contiguous(), counts, num_out, merge.input_mask, merge.threshold)


#: The ``threshold`` of :func:`official_global_merge` that asks for the official code's online rule.
ONLINE = "official"


def _with_threshold(merge: Merge, threshold: Tensor | float) -> Merge:
    """``merge`` with the ``[B]`` threshold it was made with recorded (a float is broadcast)."""
    batch = merge.counts.shape[0]
    value = torch.as_tensor(threshold, dtype=torch.float32, device=merge.counts.device).expand(batch).clone()
    return replace(merge, threshold=value)


def _rank_descending(score: Tensor) -> Tensor:
    """``[B, M]`` -> ``[B, M]`` indices by descending score, ties by position (first index first), the
    order of ToMe's ``argsort(descending=True)`` and ``max``/``argmax``."""
    return score.argsort(dim=1, descending=True, stable=True)


def _keep_top(merged: Tensor, score: Tensor, count: Tensor | int) -> Tensor:
    """``[B, M]`` bool: per image, the ``count`` (``[B]`` or int) highest-scoring ``merged`` candidates,
    ranked as :func:`_rank_descending` does."""
    order = _rank_descending(score.masked_fill(~merged, float("-inf")))
    count = torch.as_tensor(count, device=merged.device).reshape(-1, 1)
    in_top = torch.arange(merged.shape[1], device=merged.device) < count  # [B, M] in rank order
    keep = torch.zeros_like(merged).scatter_(1, order, in_top.expand_as(merged))
    return keep & merged


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


def official_window_merge(selected: Tensor, similarity: Tensor, index: Tensor, num_tokens: int) -> Merge:
    """Merge each selected window into one token, in the official ALGM code's output order.

    Output slots: the merged windows first, by descending window similarity (ties by window order),
    then every unmerged token in raster order. (The official code keeps a merged window in its
    bottom-right token; which token represents a window has no effect on the merge.)

    Args:
        selected: ``[B, S]`` bool, which windows merge.
        similarity: ``[B, S]`` the windows' similarities (the order of the merged ones).
        index: ``[S, K]`` from :func:`window_index`.
        num_tokens: ``N``.
    """
    batch, windows = selected.shape
    k = index.shape[1]
    order = _rank_descending(similarity.float().masked_fill(~selected, float("-inf")))  # [B, S]
    positions = torch.arange(windows, device=selected.device).expand(batch, windows)
    window_rank = torch.empty_like(order).scatter_(1, order, positions)  # [B, S] slot of each window
    flat = index.flatten().expand(batch, -1)  # [B, S*K]
    in_merged = torch.zeros(batch, num_tokens, dtype=torch.bool, device=selected.device)
    in_merged.scatter_(1, flat, selected.repeat_interleave(k, dim=1))
    window_of = torch.zeros(num_tokens, dtype=torch.long, device=selected.device)
    window_of[index.flatten()] = torch.arange(windows, device=selected.device).repeat_interleave(k)
    num_merged = selected.sum(1)  # [B]
    unmerged = ~in_merged
    unmerged_slot = unmerged.cumsum(1) - 1 + num_merged[:, None]
    groups = torch.where(in_merged, window_rank.gather(1, window_of.expand(batch, -1)), unmerged_slot)
    counts = num_merged + unmerged.sum(1)
    return Merge(groups, counts, int(counts.max()) if counts.numel() else 0)


def local_merge(
    tokens: Tensor,
    grid: tuple[int, int],
    window: tuple[int, int] | int,
    threshold: float,
    *,
    batch_min: bool = False,
    official: bool = False,
) -> Merge:
    """CLAP: merge each full window whose mean pairwise cosine similarity is greater than ``threshold``.

    Args:
        tokens: ``[B, N, C]`` patch tokens, row-major on ``grid = (H, W)``, ``N = H * W``.
        window: ``(kh, kw)`` (or one int for a square window).
        threshold: τ; τ >= 1 merges nothing, τ < -1 merges every full window (plain k×k average
            pooling, as Segformer++'s 2-D neighbour merging).
        batch_min: merge, per image, only as many windows (its most similar ones) as the image of the
            batch that merges fewest (the paper code's behaviour; no padding).
        official: the official ALGM code's CLAP: windows whose similarity is ``>=`` τ merge, and the
            outputs come in its order (:func:`official_window_merge`), which its GBM partitions.
    Returns:
        The :class:`Merge`, with ``threshold`` = τ for every image.
    """
    threshold = _check_threshold(threshold)
    batch, num_tokens, _ = tokens.shape
    kh, kw = _check_window(grid, window, num_tokens)
    index = window_index(tuple(grid), (kh, kw), tokens.device)
    if index.numel() == 0 or kh * kw == 1:
        none = torch.zeros(batch, index.shape[0], dtype=torch.bool, device=tokens.device)
        return _with_threshold(window_merge(none, index, num_tokens), threshold)
    similarity = window_similarity(tokens, index)  # [B, S]
    selected = similarity >= threshold if official else similarity > threshold
    if official:
        if batch_min:
            selected = _keep_top(selected, similarity, int(selected.sum(1).min()))
        return _with_threshold(official_window_merge(selected, similarity, index, num_tokens), threshold)
    if batch_min:
        selected = _keep_batch_min(selected, similarity)
    return _with_threshold(window_merge(selected, index, num_tokens), threshold)


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
    Returns:
        The :class:`Merge`, with ``threshold`` = τ for every image.
    """
    destinations = alternate_destinations(tokens.shape[1], tokens.device)
    merge = bipartite_merge(tokens, destinations, threshold=threshold, size=size, batch_min=batch_min)
    return _with_threshold(merge, threshold)


def online_threshold(best: Tensor, eligible: Tensor, layer: int, *, batch_min: bool = False) -> Tensor:
    """The official ALGM code's GBM threshold: mean + std / ``layer`` of the best-edge similarities.

    Args:
        best: ``[B, Na]`` each A token's best-edge similarity.
        eligible: ``[B, Na]`` bool, the A tokens that may merge (the class token and padding are not).
        layer: the GBM layer, 1-based.
        batch_min: the official batch rule: the mean over images of the per-image means plus the mean
            over images of the per-image stds divided by ``layer``, one value for the whole batch.
            Otherwise each image's own mean + std / ``layer``.
    Returns:
        ``[B]`` fp32. The std is torch's (unbiased); an image with fewer than two eligible tokens has
        std 0 and, with none, mean 0 (nothing of it can merge anyway).
    """
    if layer < 1:
        raise ValueError(f"layer is 1-based, got {layer}")
    best = best.float().masked_fill(~eligible, 0.0)
    count = eligible.sum(1).float()
    mean = best.sum(1) / count.clamp_min(1)
    squares = (best - mean[:, None]).masked_fill(~eligible, 0.0).pow(2).sum(1)
    std = (squares / (count - 1).clamp_min(1)).sqrt().masked_fill(count < 2, 0.0)
    if batch_min:
        return (mean.mean() + std.mean() / layer).expand_as(mean).clone()
    return mean + std / layer


def official_global_merge(
    tokens: Tensor,
    threshold: float | str,
    size: Tensor | None = None,
    *,
    num_prefix: int = 1,
    layer: int | None = None,
    batch_min: bool = False,
) -> Merge:
    """GBM as the official ALGM code does it, on the whole sequence, prefix tokens included.

    A = even, B = odd positions of ``tokens`` (so with one class token, A holds the class token and
    the odd patches); the prefix tokens take no part (the official code sets the class token's row
    to -inf). Similarities are the official code's (``a @ b.T`` of the normalised tokens, not clamped to
    [-1, 1]: a clamp would turn fp32 near ties above 1 into exact ties broken by position), each A token
    keeps its best B (the first one on a tie, as ``max`` does), and the edges ``>=`` the threshold
    merge into their B token. With ``batch_min``, each image merges its ``r`` best edges (ranked as
    ToMe's ``argsort``), ``r`` the fewest edges any image has at or above the threshold.

    Args:
        tokens: ``[B, T, C]``, ``num_prefix`` prefix tokens first, then the patch tokens in the order
            the earlier stages left them (the official CLAP's order, :func:`official_window_merge`).
        threshold: τ, or :data:`ONLINE` for the official online rule (:func:`online_threshold`).
        size: ``[B, T, 1]`` token sizes; size-0 tokens are padding and take no part.
        layer: the GBM layer (1-based), needed by the online rule.
        batch_min: the official code's batch behaviour (one threshold and one ``r`` per batch).
            Otherwise every image has its own threshold and merges every edge at or above it.
    Returns:
        The :class:`Merge` of the ``T - num_prefix`` patch tokens, with each image's threshold.
        An image with no edge at or above its threshold merges nothing.
    """
    online = threshold == ONLINE
    if online and layer is None:
        raise ValueError("the online threshold needs the GBM layer")
    if not online:
        threshold = _check_threshold(threshold)
    batch, length, _ = tokens.shape
    if not 0 <= num_prefix <= length:
        raise ValueError(f"num_prefix {num_prefix} does not fit {length} tokens")
    valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device) if size is None else size[..., 0] > 0
    valid[:, :num_prefix] = False
    unit = F.normalize(tokens.float(), dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    valid_a, valid_b = valid[:, ::2], valid[:, 1::2]
    scores.masked_fill_(~valid_b[:, None, :], float("-inf"))
    best, best_b = scores.max(-1)  # [B, Na]
    eligible = valid_a & (best > float("-inf"))
    if online:
        per_image = online_threshold(best, eligible, layer, batch_min=batch_min)
    else:
        per_image = torch.full((batch,), threshold, dtype=torch.float32, device=tokens.device)
    merged = eligible & (best >= per_image[:, None])
    if batch_min:
        merged = _keep_top(merged, best, int(merged.sum(1).min()) if batch else 0)
    positions = torch.arange(length, device=tokens.device)
    targets = positions.expand(batch, length).clone()
    targets[:, ::2] = torch.where(merged, positions[1::2][best_b], positions[::2])
    patch_targets = targets[:, num_prefix:] - num_prefix
    patch_valid = valid[:, num_prefix:]
    merge = _merge_from_targets(patch_targets, None if bool(patch_valid.all()) else patch_valid)
    return replace(merge, threshold=per_image)
