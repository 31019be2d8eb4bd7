"""The merging primitives against brute-force references written from the paper's definitions."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from algm_viz.merging import global_merge, local_merge


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(F.cosine_similarity(u.double(), v.double(), dim=0))


def partition(groups: torch.Tensor) -> set[frozenset[int]]:
    """The groups of one image as a set of sets of input indices."""
    members: dict[int, set[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, set()).add(i)
    return {frozenset(m) for m in members.values()}


def reference_clap(tokens: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], tau: float) -> set[frozenset[int]]:
    """CLAP for one image ``[N, C]``: loop over full windows, mean of all i != j cosine similarities."""
    (h, w), (kh, kw) = grid, window
    merged: list[frozenset[int]] = []
    for r0 in range(0, h - kh + 1, kh):
        for c0 in range(0, w - kw + 1, kw):
            idx = [r * w + c for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
            pairs = [cosine(tokens[i], tokens[j]) for i, j in itertools.permutations(idx, 2)]
            if pairs and sum(pairs) / len(pairs) > tau:
                merged.append(frozenset(idx))
    covered = set().union(*merged) if merged else set()
    return set(merged) | {frozenset([i]) for i in range(h * w) if i not in covered}


def reference_gbm(tokens: torch.Tensor, tau: float, valid: list[bool] | None = None) -> set[frozenset[int]]:
    """GBM for one image ``[N, C]``: A = even, B = odd; each A keeps its best B; merge if > τ."""
    n = tokens.shape[0]
    valid = valid or [True] * n
    groups = {j: {j} for j in range(1, n, 2) if valid[j]}
    singles = []
    for i in range(0, n, 2):
        if not valid[i]:
            continue
        candidates = [(cosine(tokens[i], tokens[j]), j) for j in range(1, n, 2) if valid[j]]
        best = max(candidates, key=lambda c: c[0], default=None)
        if best is not None and min(max(best[0], -1.0), 1.0) > tau:
            groups[best[1]].add(i)
        else:
            singles.append(frozenset([i]))
    return {frozenset(g) for g in groups.values()} | set(singles)


def structured_tokens(batch: int, grid: tuple[int, int], channels: int = 16, regions: int = 3, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant regions (vertical bands) plus noise: windows inside a band are similar."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    prototypes = torch.randn(batch, regions, channels, generator=g)
    bands = (torch.arange(w) * regions // w).repeat(h)  # [N]
    tokens = prototypes[:, bands] + noise * torch.randn(batch, h * w, channels, generator=g)
    return tokens


GRIDS = [(4, 4), (5, 7), (3, 3), (1, 6), (7, 2)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window", [(2, 2), (2, 1), (3, 2)])
@pytest.mark.parametrize("tau", [-0.5, 0.3, 0.8])
def test_local_merge_matches_reference(grid, window, tau):
    tokens = structured_tokens(3, grid, seed=hash((grid, window)) % 1000)
    merge = local_merge(tokens, grid, window, tau)
    for b in range(tokens.shape[0]):
        assert partition(merge.groups[b]) == reference_clap(tokens[b], grid, window, tau)
        assert merge.counts[b] == len(partition(merge.groups[b]))


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("tau", [-0.2, 0.5, 0.9])
def test_global_merge_matches_reference(n, tau):
    tokens = structured_tokens(2, (1, n), seed=n)
    merge = global_merge(tokens, tau)
    for b in range(2):
        assert partition(merge.groups[b]) == reference_gbm(tokens[b], tau)


def test_global_merge_ignores_padding_tokens():
    tokens = structured_tokens(2, (1, 12), seed=3)
    size = torch.ones(2, 12, 1)
    size[0, 9:] = 0  # image 0 has 9 real tokens
    merge = global_merge(tokens, 0.2, size)
    real = partition(merge.groups[0][:9])
    assert real == reference_gbm(tokens[0, :9], 0.2)
    assert bool((merge.groups[0, 9:] == merge.num_out).all())
    assert partition(merge.groups[1]) == reference_gbm(tokens[1], 0.2)


def test_output_order_follows_representatives():
    tokens = structured_tokens(1, (4, 6), seed=1)
    merge = local_merge(tokens, (4, 6), (2, 2), -2.0)  # every window merges
    # Representatives are the windows' top-left tokens, in raster order.
    top_left = [r * 6 + c for r in (0, 2) for c in (0, 2, 4)]
    assert merge.groups[0, top_left].tolist() == list(range(6))


def test_each_image_merges_what_it_would_alone():
    tokens = torch.cat([structured_tokens(1, (6, 6), noise=n, seed=s) for s, n in [(0, 0.05), (1, 0.8), (2, 0.3)]])
    size = None
    for step in ("local", "global"):
        if step == "local":
            merge = local_merge(tokens, (6, 6), (2, 2), 0.6)
        else:
            merge = global_merge(tokens, 0.6, size)
        alone = [local_merge(tokens[b : b + 1], (6, 6), (2, 2), 0.6) for b in range(3)] if step == "local" else None
        if alone:
            assert len({int(c) for c in merge.counts}) > 1, "test needs different merge counts"
            for b in range(3):
                assert partition(merge.groups[b]) == partition(alone[b].groups[0])
        tokens, size = merge.merge(tokens)
    assert merge.mask is not None and merge.mask.sum(1).tolist() == merge.counts.tolist()


def test_batch_min_merges_the_same_number_everywhere():
    tokens = torch.cat([structured_tokens(1, (6, 6), noise=n, seed=s) for s, n in [(0, 0.05), (1, 0.8)]])
    adaptive = local_merge(tokens, (6, 6), (2, 2), 0.6)
    fixed = local_merge(tokens, (6, 6), (2, 2), 0.6, batch_min=True)
    assert fixed.mask is None
    assert fixed.counts.tolist() == [int(adaptive.counts.max())] * 2
    for b in range(2):  # every window merged under batch_min is one the image merges adaptively
        assert {g for g in partition(fixed.groups[b]) if len(g) > 1} <= {g for g in partition(adaptive.groups[b]) if len(g) > 1}
    g_fixed = global_merge(tokens, 0.3, batch_min=True)
    g_adapt = global_merge(tokens, 0.3)
    removed = 36 - g_adapt.counts
    assert g_fixed.counts.tolist() == [36 - int(removed.min())] * 2


def test_merge_is_size_weighted_mean_and_unmerge_inverts_it():
    tokens = structured_tokens(2, (5, 5), seed=4)
    merge = global_merge(tokens, 0.0)
    size = torch.randint(1, 5, (2, 25, 1)).float()
    merged, merged_size = merge.merge(tokens, size)
    for b in range(2):
        for group in partition(merge.groups[b]):
            idx = sorted(group)
            slot = int(merge.groups[b, idx[0]])
            expected = (tokens[b, idx] * size[b, idx]).sum(0) / size[b, idx].sum()
            torch.testing.assert_close(merged[b, slot], expected)
            assert float(merged_size[b, slot]) == float(size[b, idx].sum())
    # merge ∘ unmerge is the identity on real output tokens, and sizes are conserved.
    again, _ = merge.merge(merge.unmerge(merged), size)
    real = merge.mask if merge.mask is not None else torch.ones_like(merged[..., 0], dtype=torch.bool)
    torch.testing.assert_close(again[real], merged[real])
    assert merged_size.sum((1, 2)).tolist() == size.sum((1, 2)).tolist()
    # unmerge ∘ merge is the identity on tokens that are constant within their group.
    constant = merge.unmerge(merged)
    torch.testing.assert_close(merge.unmerge(merge.merge(constant)[0]), constant)


def test_composition_equals_two_unmerges():
    tokens = structured_tokens(3, (6, 8), seed=5)
    first = local_merge(tokens, (6, 8), (2, 2), 0.3)
    x1, s1 = first.merge(tokens)
    second = global_merge(x1, 0.3, s1)
    x2, _ = second.merge(x1, s1)
    torch.testing.assert_close(first.then(second).unmerge(x2), first.unmerge(second.unmerge(x2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_groups(dtype):
    tokens = structured_tokens(2, (6, 6), seed=6)
    ref = local_merge(tokens, (6, 6), (2, 2), 0.5)
    half = local_merge(tokens.to(dtype), (6, 6), (2, 2), 0.5)
    merged, size = half.merge(tokens.to(dtype))
    assert merged.dtype == dtype and half.unmerge(merged).dtype == dtype
    assert (half.groups == ref.groups).float().mean() > 0.95  # rounding may flip a borderline window


def test_threshold_extremes():
    identical = torch.ones(2, 16, 8)
    assert local_merge(identical, (4, 4), (2, 2), 1.0).counts.tolist() == [16, 16]
    assert global_merge(identical, 1.0).counts.tolist() == [16, 16]
    opposite = torch.randn(1, 16, 8)
    assert local_merge(opposite, (4, 4), (2, 2), -1.01).counts.tolist() == [4]
    assert global_merge(opposite, -1.01).counts.tolist() == [8]
    assert local_merge(torch.randn(1, 9, 4), (3, 3), (4, 4), -5).counts.tolist() == [9]  # grid < window


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: local_merge(t, (4, 4), (2, 2), float("nan")), "NaN"),
        (lambda t: global_merge(t, float("nan")), "NaN"),
        (lambda t: local_merge(t, (4, 4), (0, 2), 0.5), "positive"),
        (lambda t: local_merge(t, (3, 5), (2, 2), 0.5), "does not match"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 16, 4))


def test_bookkeeping_is_linear_in_tokens():
    merge = global_merge(torch.randn(2, 1024, 8), 0.0)
    held = [v for v in vars(merge).values() if isinstance(v, torch.Tensor)]
    assert max(t.numel() for t in held) <= 2 * 1024
    assert merge.num_in == 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    tokens = structured_tokens(2, (6, 10), seed=7)
    cpu = local_merge(tokens, (6, 10), (2, 2), 0.4)
    gpu = local_merge(tokens.cuda(), (6, 10), (2, 2), 0.4)
    assert torch.equal(cpu.groups, gpu.groups.cpu())
    torch.testing.assert_close(gpu.merge(tokens.cuda())[0].cpu(), cpu.merge(tokens)[0])
