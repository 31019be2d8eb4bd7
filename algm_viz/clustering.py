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
component all tokens share. Where the full token set comes back is the merge's ``restore_in_encoder``: True
restores it at the encoder output, before any decoder; False restores it where the model unmerges, after a
transformer decoder (which then runs on the clusters) or before a dense one. :func:`local_kmeans` defaults to
False, as the official Expedite Segmenter code (its mask transformer decodes the clusters, and the token
reconstruction rebuilds every patch's mask logits); :func:`density_peaks_clusters` to True.
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
    "CellTiles",
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


def _runs(cell_of: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Patch rows (or columns) by the run of cells they fall in: ``cell_of`` ``[L]`` non-decreasing in ``0..count-1``
    (every run non-empty). Returns (``[count]`` first index of each run, ``[count, R]`` its indices, the last one
    repeated to pad to the longest run ``R``)."""
    length = torch.bincount(cell_of, minlength=count)
    first = torch.cumsum(length, 0) - length
    steps = torch.arange(int(length.max()), device=cell_of.device)
    return first, first[:, None] + torch.minimum(steps, length[:, None] - 1)


@dataclass(frozen=True)
class CellTiles:
    """The token-centre pairs of a local k-means, by tiles of cells, so that each tile is one small dense product.

    Tiles are ``1 × q`` blocks of cells (one cell row, ``q`` cell columns). A token whose cell lies in cell row ``r``
    and cell column ``c`` has its candidates in cell rows ``r - radius .. r + radius`` and columns
    ``c - radius .. c + radius``: tile ``(r, j)`` pairs the tokens of its cells (``T`` slots: their patch rows ×
    patch columns, the last row and column repeated to pad) with the centres of the cells around the tile
    (``S = (2·radius + 1)·min(q + 2·radius, w)`` slots, rows off the grid clamped, columns shifted into the grid;
    pairs off the grid are invalid candidates).
    Work per step ``O(N·S·C)`` instead of ``O(N·M·C)`` for all token-centre pairs.

    Attributes (``G = h · ⌈w / q⌉`` tiles):
        tokens: ``[G, T]`` long, the token in each token slot.
        centres: ``[G, S]`` long, the cluster in each centre slot.
        pairs: ``[N, K]`` long, where each token's ``K`` candidates (in :func:`neighbour_cells`' order) sit in the
            flattened ``[G, T, S]`` tile products.
    """

    tokens: Tensor
    centres: Tensor
    pairs: Tensor

    @classmethod
    def build(cls, grid: tuple[int, int], cells: tuple[int, int], radius: int,
              device: torch.device | str | None = None, block: int = 4) -> "CellTiles":
        """The tiles of ``block`` cells (``block >= w``: whole cell rows) of a ``grid = (H, W)`` patch grid clustered
        onto ``cells = (h, w)`` (``h <= H``, ``w <= W``)."""
        (height, width), (h, w) = grid, cells
        block = max(1, min(int(block), w))
        blocks = -(-w // block)
        rows, columns = torch.arange(height, device=device), torch.arange(width, device=device)
        cell_row, cell_col = rows * h // height, columns * w // width  # as in neighbour_cells
        first_row, slot_rows = _runs(cell_row, h)  # [h], [h, R]
        first_col, slot_cols = _runs(cell_col // block, blocks)  # [J], [J, Q]
        tokens = slot_rows[:, None, :, None] * width + slot_cols[None, :, None, :]  # [h, J, R, Q]
        offsets = torch.arange(-radius, radius + 1, device=device)
        centre_rows = (torch.arange(h, device=device)[:, None] + offsets).clamp(0, h - 1)  # [h, 2r + 1]
        span = min(block + 2 * radius, w)  # the centre columns a tile meets, kept inside the grid
        start = (torch.arange(blocks, device=device) * block - radius).clamp(0, w - span)  # [J]
        centre_cols = start[:, None] + torch.arange(span, device=device)  # [J, S']
        centres = centre_rows[:, None, :, None] * w + centre_cols[None, :, None, :]  # [h, J, 2r + 1, S']
        block_of = cell_col // block
        tile = cell_row[:, None] * blocks + block_of[None, :]  # [H, W]
        token_slot = (rows - first_row[cell_row])[:, None] * slot_cols.shape[1] + (columns - first_col[block_of])
        centre_col = (cell_col - start[block_of])[:, None, None] + offsets  # off the grid: clamped, an invalid pair
        centre_slot = (offsets[:, None] + radius) * span + centre_col.clamp(0, span - 1)  # [W, dr, dc]
        num_tokens, num_centres = slot_rows.shape[1] * slot_cols.shape[1], span * offsets.numel()
        pairs = (tile * num_tokens + token_slot)[..., None, None] * num_centres + centre_slot
        return cls(tokens.reshape(h * blocks, -1), centres.reshape(h * blocks, -1), pairs.reshape(height * width, -1))

    def token_slots(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, G, T, C]`` the tokens in their tile slots."""
        return x[:, self.tokens]

    def dot(self, x_slots: Tensor, centres: Tensor) -> Tensor:
        """``[B, N, K]`` products of each token with its candidate centres (``x_slots`` from :meth:`token_slots`,
        ``centres`` ``[B, M, C]``)."""
        products = x_slots @ centres[:, self.centres].transpose(-1, -2)  # [B, G, T, S]
        return products.flatten(1)[:, self.pairs]

    def weighted_mean(self, weight: Tensor, x_slots: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
        """Per cluster, the ``weight``-weighted mean of the tokens that have it among their candidates.

        weight: ``[B, N, K]`` on the candidates; x_slots: ``[B, G, T, C]``. Returns (``[B, M, C]`` means, 0 where a
        cluster got no weight; ``[B, M, 1]`` summed weights)."""
        batch, (tiles, token_slots), centre_slots = weight.shape[0], self.tokens.shape, self.centres.shape[1]
        tiled = weight.new_zeros(batch, tiles * token_slots * centre_slots)
        tiled.scatter_add_(1, self.pairs.reshape(1, -1).expand(batch, -1), weight.reshape(batch, -1))
        tiled = tiled.view(batch, tiles, token_slots, centre_slots)
        clusters = self.centres.reshape(-1)
        sums = x_slots.new_zeros(batch, num_out, x_slots.shape[-1])
        sums.index_add_(1, clusters, (tiled.transpose(-1, -2) @ x_slots).flatten(1, 2))
        mass = weight.new_zeros(batch, num_out).index_add_(1, clusters, tiled.sum(2).flatten(1))[..., None]
        return sums / mass.clamp_min(torch.finfo(sums.dtype).tiny), mass


@dataclass(frozen=True)
class SoftClusterMerge(ClusterMerge):
    """Expedite's soft clustering and token reconstruction.

    Attributes (besides :class:`~algm_viz.merging.Merge`'s; ``groups`` is each token's most likely
    cluster, for the record and the merge maps):
        candidates: ``[N, K]`` long, the clusters a token may join (its neighbouring cells; an index
            off the grid is clamped and has affinity 0).
        tiles: the :class:`CellTiles` of those candidates.
        affinity: ``[B, N, K]`` soft assignment of each token to its candidates (rows sum to 1): the last k-means
            step's, so that merging the clustered tokens gives the final centres (the official code's cluster tokens).
        recon_index: ``[B, N, k]`` long, the ``k`` clusters each token is rebuilt from.
        recon_weight: ``[B, N, k]`` their weights (rows sum to 1).
    """

    candidates: Tensor | None = None
    tiles: CellTiles | None = None
    affinity: Tensor | None = None
    recon_index: Tensor | None = None
    recon_weight: Tensor | None = None

    def merge(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[B, N, C]`` -> (``[B, M, C]`` affinity-weighted means, ``[B, M, 1]`` summed affinity × size)."""
        weight = self.affinity if size is None else self.affinity * size.to(self.affinity.dtype)
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        x_slots = self.tiles.token_slots(x.to(acc_dtype))
        means, sizes = self.tiles.weighted_mean(weight.to(acc_dtype), x_slots, self.num_out)
        return means.to(x.dtype), sizes.to(x.dtype if size is None else size.dtype)

    def unmerge(self, x: Tensor) -> Tensor:
        """``[B, M, C]`` cluster outputs -> ``[B, N, C]``: token reconstruction (one gather, O(N·k·C))."""
        batch, num_in, k = self.recon_index.shape
        index = self.recon_index.reshape(batch, num_in * k, 1).expand(-1, -1, x.shape[-1])
        picked = x.gather(1, index).reshape(batch, num_in, k, x.shape[-1])
        return (picked * self.recon_weight[..., None].to(x.dtype)).sum(2)

    def then(self, later: Merge) -> Merge:
        raise NotImplementedError("Expedite's soft reconstruction cannot be composed with a later merge stage")


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


@functools.lru_cache(maxsize=8)  # the grids in use; read only
def _cell_layout(grid: tuple[int, int], cells: tuple[int, int], radius: int,
                 device: torch.device) -> tuple[Tensor, Tensor, CellTiles]:
    """:func:`neighbour_cells` and the :class:`CellTiles` of a grid, built once per grid, cluster grid and radius."""
    return (*neighbour_cells(grid, cells, radius, device), CellTiles.build(grid, cells, radius, device))


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
    restore_in_encoder: bool = False,
) -> SoftClusterMerge:
    """Expedite's token clustering (and the weights of its token reconstruction).

    Args:
        tokens: ``[B, N, C]`` on ``grid = (H, W)``.
        cells: ``(h, w)`` the cluster grid, ``1 <= h <= H``, ``1 <= w <= W``; ``M = h·w`` clusters.
        iterations: k-means steps after the adaptive-average-pooling initialisation. As in the official code, the
            cluster tokens are the centres after the last step (``merge`` of the clustered tokens: the weighted means
            under the last step's assignment), and a token's group and reconstruction clusters are its nearest final
            centres.
        temperature: τ of the assignment softmax of ``-||x - c||² / (τ·s²)`` (smaller = harder).
        radius: a token may join the clusters of the ``(2·radius + 1)²`` cells around its own cell.
        k: reconstruction: each token is rebuilt from its ``k`` most similar candidate clusters
            (at most ``K``), weights ``softmax(-||x - c||² / (τ_r·s²))`` of the clustering layer's tokens.
        reconstruct_temperature: τ of the reconstruction softmax (default: ``temperature``).
        restore_in_encoder: False (the official Expedite Segmenter code): reconstruct where the model unmerges, so
            a transformer decoder runs on the clusters and its per-token outputs are reconstructed; True: at the
            encoder output, before any decoder.
    Returns:
        A :class:`SoftClusterMerge` with ``M`` real clusters per image. Each step computes the token-centre
        products tile by tile (:class:`CellTiles`: ``[B, G, T, S]``, about ``N·S`` pairs, where the
        official code's distance matrix holds all ``N·M``); the assignment and the reconstruction keep
        ``[B, N, K]`` and ``[B, N, k]``.
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
    candidates, valid, tiles = _cell_layout((height, width), (h, w), radius, tokens.device)
    # pooled channels-last: the token layout itself, and on a CPU ~15x faster than pooling C planes
    centres = F.adaptive_avg_pool2d(x.view(batch, height, width, channels).permute(0, 3, 1, 2), (h, w))
    centres = centres.permute(0, 2, 3, 1).reshape(batch, num_out, channels)  # [B, M, C]

    squared_norm = x.pow(2).sum(-1)[..., None]  # [B, N, 1]
    x_slots = tiles.token_slots(x)

    def local_logits(centres: Tensor) -> Tensor:
        """``[B, N, K]`` ``-||x - c||²`` to each candidate centre (-inf off the grid)."""
        distance = (squared_norm + centres.pow(2).sum(-1)[:, candidates] - 2.0 * tiles.dot(x_slots, centres)).clamp_min(0.0)
        return (-distance).masked_fill(~valid, float("-inf"))

    logits = local_logits(centres)
    affinity = (logits / temperature).softmax(-1)  # the assignment each step's centres are the means of
    for step in range(iterations):
        means, mass = tiles.weighted_mean(affinity, x_slots, num_out)
        centres = torch.where(mass > 0, means, centres)
        logits = local_logits(centres)
        if step < iterations - 1:  # the last step's assignment stays: merging with it gives the final centres
            affinity = (logits / temperature).softmax(-1)
    index = candidates.expand(batch, -1, -1)
    groups = index.gather(2, logits.argmax(-1, keepdim=True))[..., 0]  # the nearest final centre
    top, nearest = logits.topk(min(k, candidates.shape[1]), dim=-1)
    counts = torch.full((batch,), num_out, dtype=torch.long, device=tokens.device)
    return SoftClusterMerge(
        groups, counts, num_out, restore_in_encoder=restore_in_encoder, candidates=candidates, tiles=tiles,
        affinity=affinity, recon_index=index.gather(2, nearest), recon_weight=(top / recon_tau).softmax(-1),
    )


@functools.lru_cache(maxsize=2)  # the grids in use (a 64×128 grid holds 256 MiB)
def _grid_distance(grid: tuple[int, int], device: torch.device | str | None) -> Tensor:
    """``[N, N]`` Euclidean distance of patch positions, in units of the grid's diagonal (cached per grid and
    device: read only)."""
    height, width = grid
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    position = torch.stack([rows.flatten(), cols.flatten()], -1).float()
    return torch.cdist(position, position) / math.hypot(height, width)


@torch.no_grad()  # a hard assignment: nothing to differentiate, and the distances are updated in place
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
    # One matrix product (so FLOP counts see it), then in place (each [B, N, N] pass allocates nothing),
    # clamped against rounding below 0.
    distance = x @ x.transpose(1, 2)
    distance.mul_(-2.0).add_(squared_norm[:, :, None]).add_(squared_norm[:, None, :]).clamp_min_(0.0).sqrt_()
    if spatial_weight > 0:
        distance.add_(_grid_distance((height, width), tokens.device), alpha=spatial_weight)
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
