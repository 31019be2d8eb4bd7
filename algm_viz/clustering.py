"""Training-free token clustering for dense prediction, as pure tensor functions on the patch grid.

Shapes: ``B`` images, ``N = H * W`` patch tokens row-major on ``grid = (H, W)``, ``M`` clusters,
``C`` channels, ``K`` candidate clusters per token.

* :func:`local_kmeans` is Expedite's hourglass token clustering (Liang et al., "Expediting Large-Scale
  Vision Transformer for Dense Prediction without Fine-tuning", NeurIPS 2022): ``h × w`` centres from
  adaptive average pooling of the grid, then a few iterations in which every token is softly assigned
  to the centres of the cells around its own cell only (softmax of -distance² / τ) and the
  centres become the affinity-weighted means. Its :class:`SoftClusterMerge` keeps the soft assignment
  (to merge) and Expedite's token reconstruction (to unmerge: every token is a softmax-weighted sum of
  the outputs of the ``k`` clusters most similar to it at the clustering layer).
* :func:`density_peaks_clusters` is AiluRus's spatial-aware density clustering (Li et al., "AiluRus: A
  Scalable ViT Framework for Dense Prediction", NeurIPS 2023), DPC-kNN style: local density from the
  ``k`` nearest neighbours, δ = distance to the nearest denser token, the ``M`` tokens of highest ρ·δ are
  centres, every token joins its nearest centre; distances add a spatial prior (grid distance) to the
  feature distance. Its :class:`ClusterMerge` is a hard assignment (mean per cluster, unmerging gives
  every patch its cluster's output).

Distances are Euclidean in units of the image's token spread ``s`` (``s² = mean ||x - x̄||²`` over its
tokens): the official Expedite code weighs by ``exp(-||x - c||² / T)`` with a fixed ``T`` on raw features;
dividing by ``s²`` keeps τ independent of a model's feature scale, and, unlike cosine similarity, of the
component all tokens share. Both merges say ``restore_in_encoder = True``: the engine restores the full
token set at the encoder output, before the decoder, as both papers do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .merging import Merge

__all__ = [
    "ClusterMerge",
    "SoftClusterMerge",
    "ailurus_planner",
    "cluster_grid",
    "density_peaks_clusters",
    "expedite_planner",
    "local_kmeans",
    "neighbour_cells",
]


@dataclass(frozen=True)
class ClusterMerge(Merge):
    """A hard clustering (``groups`` = cluster of each patch) whose unmerging happens at the encoder
    output when ``restore_in_encoder`` (the papers' placement) and else where the decoder unmerges."""

    restore_in_encoder: bool = True


@dataclass(frozen=True)
class SoftClusterMerge(ClusterMerge):
    """Expedite's soft clustering and token reconstruction.

    Attributes (besides :class:`~algm_viz.merging.Merge`'s; ``groups`` is each token's most likely
    cluster, for the record and the merge maps):
        candidates: ``[N, K]`` long, the clusters a token may join (its neighbouring cells; an index
            off the grid is clamped and has affinity 0).
        affinity: ``[B, N, K]`` soft assignment of each token to its candidates (rows sum to 1).
        recon_index: ``[B, N, k]`` long, the ``k`` clusters each token is rebuilt from.
        recon_weight: ``[B, N, k]`` their weights (rows sum to 1).
    """

    candidates: Tensor | None = None
    affinity: Tensor | None = None
    recon_index: Tensor | None = None
    recon_weight: Tensor | None = None

    def merge(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[B, N, C]`` -> (``[B, M, C]`` affinity-weighted means, ``[B, M, 1]`` summed affinity × size)."""
        weight = self.affinity if size is None else self.affinity * size.to(self.affinity.dtype)
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        means, sizes = _local_weighted_mean(weight.to(acc_dtype), x.to(acc_dtype), self.candidates, self.num_out)
        return means.to(x.dtype), sizes.to(x.dtype if size is None else size.dtype)

    def unmerge(self, x: Tensor) -> Tensor:
        """``[B, M, C]`` cluster outputs -> ``[B, N, C]``: token reconstruction (one gather, O(N·k·C))."""
        batch, num_in, k = self.recon_index.shape
        index = self.recon_index.reshape(batch, num_in * k, 1).expand(-1, -1, x.shape[-1])
        picked = x.gather(1, index).reshape(batch, num_in, k, x.shape[-1])
        return (picked * self.recon_weight[..., None].to(x.dtype)).sum(2)

    def then(self, later: Merge) -> Merge:
        raise NotImplementedError("Expedite's soft reconstruction cannot be composed with a later merge stage")


def _local_weighted_mean(weight: Tensor, x: Tensor, candidates: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """Per cluster, the ``weight``-weighted mean of the tokens that have it among their candidates.

    weight: ``[B, N, K]`` on ``candidates`` ``[N, K]``; x: ``[B, N, C]``. Returns ``([B, M, C]`` means
    (0 where a cluster got no weight), ``[B, M, 1]`` summed weights``)``: one ``[B, N, M]`` matrix
    product (on a CPU much faster than scattering ``[B, N·K, C]`` rows).
    """
    batch, num_in, _ = weight.shape
    dense = weight.new_zeros(batch, num_in, num_out).scatter_add_(2, candidates.expand(batch, -1, -1), weight)
    mass = dense.sum(1)[..., None]
    return dense.transpose(1, 2) @ x / mass.clamp_min(torch.finfo(x.dtype).tiny), mass


def _token_spread(x: Tensor) -> Tensor:
    """``[B, 1, 1]``: the root mean squared distance of each image's tokens ``[B, N, C]`` to their mean."""
    spread = (x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()
    return spread.clamp_min(torch.finfo(x.dtype).eps)[:, None, None]


def _check_grid(grid: tuple[int, int], num_tokens: int) -> tuple[int, int]:
    height, width = (int(v) for v in grid)
    if height <= 0 or width <= 0 or height * width != num_tokens:
        raise ValueError(f"grid {tuple(grid)} does not match {num_tokens} tokens")
    return height, width


def cluster_grid(grid: tuple[int, int], keep: float) -> tuple[int, int]:
    """The ``(h, w)`` cluster grid keeping about ``keep`` of the ``H × W`` tokens, in the grid's aspect
    ratio: ``h = round(H·√keep)``, ``w = round(W·√keep)``, each in ``1..H`` / ``1..W``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    height, width = grid
    scale = math.sqrt(keep)
    return min(height, max(1, round(height * scale))), min(width, max(1, round(width * scale)))


def neighbour_cells(grid: tuple[int, int], cells: tuple[int, int], radius: int,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The clusters each token may join: the cells within ``radius`` (Chebyshev) of its own cell.

    A token's own cell is where nearest-neighbour upsampling of the ``cells = (h, w)`` grid puts it.
    Returns ``([N, K]`` long cell indices, ``[N, K]`` bool valid``)``, ``K = (2·radius + 1)²``; cells
    outside the grid are invalid (their index is clamped into range).
    """
    (height, width), (h, w) = grid, cells
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    rows = torch.arange(height, device=device) * h // height  # [H]
    cols = torch.arange(width, device=device) * w // width  # [W]
    offsets = torch.arange(-radius, radius + 1, device=device)
    cell_rows = (rows[:, None] + offsets)[:, None, :, None].expand(height, width, -1, offsets.numel())
    cell_cols = (cols[:, None] + offsets)[None, :, None, :].expand(height, width, offsets.numel(), -1)
    valid = (cell_rows >= 0) & (cell_rows < h) & (cell_cols >= 0) & (cell_cols < w)
    index = cell_rows.clamp(0, h - 1) * w + cell_cols.clamp(0, w - 1)
    return index.reshape(height * width, -1), valid.reshape(height * width, -1)


def local_kmeans(
    tokens: Tensor,
    grid: tuple[int, int],
    cells: tuple[int, int],
    *,
    iterations: int = 5,
    temperature: float = 0.02,
    radius: int = 1,
    k: int = 3,
    reconstruct_temperature: float | None = None,
    restore_in_encoder: bool = True,
) -> SoftClusterMerge:
    """Expedite's token clustering (and the weights of its token reconstruction).

    Args:
        tokens: ``[B, N, C]`` on ``grid = (H, W)``.
        cells: ``(h, w)`` the cluster grid, ``1 <= h <= H``, ``1 <= w <= W``; ``M = h·w`` clusters.
        iterations: k-means steps after the adaptive-average-pooling initialisation.
        temperature: τ of the assignment softmax of ``-||x - c||² / (τ·s²)`` (smaller = harder).
        radius: a token may join the clusters of the ``(2·radius + 1)²`` cells around its own cell.
        k: reconstruction: each token is rebuilt from its ``k`` most similar candidate clusters
            (at most ``K``), weights ``softmax(-||x - c||² / (τ_r·s²))`` of the clustering layer's tokens.
        reconstruct_temperature: τ of the reconstruction softmax (default: ``temperature``).
        restore_in_encoder: reconstruct at the encoder output (the paper); False: where the decoder unmerges.
    Returns:
        A :class:`SoftClusterMerge` with ``M`` real clusters per image. Memory: per step one ``[B, N, M]``
        matrix (token-centre products, as the official code's distance matrix; matrix products are the
        fastest way on a CPU); the assignment and the reconstruction keep ``[B, N, K]`` and ``[B, N, k]``.
        The official code labels tokens and picks reconstruction clusters among all ``M``; here both
        look at a token's candidate cells only.
    """
    batch, num_tokens, channels = tokens.shape
    height, width = _check_grid(grid, num_tokens)
    h, w = (int(v) for v in cells)
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"cluster grid {cells} must fit in the {height}×{width} patch grid")
    if iterations < 0 or temperature <= 0 or k < 1:
        raise ValueError("iterations must be >= 0, temperature > 0 and k >= 1")
    recon_tau = temperature if reconstruct_temperature is None else reconstruct_temperature
    if recon_tau <= 0:
        raise ValueError("reconstruct_temperature must be > 0")
    num_out = h * w
    x = tokens.float()
    x = (x - x.mean(1, keepdim=True)) / _token_spread(x)  # distances in units of the spread s
    candidates, valid = neighbour_cells((height, width), (h, w), radius, tokens.device)
    centres = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(batch, channels, height, width), (h, w))
    centres = centres.flatten(2).transpose(1, 2)  # [B, M, C]

    squared_norm = x.pow(2).sum(-1)[..., None]  # [B, N, 1]
    index = candidates.expand(batch, -1, -1)

    def local_logits(centres: Tensor) -> Tensor:
        """``[B, N, K]`` ``-||x - c||²`` to each candidate centre (-inf off the grid)."""
        dot = (x @ centres.transpose(1, 2)).gather(2, index)
        distance = (squared_norm + centres.pow(2).sum(-1)[:, candidates] - 2.0 * dot).clamp_min(0.0)
        return (-distance).masked_fill(~valid, float("-inf"))

    for _ in range(iterations):
        affinity = (local_logits(centres) / temperature).softmax(-1)
        means, mass = _local_weighted_mean(affinity, x, candidates, num_out)
        centres = torch.where(mass > 0, means, centres)
    logits = local_logits(centres)
    affinity = (logits / temperature).softmax(-1)
    groups = index.gather(2, affinity.argmax(-1, keepdim=True))[..., 0]
    top, nearest = logits.topk(min(k, candidates.shape[1]), dim=-1)
    counts = torch.full((batch,), num_out, dtype=torch.long, device=tokens.device)
    return SoftClusterMerge(
        groups, counts, num_out, restore_in_encoder=restore_in_encoder, candidates=candidates, affinity=affinity,
        recon_index=index.gather(2, nearest), recon_weight=(top / recon_tau).softmax(-1),
    )


@functools.lru_cache(maxsize=2)  # the grids in use (a 64×128 grid holds 256 MiB)
def _grid_distance(grid: tuple[int, int], device: torch.device | str | None) -> Tensor:
    """``[N, N]`` Euclidean distance of patch positions, in units of the grid's diagonal (cached per grid and
    device: read only)."""
    height, width = grid
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    position = torch.stack([rows.flatten(), cols.flatten()], -1).float()
    return torch.cdist(position, position) / math.hypot(height, width)


def density_peaks_clusters(
    tokens: Tensor,
    grid: tuple[int, int],
    num_clusters: int,
    *,
    k: int = 5,
    spatial_weight: float = 1.0,
    restore_in_encoder: bool = True,
) -> ClusterMerge:
    """AiluRus's spatial-aware density-peaks clustering (DPC-kNN).

    Distance: ``d_ij = ||x_i - x_j|| / s + spatial_weight · ||p_i - p_j|| / diagonal`` for tokens ``x``
    (``s`` their spread, see the module docstring) and grid positions ``p``. Density ``ρ_i = exp(-mean of d² over the
    k nearest neighbours)``; ``δ_i`` = distance to the nearest denser token (ties broken by raster
    order; the densest token gets the largest distance of its image); the ``num_clusters`` tokens with
    the largest ``ρ·δ`` are centres and every token joins its nearest centre. Clusters are numbered in
    the raster order of their centres.

    Args:
        tokens: ``[B, N, C]`` on ``grid = (H, W)``.
        num_clusters: ``M``, clipped to ``1..N``.
        k: neighbours for the density (clipped to ``N - 1``).
    Memory: dense ``[B, N, N]`` distances per image (fine at ViT token counts; 8192 tokens take
    256 MiB per image in fp32).
    """
    batch, num_tokens, _ = tokens.shape
    height, width = _check_grid(grid, num_tokens)
    if k < 1 or spatial_weight < 0:
        raise ValueError("k must be >= 1 and spatial_weight >= 0")
    num_clusters = min(max(int(num_clusters), 1), num_tokens)
    x = tokens.float()
    x = x / _token_spread(x)
    squared_norm = x.pow(2).sum(-1)
    # One matrix product (so FLOP counts see it), clamped against rounding below 0.
    distance = (squared_norm[:, :, None] + squared_norm[:, None, :] - 2.0 * x @ x.transpose(1, 2)).clamp_min(0.0).sqrt()
    if spatial_weight > 0:
        distance = distance + spatial_weight * _grid_distance((height, width), tokens.device)
    neighbours = min(k, num_tokens - 1)
    if neighbours > 0:
        nearest = distance.topk(neighbours + 1, dim=-1, largest=False).values[..., 1:]  # self excluded
        density = (-nearest.pow(2).mean(-1)).exp()  # [B, N]
    else:
        density = torch.ones(batch, num_tokens, device=tokens.device)
    # rank by density, ties in raster order (a stable sort): j is denser than i when rank_j < rank_i
    rank = density.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)  # [B, N]
    farthest = distance.amax(dim=(1, 2))[:, None, None]
    delta = torch.where(rank[:, None, :] < rank[:, :, None], distance, farthest).amin(-1)  # [B, N]
    centres = (density * delta).topk(num_clusters, dim=-1).indices.sort(-1).values  # [B, M]
    to_centre = distance.gather(2, centres[:, None, :].expand(-1, num_tokens, -1))  # [B, N, M]
    groups = to_centre.argmin(-1)
    groups.scatter_(1, centres, torch.arange(num_clusters, device=tokens.device).expand(batch, -1))
    counts = torch.full((batch,), num_clusters, dtype=torch.long, device=tokens.device)
    return ClusterMerge(groups, counts, num_clusters, restore_in_encoder=restore_in_encoder)


def expedite_planner(
    tokens: Tensor,
    grid: tuple[int, int],
    size: Tensor | None = None,
    *,
    keep: float,
    cells: tuple[int, int] | None = None,
    **options: float | int | bool,
) -> SoftClusterMerge:
    """A ``"cluster"`` stage planner (see :class:`~algm_viz.patch.MergeStage`): :func:`local_kmeans`
    onto ``cells``, or else onto the :func:`cluster_grid` that keeps ``keep`` of the tokens.
    ``size`` is unused: clustering runs on the full patch grid."""
    return local_kmeans(tokens, grid, cells or cluster_grid(grid, keep), **options)


def ailurus_planner(
    tokens: Tensor,
    grid: tuple[int, int],
    size: Tensor | None = None,
    *,
    keep: float,
    **options: float | int | bool,
) -> ClusterMerge:
    """A ``"cluster"`` stage planner: :func:`density_peaks_clusters` into ``round(keep · N)`` clusters."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return density_peaks_clusters(tokens, grid, round(keep * tokens.shape[1]), **options)
