"""Expedite's local k-means + reconstruction and AiluRus's density-peaks clustering (algm_viz.clustering)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from algm_viz import algm_state, remove_algm
from algm_viz.clustering import (
    CellTiles,
    ClusterMerge,
    SoftClusterMerge,
    cluster_grid,
    density_peaks_clusters,
    local_kmeans,
    neighbour_cells,
)
from algm_viz.evaluation.compare import merge_maps
from algm_viz.flops import count_gflops
from algm_viz.methods import METHODS, apply_method
from algm_viz.patch import ClusterStage

from test_patch import smooth_images, tiny_segmenter


def two_regions(grid: tuple[int, int], boundary: int, channels: int = 8, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """``[1, H*W, C]``: columns left of ``boundary`` are one flat vector, the rest another (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(2, channels, generator=g) * 3
    height, width = grid
    columns = torch.arange(width).expand(height, width).flatten()
    tokens = torch.where((columns < boundary)[:, None], left, right)
    return (tokens + noise * torch.randn(tokens.shape, generator=g))[None]


def region_of(grid: tuple[int, int], boundary: int) -> np.ndarray:
    return (np.arange(grid[1])[None].repeat(grid[0], 0).flatten() >= boundary).astype(int)


def assert_groups_follow(groups: torch.Tensor, regions: np.ndarray) -> None:
    """Every group holds patches of one region only."""
    groups = groups.numpy()
    for group in np.unique(groups):
        assert len(set(regions[groups == group])) == 1, f"group {group} mixes regions"


def test_cluster_grid_follows_the_aspect_ratio():
    assert cluster_grid((30, 23), 0.25) == (15, 12)
    assert cluster_grid((5, 7), 1.0) == (5, 7)
    assert cluster_grid((3, 40), 0.01) == (1, 4)
    with pytest.raises(ValueError, match="keep"):
        cluster_grid((4, 4), 0.0)


def test_neighbour_cells_on_a_non_square_grid():
    index, valid = neighbour_cells((4, 6), (2, 3), radius=1)
    assert index.shape == valid.shape == (24, 9)
    # Patch (0, 0) sits in cell (0, 0): its valid neighbours are cells (0,0), (0,1), (1,0), (1,1).
    assert sorted(index[0][valid[0]].tolist()) == [0, 1, 3, 4]
    # Patch (3, 3) sits in cell (1, 1): cells (0..1, 0..2) are all within one step.
    assert sorted(index[3 * 6 + 3][valid[3 * 6 + 3]].tolist()) == [0, 1, 2, 3, 4, 5]
    only_own, own_valid = neighbour_cells((4, 6), (2, 3), radius=0)
    assert own_valid.all() and only_own[:, 0].view(4, 6).tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2


@pytest.mark.parametrize("boundary", [3, 4, 5])
def test_expedite_clusters_follow_two_flat_regions(boundary):
    grid = (6, 8)
    merge = local_kmeans(two_regions(grid, boundary), grid, (3, 4))
    assert isinstance(merge, SoftClusterMerge) and merge.counts.tolist() == [12]
    assert_groups_follow(merge.groups[0], region_of(grid, boundary))


@pytest.mark.parametrize("spatial_weight", [0.0, 1.0])
def test_ailurus_clusters_follow_two_flat_regions(spatial_weight):
    grid = (5, 9)
    tokens = two_regions(grid, 4)
    merge = density_peaks_clusters(tokens, grid, 2, spatial_weight=spatial_weight)
    assert isinstance(merge, ClusterMerge) and merge.counts.tolist() == [2]
    assert sorted(np.unique(merge.groups[0].numpy()).tolist()) == [0, 1]
    assert_groups_follow(merge.groups[0], region_of(grid, 4))
    # With more clusters than regions, no cluster straddles the boundary either.
    assert_groups_follow(density_peaks_clusters(tokens, grid, 6, spatial_weight=spatial_weight).groups[0], region_of(grid, 4))


def reference_density_peaks(tokens: np.ndarray, grid: tuple[int, int], clusters: int, k: int, spatial_weight: float) -> list[int]:
    """One image ``[N, C]``, written from the definition with Python loops: each token's cluster."""
    n = tokens.shape[0]
    spread = math.sqrt(((tokens - tokens.mean(0)) ** 2).sum(1).mean())
    positions = [(i // grid[1], i % grid[1]) for i in range(n)]
    diagonal = math.hypot(*grid)

    def distance(i: int, j: int) -> float:
        spatial = math.dist(positions[i], positions[j]) / diagonal
        return float(np.linalg.norm(tokens[i] - tokens[j])) / spread + spatial_weight * spatial

    density = [math.exp(-np.mean([d * d for d in sorted(distance(i, j) for j in range(n) if j != i)[:k]])) for i in range(n)]
    farthest = max(distance(i, j) for i in range(n) for j in range(n))
    delta = []
    for i in range(n):
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min((distance(i, j) for j in denser), default=farthest))
    centres = sorted(sorted(range(n), key=lambda i: -density[i] * delta[i])[:clusters])
    labels = [min(range(clusters), key=lambda c: distance(i, centres[c])) for i in range(n)]
    for c, centre in enumerate(centres):
        labels[centre] = c
    return labels


@pytest.mark.parametrize("spatial_weight", [0.0, 0.7])
def test_density_peaks_matches_a_reference(spatial_weight):
    grid = (4, 5)
    tokens = torch.randn(2, 20, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    merge = density_peaks_clusters(tokens, grid, 5, k=3, spatial_weight=spatial_weight)
    for b in range(2):
        assert merge.groups[b].tolist() == reference_density_peaks(tokens[b].numpy(), grid, 5, 3, spatial_weight)


def piecewise_constant(grid: tuple[int, int], cells: tuple[int, int], channels: int = 16, batch: int = 2) -> torch.Tensor:
    """``[B, H*W, C]``: every patch carries its cell's own random vector (cells of the cluster grid)."""
    index, _ = neighbour_cells(grid, cells, radius=0)
    values = torch.randn(batch, cells[0] * cells[1], channels, generator=torch.Generator().manual_seed(5)) * 4
    return values[:, index[:, 0]]


@pytest.mark.parametrize("k", [1, 3])
def test_reconstruction_of_tokens_equal_to_their_centres_is_exact(k):
    grid, cells = (6, 10), (3, 5)
    tokens = piecewise_constant(grid, cells)
    merge = local_kmeans(tokens, grid, cells, k=k)
    clusters, sizes = merge.merge(tokens)
    assert clusters.shape == (2, 15, 16) and torch.allclose(sizes.sum(1), torch.full((2, 1), 60.0))
    torch.testing.assert_close(merge.unmerge(clusters), tokens, atol=1e-5, rtol=0)
    # The hard groups are the cells.
    assert (merge.groups == neighbour_cells(grid, cells, 0)[0][:, 0]).all()


@pytest.mark.parametrize("block", [1, 2, 3, 4, 50])
@pytest.mark.parametrize("grid, cells, radius", [((7, 11), (4, 6), 1), ((9, 5), (3, 5), 2), ((6, 13), (6, 13), 1), ((5, 8), (2, 3), 0)])
def test_cell_tiles_give_every_candidate_pair_and_the_weighted_means(grid, cells, radius, block):
    tiles = CellTiles.build(grid, cells, radius, block=block)
    candidates, valid = neighbour_cells(grid, cells, radius)
    g = torch.Generator().manual_seed(block)
    x = torch.randn(2, grid[0] * grid[1], 5, generator=g, dtype=torch.float64)
    centres = torch.randn(2, cells[0] * cells[1], 5, generator=g, dtype=torch.float64)
    slots = tiles.token_slots(x)
    expected = torch.einsum("bnc,bnkc->bnk", x, centres[:, candidates])
    torch.testing.assert_close(tiles.dot(slots, centres)[:, valid], expected[:, valid])
    weight = torch.rand(2, *candidates.shape, generator=g, dtype=torch.float64) * valid
    dense = torch.zeros(2, x.shape[1], centres.shape[1], dtype=torch.float64)
    dense.scatter_add_(2, candidates.expand(2, -1, -1), weight)
    means, mass = tiles.weighted_mean(weight, slots, centres.shape[1])
    torch.testing.assert_close(mass[..., 0], dense.sum(1))
    torch.testing.assert_close(means, dense.transpose(1, 2) @ x / dense.sum(1)[..., None])


def reference_local_kmeans(tokens: torch.Tensor, grid: tuple[int, int], cells: tuple[int, int], radius: int,
                           iterations: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One image ``[N, C]`` (float64), written from the definition with Python loops, as the official code steps:
    (the ``[N, M]`` soft assignment of the last step, 0 outside a token's candidate cells; ``[N]`` each token's
    nearest final centre among its candidates)."""
    (height, width), (h, w) = grid, cells
    x = tokens - tokens.mean(0)
    x = x / x.pow(2).sum(1).mean().sqrt()
    centres = torch.nn.functional.adaptive_avg_pool2d(x.T.reshape(1, -1, height, width), cells)[0].flatten(1).T.clone()
    near = [[(r * h // height + dr) * w + c * w // width + dc for dr in range(-radius, radius + 1)
             for dc in range(-radius, radius + 1)
             if 0 <= r * h // height + dr < h and 0 <= c * w // width + dc < w]
            for r in range(height) for c in range(width)]

    def assignment() -> torch.Tensor:
        soft = torch.zeros(len(near), h * w, dtype=x.dtype)
        for n, candidates in enumerate(near):
            distance = torch.stack([(x[n] - centres[m]).pow(2).sum() for m in candidates])
            soft[n, candidates] = (-distance / temperature).softmax(0)
        return soft

    for _ in range(iterations):
        soft = assignment()
        for m in range(h * w):
            if soft[:, m].sum() > 0:
                centres[m] = (soft[:, m, None] * x).sum(0) / soft[:, m].sum()
    nearest = torch.tensor([min(candidates, key=lambda m: float((x[n] - centres[m]).pow(2).sum()))
                            for n, candidates in enumerate(near)])
    return soft, nearest


@pytest.mark.parametrize("grid, cells, radius", [((5, 7), (3, 4), 1), ((6, 4), (2, 3), 2), ((4, 9), (4, 2), 0), ((3, 5), (3, 5), 1)])
def test_local_kmeans_matches_a_reference(grid, cells, radius):
    tokens = torch.randn(2, grid[0] * grid[1], 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    merge = local_kmeans(tokens, grid, cells, radius=radius, iterations=3, temperature=0.5)
    means, mass = merge.merge(tokens.float())
    for b in range(2):
        dense = torch.zeros(grid[0] * grid[1], cells[0] * cells[1], dtype=torch.float64)
        dense.scatter_add_(1, merge.candidates, merge.affinity[b].double())
        expected, nearest = reference_local_kmeans(tokens[b], grid, cells, radius, iterations=3, temperature=0.5)
        torch.testing.assert_close(dense, expected, atol=1e-5, rtol=0)
        assert (merge.groups[b] == nearest).all()
        # merging takes the last step's weighted means of the tokens: the final centres
        torch.testing.assert_close(means[b].double(), dense.T @ tokens[b] / dense.sum(0)[:, None], atol=1e-5, rtol=0)
        torch.testing.assert_close(mass[b, :, 0].double(), dense.sum(0), atol=1e-5, rtol=0)


def test_hard_clusters_unfold_every_patch_to_its_cluster():
    grid = (5, 7)
    tokens = torch.randn(3, 35, 4)
    merge = density_peaks_clusters(tokens, grid, 9)
    means, sizes = merge.merge(tokens)
    unfolded = merge.unmerge(means)
    assert means.shape == (3, 9, 4) and unfolded.shape == (3, 35, 4)
    for b in range(3):
        for c in range(9):
            members = merge.groups[b] == c
            torch.testing.assert_close(unfolded[b, members], tokens[b, members].mean(0).expand(int(members.sum()), 4))
            assert int(sizes[b, c]) == int(members.sum())


@pytest.mark.parametrize("grid, keep", [((5, 7), 0.3), ((3, 11), 0.5), ((8, 2), 0.25)])
def test_shapes_on_non_square_grids_and_batches_equal_single_images(grid, keep):
    n = grid[0] * grid[1]
    tokens = torch.randn(3, n, 12, generator=torch.Generator().manual_seed(n))
    cells = cluster_grid(grid, keep)
    soft = local_kmeans(tokens, grid, cells)
    hard = density_peaks_clusters(tokens, grid, round(keep * n))
    m = cells[0] * cells[1]
    assert soft.groups.shape == (3, n) and int(soft.groups.max()) < m and soft.num_out == m
    torch.testing.assert_close(soft.affinity.sum(-1), torch.ones(3, n))
    torch.testing.assert_close(soft.recon_weight.sum(-1), torch.ones(3, n))
    assert soft.merge(tokens)[0].shape == (3, m, 12) and soft.unmerge(torch.randn(3, m, 5)).shape == (3, n, 5)
    assert hard.counts.tolist() == [round(keep * n)] * 3
    for b in range(3):  # every image clusters as it would alone
        alone = local_kmeans(tokens[b : b + 1], grid, cells)
        torch.testing.assert_close(alone.recon_weight[0], soft.recon_weight[b])
        assert (alone.groups[0] == soft.groups[b]).all()
        assert (density_peaks_clusters(tokens[b : b + 1], grid, round(keep * n)).groups[0] == hard.groups[b]).all()


def test_bad_arguments_are_rejected():
    tokens = torch.randn(1, 12, 4)
    with pytest.raises(ValueError, match="does not match"):
        local_kmeans(tokens, (3, 5), (2, 2))
    with pytest.raises(ValueError, match="must fit"):
        local_kmeans(tokens, (3, 4), (4, 4))
    with pytest.raises(ValueError, match="temperature"):
        local_kmeans(tokens, (3, 4), (2, 2), temperature=0)
    with pytest.raises(ValueError, match="spatial_weight"):
        density_peaks_clusters(tokens, (3, 4), 2, spatial_weight=-1)
    with pytest.raises(NotImplementedError, match="reconstruction"):
        local_kmeans(tokens, (3, 4), (2, 2)).then(ClusterMerge.identity(1, 4))
    with pytest.raises(ValueError, match="planner"):
        ClusterStage(1, planner=None)


@pytest.mark.parametrize("name, in_encoder", [("expedite", False), ("ailurus", True), ("ailurus_prop", False)])
def test_methods_run_in_a_segmenter_reduce_gflops_and_restore_where_they_should(name, in_encoder):
    model = tiny_segmenter()
    images = torch.cat([smooth_images(1, 70, 100, seed=2), torch.randn(1, 3, 70, 100)])
    seen = []
    with torch.no_grad():
        baseline_gflops = count_gflops(model, images)
        model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
        apply_method(model, name, 0.3, layer=2)
        out = model(images)
        gflops = count_gflops(model, images)
    record = algm_state(model).record
    assert out.shape == (2, 4, 70, 100) and torch.isfinite(out).all()
    assert record.restored == in_encoder and record.stages[0][1] == 2
    clusters = 3 * 4 if name == "expedite" else round(0.3 * 35)  # Expedite: a 3×4 grid of 5×7 patches
    assert record.token_counts()[record.stages[0][0]].tolist() == [clusters] * 2
    # the decoder sees the full 5×7 grid, or the clusters (the FLOP count ran a second forward)
    assert seen == [35 if in_encoder else clusters] * 2
    assert gflops < 0.8 * baseline_gflops
    remove_algm(model)


@pytest.mark.parametrize("name", ["expedite", "ailurus", "ailurus_prop"])
def test_where_the_tokens_are_restored_is_an_option(name):
    model = tiny_segmenter()
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    default_in_encoder = name == "ailurus"
    with torch.no_grad():
        apply_method(model, name, 0.5, restore_in_encoder=not default_in_encoder)
        out = model(smooth_images(1, 64, 96))
    assert out.shape == (1, 4, 64, 96) and torch.isfinite(out).all()
    assert algm_state(model).record.restored != default_in_encoder
    assert (seen[0] == 24) != default_in_encoder  # 24 patches on the 4×6 grid, fewer clusters


def test_proportional_attention_makes_decoding_the_clusters_equal_to_unfolding_before_the_decoder():
    """A hard cluster unfolded is the same token at every patch it holds: attention over those copies equals
    attention over the cluster with a log-size key bias, so AiluRus-prop's cheaper placement changes nothing."""
    model = tiny_segmenter()
    images = torch.cat([smooth_images(1, 64, 96, seed=3), torch.randn(1, 3, 64, 96)])
    with torch.no_grad():
        apply_method(model, "ailurus_prop", 0.4, restore_in_encoder=True)
        unfolded = model(images)
        apply_method(model, "ailurus_prop", 0.4)
        decoded_as_clusters = model(images)
        assert not algm_state(model).record.restored
        apply_method(model, "ailurus", 0.4, restore_in_encoder=False)  # without the bias it is another function
        unbiased = model(images)
    torch.testing.assert_close(decoded_as_clusters, unfolded, atol=1e-5, rtol=1e-5)
    assert (unbiased - unfolded).abs().max() > 1e-3


def test_expedite_reconstructs_the_decoders_outputs_on_the_clusters():
    model = tiny_segmenter()
    image = smooth_images(1, 64, 96, seed=5)
    with torch.no_grad():
        apply_method(model, "expedite", 0.4)
        logits = model.decoder_logits(image)
        state = algm_state(model)
        merge = state.record.final
        encoded = model.encoder.forward_features(image)[:, model.encoder.num_prefix_tokens :]
        expected = merge.unmerge(model.decoder(encoded, None, grid=(4, 6)))  # [1, 24, K] from the clusters
    assert encoded.shape[1] == merge.num_out < 24
    torch.testing.assert_close(logits, expected.transpose(1, 2).reshape(1, -1, 4, 6))


def test_keeping_every_token_equals_the_baseline():
    model = tiny_segmenter()
    images = smooth_images(2, 64, 96, seed=4)
    with torch.no_grad():
        expected = model(images)
        apply_method(model, "ailurus", 1.0)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)
        apply_method(model, "expedite", 1.0, temperature=1e-4, k=1)
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)


def test_methods_are_registered_and_their_merge_maps_render():
    assert METHODS["expedite"].knob == METHODS["ailurus"].knob == METHODS["ailurus_prop"].knob == "keep"
    assert METHODS["ailurus_prop"].prop_attn and not METHODS["ailurus"].prop_attn
    model = tiny_segmenter()
    model.info = dataclasses.replace(model.info, short_side=64)
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    image[:, 48:] = (20, 200, 40)  # a flat right half: clusters there merge several patches
    maps = merge_maps(model, image, [("expedite", 0.25), ("ailurus", 0.25)])
    assert maps.shape == (46 + 64, 2 * 96, 3)  # two title lines
    for panel in (maps[46:, :96], maps[46:, 96:]):
        assert (panel != image).any(axis=-1).mean() > 0.2  # merged clusters are painted
    assert algm_state(model) is None
