"""The official-code mode against references written from the official ALGM code's rules.

* GBM's online threshold: per image, mean + std / layer of the A tokens' best-edge similarities; with
  ``batch_min`` the mean of the per-image means + the mean of the per-image stds / layer, and the batch
  minimum of the per-image counts of edges ``>=`` it, merged by rank.
* The partition: CLAP outputs [class token, merged windows by descending similarity, unmerged tokens in
  raster order]; GBM alternates A/B over that whole sequence (class token in A, never merged).
* A whole Segmenter forward, written ToMe-style (gather / scatter_reduce, as the official code), must
  give the engine's token counts and logits.
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from algm_viz import algm_state, apply_algm, remove_algm
from algm_viz.merging import (
    ONLINE,
    alternate_destinations,
    bipartite_merge,
    local_merge,
    official_global_merge,
    online_threshold,
)
from algm_viz.models import create_segmenter
from algm_viz.patch import ALGMConfig, GBMStage, ToMeStage, set_thresholds

from conftest import tiny_registry


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(F.cosine_similarity(u.double(), v.double(), dim=0))


def slots(groups: torch.Tensor, count: int) -> list[frozenset[int]]:
    """The input indices in each output slot of one image, slot by slot."""
    members: list[set[int]] = [set() for _ in range(count)]
    for i, g in enumerate(groups.tolist()):
        if g < count:
            members[g].add(i)
    return [frozenset(m) for m in members]


def partition(groups: torch.Tensor, count: int) -> set[frozenset[int]]:
    return set(slots(groups, count))


# ----------------------------------------------------------------------------------------------------
# GBM: a loop reference of the official rule on one sequence (prefix tokens first)
# ----------------------------------------------------------------------------------------------------

def official_similarities(sequence: torch.Tensor) -> torch.Tensor:
    """``[T_a, T_b]`` the official code's fp32 similarities: normalised A (even) rows times B (odd) rows.
    Exact ties of exact arithmetic (copies of one token) are decided by this rounding, so the reference
    takes the similarities as the official code computes them, and the rule's logic from loops."""
    unit = sequence / sequence.norm(dim=-1, keepdim=True)
    return unit[::2] @ unit[1::2].T


def reference_best_edges(sequence: torch.Tensor, num_prefix: int) -> list[tuple[int, float, int]]:
    """``(A position, best similarity, its B position)`` of every A patch token; A = even, B = odd
    positions of the whole sequence; the first B on a tie (as ``max``)."""
    n = sequence.shape[0]
    similarities = official_similarities(sequence).double()
    edges = []
    for i in range(0, n, 2):
        if i < num_prefix:
            continue
        best, best_j = -math.inf, None
        for j in range(1, n, 2):
            if j < num_prefix:
                continue
            similarity = float(similarities[i // 2, j // 2])
            if similarity > best:
                best, best_j = similarity, j
        if best_j is not None:
            edges.append((i, best, best_j))
    return edges


def reference_official_gbm(sequences: list[torch.Tensor], layer: int, *, batch_min: bool, num_prefix: int = 1,
                           tau: float | None = None) -> tuple[list[set[frozenset[int]]], list[float]]:
    """The official GBM on a batch of sequences (each ``[T_b, C]``, no padding): the partition of each
    one's patch indices (position - num_prefix) and the threshold each image used."""
    edges = [reference_best_edges(s, num_prefix) for s in sequences]
    means = [statistics.fmean([e[1] for e in es]) if es else 0.0 for es in edges]
    stds = [statistics.stdev([e[1] for e in es]) if len(es) > 1 else 0.0 for es in edges]
    if tau is not None:
        thresholds = [tau] * len(sequences)
    elif batch_min:
        thresholds = [statistics.fmean(means) + statistics.fmean(stds) / layer] * len(sequences)
    else:
        thresholds = [m + s / layer for m, s in zip(means, stds)]
    above = [[e for e in es if e[1] >= t] for es, t in zip(edges, thresholds)]
    r = min(len(a) for a in above)
    partitions = []
    for sequence, es, chosen in zip(sequences, edges, above):
        if batch_min:  # the r best edges, by rank (ties: the earlier A token first)
            chosen = sorted(es, key=lambda e: (-e[1], e[0]))[:r]
        groups = {j: {j} for j in range(num_prefix, sequence.shape[0]) if j % 2 == 1}
        singles = {i for i in range(num_prefix, sequence.shape[0]) if i % 2 == 0}
        for i, _, j in chosen:
            groups[j].add(i)
            singles.discard(i)
        members = [frozenset(g) for g in groups.values()] + [frozenset([i]) for i in singles]
        partitions.append({frozenset(p - num_prefix for p in m) for m in members})
    return partitions, thresholds


def structured_sequence(length: int, channels: int, seed: int, duplicates: bool = False) -> torch.Tensor:
    """Tokens near a few prototypes; with ``duplicates``, exact copies of prototypes (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, channels, generator=g)
    which = torch.randint(0, 4, (length,), generator=g)
    tokens = prototypes[which] + 0.3 * torch.randn(length, channels, generator=g)
    if duplicates:
        copies = torch.rand(length, generator=g) < 0.4
        tokens[copies] = prototypes[which[copies]]
    return tokens


def padded_batch(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T, C]`` zero-padded at the end, ``[B, T, 1]`` sizes: 1 real, 0 padding``)``."""
    length = max(s.shape[0] for s in sequences)
    tokens = torch.zeros(len(sequences), length, sequences[0].shape[1])
    size = torch.zeros(len(sequences), length, 1)
    for b, s in enumerate(sequences):
        tokens[b, : s.shape[0]] = s
        size[b, : s.shape[0]] = 1
    return tokens, size


MIXED = [
    [(17, "random"), (17, "structured"), (17, "ties")],
    [(21, "random"), (14, "ties"), (9, "structured"), (21, "random")],  # different lengths: padded
    [(8, "ties"), (31, "structured")],
]


def make_sequences(spec: list[tuple[int, str]], channels: int = 12, seed: int = 0) -> list[torch.Tensor]:
    out = []
    for k, (length, kind) in enumerate(spec):
        if kind == "random":
            out.append(torch.randn(length, channels, generator=torch.Generator().manual_seed(seed + k)))
        else:
            out.append(structured_sequence(length, channels, seed + k, duplicates=kind == "ties"))
    return out


@pytest.mark.parametrize("spec", MIXED)
@pytest.mark.parametrize("layer", [1, 3, 5])
@pytest.mark.parametrize("batch_min", [False, True])
@pytest.mark.parametrize("num_prefix", [0, 1])
def test_online_gbm_matches_reference_on_mixed_batches(spec, layer, batch_min, num_prefix):
    sequences = make_sequences(spec, seed=layer)
    tokens, size = padded_batch(sequences)
    merge = official_global_merge(tokens, ONLINE, size, num_prefix=num_prefix, layer=layer, batch_min=batch_min)
    expected, thresholds = reference_official_gbm(sequences, layer, batch_min=batch_min, num_prefix=num_prefix)
    torch.testing.assert_close(merge.threshold, torch.tensor(thresholds, dtype=torch.float32), atol=1e-5, rtol=0)
    for b, s in enumerate(sequences):
        assert partition(merge.groups[b], int(merge.counts[b])) == expected[b]
        assert int(merge.counts[b]) == len(expected[b])
        assert bool((merge.groups[b, s.shape[0] - num_prefix:] == merge.num_out).all())  # padding drops out
    if batch_min:
        merged = [s.shape[0] - num_prefix - int(c) for s, c in zip(sequences, merge.counts)]
        assert len(set(merged)) == 1  # every image merges as many tokens as the one that merges fewest


@pytest.mark.parametrize("batch_min", [False, True])
def test_fixed_tau_in_official_mode_compares_with_greater_or_equal(batch_min):
    patches = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    sequence = torch.cat([torch.tensor([[0.0, -1.0]]), patches])[None]  # class token first
    # Official A = positions 0 (class), 2, 4 = patches 1, 3; B = patches 0, 2. Patch 1 ties patches 0
    # and 2 exactly; τ is exactly that similarity, so ">=" merges it, into the first B (patch 0).
    unit = F.normalize(patches, dim=-1)
    tau = float(unit[1] @ unit[0])
    merge = official_global_merge(sequence, tau, num_prefix=1, batch_min=batch_min)
    assert partition(merge.groups[0], int(merge.counts[0])) == {frozenset({0, 1}), frozenset({2}), frozenset({3})}
    assert merge.threshold.tolist() == [tau]
    next_float = float(torch.nextafter(torch.tensor(tau), torch.tensor(2.0)))  # the next fp32 above τ
    above = official_global_merge(sequence, next_float, num_prefix=1, batch_min=batch_min)
    assert int(above.counts[0]) == 4
    # The paper's A = patches 0, 2, B = 1, 3: both best edges are exactly τ, and ">" merges neither.
    paper = bipartite_merge(patches[None], alternate_destinations(4), threshold=tau)
    assert int(paper.counts[0]) == 4
    assert int(bipartite_merge(patches[None], alternate_destinations(4), threshold=tau - 1e-3).counts[0]) == 2


def test_online_threshold_edge_cases_merge_nothing_without_crashing():
    # Two A patches at layer 1: max - mean = std / sqrt(2) < std, so no edge reaches mean + std.
    sequence = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(3))
    merge = official_global_merge(sequence, ONLINE, num_prefix=1, layer=1)
    assert int(merge.counts[0]) == 4 and merge.num_out == 4
    # Only the class token and one patch: no A patch at all; and a lone A patch (std 0) merges.
    assert int(official_global_merge(sequence[:, :2], ONLINE, num_prefix=1, layer=5).counts[0]) == 1
    lone = official_global_merge(sequence[:, :3], ONLINE, num_prefix=1, layer=5)
    assert int(lone.counts[0]) == 1 and torch.isfinite(lone.threshold).all()
    # Every B token padded: no edge exists, nothing merges, thresholds stay finite.
    size = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])[..., None]
    padded = official_global_merge(sequence, ONLINE, size, num_prefix=1, layer=5)
    assert int(padded.counts[0]) == 2 and torch.isfinite(padded.threshold).all()
    # batch_min with one image that has no edge above: every image merges 0.
    batch = torch.cat([sequence, torch.ones(1, 5, 8)])  # the second: all equal, every edge merges alone
    alone = official_global_merge(batch[1:], ONLINE, num_prefix=1, layer=1)
    assert int(alone.counts[0]) == 2
    both = official_global_merge(batch, ONLINE, num_prefix=1, layer=1, batch_min=True)
    assert both.counts.tolist() == [4, 4]


def test_online_threshold_is_the_formula():
    best = torch.tensor([[0.2, 0.4, 0.9, -math.inf], [0.5, 0.7, 0.1, 0.3]])
    eligible = torch.tensor([[True, True, True, False], [True, True, True, True]])
    per_image = online_threshold(best, eligible, 4)
    m0, s0 = statistics.fmean([0.2, 0.4, 0.9]), statistics.stdev([0.2, 0.4, 0.9])
    m1, s1 = statistics.fmean([0.5, 0.7, 0.1, 0.3]), statistics.stdev([0.5, 0.7, 0.1, 0.3])
    torch.testing.assert_close(per_image, torch.tensor([m0 + s0 / 4, m1 + s1 / 4]), atol=1e-6, rtol=0)
    batch = online_threshold(best, eligible, 4, batch_min=True)
    torch.testing.assert_close(batch, torch.full((2,), (m0 + m1) / 2 + (s0 + s1) / 2 / 4), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# CLAP's official order and the official partition
# ----------------------------------------------------------------------------------------------------

def window_similarities(patches: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> list[tuple[float, list[int]]]:
    (h, w), (kh, kw) = grid, window
    out = []
    for r0 in range(0, h - kh + 1, kh):
        for c0 in range(0, w - kw + 1, kw):
            idx = [r * w + c for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
            pairs = [cosine(patches[i], patches[j]) for i, j in itertools.permutations(idx, 2)]
            out.append((sum(pairs) / len(pairs), idx))
    return out


def reference_official_clap(patches: torch.Tensor, grid, window, tau: float, keep: int | None = None) -> list[frozenset[int]]:
    """The official CLAP's output slots of one image: merged windows (similarity >= τ; the ``keep``
    best with the batch minimum) by descending similarity, then the unmerged tokens in raster order."""
    windows = window_similarities(patches, grid, window)
    merged = sorted((w for w in windows if w[0] >= tau), key=lambda w: -w[0])[:keep]
    covered = {i for _, idx in merged for i in idx}
    return [frozenset(idx) for _, idx in merged] + [frozenset([i]) for i in range(patches.shape[0]) if i not in covered]


@pytest.mark.parametrize("grid", [(4, 6), (5, 7), (6, 3)])
@pytest.mark.parametrize("batch_min", [False, True])
def test_official_clap_order_matches_reference_slot_for_slot(grid, batch_min):
    g = torch.Generator().manual_seed(grid[0] * 10 + grid[1])
    patches = torch.randn(3, grid[0] * grid[1], 8, generator=g) + 1.5 * torch.randn(3, 1, 8, generator=g)
    tau = 0.55
    merge = local_merge(patches, grid, (2, 2), tau, official=True, batch_min=batch_min)
    merged_per_image = [sum(s >= tau for s, _ in window_similarities(p, grid, (2, 2))) for p in patches]
    keep = min(merged_per_image) if batch_min else None
    assert len(set(merged_per_image)) > 1  # the images differ, so the batch rule matters
    for b in range(3):
        assert slots(merge.groups[b], int(merge.counts[b])) == reference_official_clap(patches[b], grid, (2, 2), tau, keep)
    torch.testing.assert_close(merge.threshold, torch.full((3,), tau))


def reference_official_partition(sequence: torch.Tensor, grid, window, tau: float, layer: int) -> list[frozenset[int]]:
    """CLAP then GBM as the official code orders and partitions: ``sequence`` ``[1 + N, C]`` (class
    token first); returns the final groups of patch indices (GBM on the CLAP means, size-weighted)."""
    clap_slots = reference_official_clap(sequence[1:], grid, window, tau)
    merged_tokens = torch.stack([sequence[1:][sorted(s)].mean(0) for s in clap_slots])
    after_clap = torch.cat([sequence[:1], merged_tokens])
    [gbm], _ = reference_official_gbm([after_clap], layer, batch_min=False)
    return sorted((frozenset(p for slot in group for p in clap_slots[slot]) for group in gbm), key=min)


def test_official_partition_matches_reference_token_for_token():
    grid, tau, layer = (6, 8), 0.5, 5
    g = torch.Generator().manual_seed(7)
    sequence = torch.randn(2, 1 + 48, 10, generator=g) + 1.2 * torch.randn(2, 1, 10, generator=g)
    clap = local_merge(sequence[:, 1:], grid, (2, 2), tau, official=True)
    after, size = clap.merge(sequence[:, 1:])
    prefix_one = torch.ones(2, 1, 1)
    gbm = official_global_merge(torch.cat([sequence[:, :1], after], 1), ONLINE, torch.cat([prefix_one, size], 1),
                                num_prefix=1, layer=layer)
    final = clap.then(gbm)
    for b in range(2):
        expected = reference_official_partition(sequence[b], grid, (2, 2), tau, layer)
        assert sorted(partition(final.groups[b], int(final.counts[b])), key=min) == expected
        assert any(len(group) > 4 for group in expected)  # GBM merged CLAP windows too


def test_official_partition_is_the_opposite_parity_of_the_papers():
    """With a class token the official B set is the even patches (odd positions of the whole sequence),
    the paper's the odd patches: with every A merged, each group holds exactly one B token."""
    sequence = torch.randn(1, 1 + 12, 6, generator=torch.Generator().manual_seed(1))
    official = official_global_merge(sequence, -2.0, num_prefix=1)
    paper = bipartite_merge(sequence[:, 1:], alternate_destinations(12), threshold=-2.0)
    assert int(official.counts[0]) == int(paper.counts[0]) == 6
    for group in partition(official.groups[0], 6):
        assert len([p for p in group if p % 2 == 0]) == 1
    for group in partition(paper.groups[0], 6):
        assert len([p for p in group if p % 2 == 1]) == 1
    without_prefix = official_global_merge(sequence[:, 1:], -2.0, num_prefix=0)
    assert partition(without_prefix.groups[0], 6) == partition(paper.groups[0], 6)  # no class token: same


# ----------------------------------------------------------------------------------------------------
# Issue 15: why 4 of 32 cases differed given the official partition, and that the mode fixes it
# ----------------------------------------------------------------------------------------------------

def test_exact_tie_is_broken_by_the_official_order_not_raster_order():
    """Issue 15's 4 of 32: given the official A/B sets, an A token whose best B is a tie goes to the
    first B *in the order the matching sees*. The official code sees CLAP's order (merged windows
    first); a matching over raster order picks another B, so the groups and the logits differ."""
    grid, f = (2, 6), [1.0, 0.0, 0.0]
    patches = torch.zeros(12, 3)
    patches[[0, 1, 6, 7]] = torch.tensor([[1.0, 0.5, 0.0], [1.0, -0.5, 0.0], [1.0, 0.0, 0.5], [1.0, 0.0, -0.5]])
    patches[[4, 5, 10, 11]] = torch.tensor(f)  # window 2: similarity 1, merges first; mean f, as window 0's
    patches[[2, 3, 8, 9]] = torch.tensor([f, [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # unmerged
    window0, window2 = frozenset({0, 1, 6, 7}), frozenset({4, 5, 10, 11})
    clap = local_merge(patches[None], grid, (2, 2), 0.5, official=True)
    order = slots(clap.groups[0], int(clap.counts[0]))
    assert order == [window2, window0] + [frozenset({p}) for p in (2, 3, 8, 9)]
    merged, size = clap.merge(patches[None])
    sequence = torch.cat([torch.tensor([[[0.0, 0.0, -1.0]]]), merged], 1)  # [class, W2, W0, 2, 3, 8, 9]
    gbm = official_global_merge(sequence, 0.99, torch.cat([torch.ones(1, 1, 1), size], 1), num_prefix=1)
    final = clap.then(gbm)
    [expected], _ = reference_official_gbm([sequence[0]], 5, batch_min=False, tau=0.99)
    groups = partition(final.groups[0], int(final.counts[0]))
    assert partition(gbm.groups[0], int(gbm.counts[0])) == expected
    assert window0 | window2 in groups  # W0 (A) ties W2 and patch 2 (both B, value f): W2 comes first
    # The same A/B sets, matched over raster order (the paper engine's CLAP output order): patch 2 is
    # before W2 there, so W0 joins patch 2 instead.
    raster = local_merge(patches[None], grid, (2, 2), 0.5)
    raster_slots = slots(raster.groups[0], int(raster.counts[0]))
    official_b = {order[k] for k in range(0, len(order), 2)}  # CLAP slot k sits at sequence position k + 1
    destinations = torch.tensor([s in official_b for s in raster_slots])
    tokens, _ = raster.merge(patches[None])
    paper = raster.then(bipartite_merge(tokens, destinations, threshold=0.99))
    paper_groups = partition(paper.groups[0], int(paper.counts[0]))
    assert window0 | {2} in paper_groups and paper_groups != groups


def test_near_tie_above_one_is_not_clamped_into_an_exact_tie():
    """The other cause: fp32 cosine similarities of (near-)copies round to 1 or to 1 + 1.2e-7. The paper
    engine clamps similarities to [-1, 1], which turns such a near tie into an exact one, broken by
    position; the official code (and the official mode) keeps the larger value."""
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        token = torch.randn(16, generator=g)
        near_copy = token + 1e-4 * torch.randn(16, generator=g)
        sequence = torch.stack([torch.randn(16, generator=g), near_copy, token, token.clone()])[None]
        unit = F.normalize(sequence, dim=-1)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # as the engine computes them
        first, second = float(scores[0, 1, 0]), float(scores[0, 1, 1])  # A = position 2, B = 1 and 3
        if 1.0 <= first < second:
            break
    else:
        pytest.fail("no near tie above 1 found")
    official = official_global_merge(sequence, 0.99, num_prefix=1)  # patches: 0 = near copy, 1 = A, 2 = copy
    assert frozenset({1, 2}) in partition(official.groups[0], int(official.counts[0]))
    clamped = bipartite_merge(sequence[:, 1:], torch.tensor([True, False, True]), threshold=0.99)
    assert frozenset({0, 1}) in partition(clamped.groups[0], int(clamped.counts[0]))


# ----------------------------------------------------------------------------------------------------
# A whole Segmenter in official mode against a ToMe-style reference of the official forward
# ----------------------------------------------------------------------------------------------------

def ref_clap(x: torch.Tensor, size: torch.Tensor, grid, window, tau: float):
    """Official CLAP on ``x`` ``[B, 1 + N, C]`` (batch minimum of the merged windows), as the official code
    writes it: returns the new tokens, sizes, each patch's new slot (after the class token) and the
    window similarities."""
    batch, (h, w), (kh, kw) = x.shape[0], grid, window
    patches = x[:, 1:]
    index = torch.tensor([[r * w + c for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
                          for r0 in range(0, h - kh + 1, kh) for c0 in range(0, w - kw + 1, kw)])
    unit = patches / patches.norm(dim=-1, keepdim=True)
    sims = torch.stack([torch.stack([
        (unit[b, idx] @ unit[b, idx].T).sum().sub(len(idx)).div(len(idx) * (len(idx) - 1)) for idx in index])
        for b in range(batch)])  # [B, S]
    r = int((sims >= tau).sum(1).min())
    order = sims.argsort(dim=1, descending=True, stable=True)[:, :r]  # [B, r]
    tokens, sizes, source = [], [], torch.empty(batch, h * w, dtype=torch.long)
    for b in range(batch):
        chosen = index[order[b]]  # [r, K]
        covered = torch.zeros(h * w, dtype=torch.bool)
        covered[chosen.flatten()] = True
        rest = (~covered).nonzero().flatten()
        source[b, chosen.flatten()] = torch.arange(r).repeat_interleave(kh * kw)
        source[b, rest] = r + torch.arange(rest.numel())
        tokens.append(torch.cat([x[b, :1], patches[b, chosen].mean(1), patches[b, rest]]))
        sizes.append(torch.cat([torch.ones(1), torch.full((r,), float(kh * kw)), torch.ones(rest.numel())]))
    return torch.stack(tokens), torch.stack(sizes)[..., None], source, sims


def ref_gbm(x: torch.Tensor, size: torch.Tensor, layer: int):
    """Official GBM (ToMe's bipartite soft matching with the online threshold, batch minimum): returns
    the new tokens, sizes, the new position of each old position and the threshold."""
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    stats = node_max[:, 1:]
    threshold = stats.mean(-1).mean() + stats.std(-1).mean() / layer
    r = int((stats >= threshold).sum(-1).min())
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[:, ::2], t[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged, sizes = merge(x * size), merge(size)
    batch, length = x.shape[:2]
    num_unm = unm_idx.shape[1]
    new_position = torch.empty(batch, length, dtype=torch.long)
    a_positions = torch.arange(0, length, 2)
    new_position[:, 1::2] = num_unm + torch.arange(b.shape[1])
    a_new = torch.empty(batch, a.shape[1], dtype=torch.long)
    a_new.scatter_(1, unm_idx[..., 0], torch.arange(num_unm).expand(batch, -1))
    a_new.scatter_(1, src_idx[..., 0], num_unm + dst_idx[..., 0])
    new_position[:, a_positions] = a_new
    return merged / sizes, sizes, new_position, threshold


def reference_official_forward(model, images: torch.Tensor, tau: float, local_layer: int = 1, global_layer: int = 3):
    """The official ALGM Segmenter forward (batch minimum in both stages; no padding, no proportional
    attention): ``(logits [B, K, H, W], tokens after CLAP, tokens after GBM, GBM threshold)``."""
    encoder = model.encoder
    x = encoder.patch_embed(images)
    grid = tuple(x.shape[1:3])
    x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(x)))
    size = torch.ones(*x.shape[:2], 1)
    source = torch.arange(grid[0] * grid[1]).expand(x.shape[0], -1)  # each patch's slot after the class token
    counts, threshold = {}, None
    for layer, block in enumerate(encoder.blocks, start=1):
        x = x + block.ls1(block.attn(block.norm1(x)))
        if layer == local_layer:
            x, size, source, _ = ref_clap(x, size, grid, (2, 2), tau)
            counts["local"] = x.shape[1] - 1
        if layer == global_layer:
            x, size, new_position, threshold = ref_gbm(x, size, layer)
            source = new_position.gather(1, source + 1) - 1
            counts["global"] = x.shape[1] - 1
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = encoder.norm(x)
    scores = model.decoder(x[:, 1:], None, grid=grid)
    scores = scores.gather(1, source[..., None].expand(-1, -1, scores.shape[-1]))
    masks = scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)
    logits = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits, counts, threshold


@pytest.fixture(scope="module")
def small_segmenter():
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=5, depth=4, embed_dim=64, num_heads=2,
                             image_size=64, layer_norm_eps=1e-6).eval()
    return model


def mixed_images() -> torch.Tensor:
    """Two 80×112 images (a 5×7 grid, not the 4×4 the position embedding is laid out for): smooth
    bands, and the same bands with noise (fewer similar windows)."""
    g = torch.Generator().manual_seed(5)
    bands = torch.linspace(-1, 1, 112).expand(3, 80, 112) * torch.tensor([1.0, -0.5, 0.3])[:, None, None]
    bands = bands + 0.05 * torch.randn(3, 80, 112, generator=g)
    noise = torch.randn(3, 80, 112, generator=g)
    return torch.stack([bands, bands + 0.2 * noise])


def local_tau(model, images) -> float:
    """A CLAP τ between the two images' window similarities, so they merge different numbers of windows:
    halfway between the two middle similarities, never one of them (at τ equal to a similarity, ``>=``
    is decided by the last bit, which the engine's ``|Σu|² − Σ|u|²`` and the reference's Gram sum round
    differently)."""
    encoder = model.encoder
    with torch.no_grad():
        x = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(images)))
        block = encoder.blocks[0]
        x = x + block.attn(block.norm1(x))
        *_, sims = ref_clap(x, torch.ones(*x.shape[:2], 1), (5, 7), (2, 2), 2.0)
    middle = sims.flatten().sort().values[sims.numel() // 2 - 1 : sims.numel() // 2 + 1]
    assert middle[1] - middle[0] > 1e-3, "the two middle similarities must be apart"
    return float(middle.mean())


def merged_forward(model, images, **options):
    """(logits, token counts, thresholds used) of ALGM in layers 1 and 3 with 2×2 windows and ``options``; the
    model is left unpatched."""
    apply_algm(model, 1, 3, (2, 2), **options)
    try:
        logits = model(images)
        record = algm_state(model).record
        return logits, record.token_counts(), record.thresholds()
    finally:
        remove_algm(model)


@torch.no_grad()
def test_official_forward_matches_reference_per_image(small_segmenter):
    """Per-image mode on a batch of mixed images = the official forward on each image alone."""
    model, images = small_segmenter, mixed_images()
    tau = local_tau(model, images)
    logits, counts, thresholds = merged_forward(model, images, local_threshold=tau, global_threshold="official")
    assert counts["local"][0] != counts["local"][1]  # mixed: each image its own count
    assert bool((counts["global"] < counts["local"]).all())
    for b in range(2):
        expected, expected_counts, threshold = reference_official_forward(model, images[b : b + 1], tau)
        assert int(counts["local"][b]) == expected_counts["local"]
        assert int(counts["global"][b]) == expected_counts["global"]
        assert abs(float(thresholds["global"][b]) - float(threshold)) < 1e-6
        torch.testing.assert_close(logits[b : b + 1], expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_official_forward_matches_reference_with_batch_min(small_segmenter):
    """``batch_min=True`` = the official code's batch behaviour, on the whole batch."""
    model, images = small_segmenter, mixed_images()
    tau = local_tau(model, images)
    logits, counts, thresholds = merged_forward(model, images, local_threshold=tau, mode="official", batch_min=True)
    expected, expected_counts, threshold = reference_official_forward(model, images, tau)
    assert expected_counts["global"] < expected_counts["local"]  # the batch rule merges in GBM too
    assert counts["local"].tolist() == [expected_counts["local"]] * 2
    assert counts["global"].tolist() == [expected_counts["global"]] * 2
    torch.testing.assert_close(thresholds["global"], torch.full((2,), float(threshold)), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------

def test_modes_and_thresholds_are_validated_and_discoverable(small_segmenter):
    assert ALGMConfig(global_threshold="official").resolved_mode == "official"
    assert ALGMConfig(global_threshold=0.9).resolved_mode == "paper"
    assert ALGMConfig(global_threshold=0.9, mode="official").resolved_mode == "official"
    with pytest.raises(ValueError, match="official"):
        ALGMConfig(global_threshold="official", mode="paper")
    with pytest.raises(ValueError, match="mode"):
        ALGMConfig(mode="exact")
    with pytest.raises(ValueError, match="number"):
        ALGMConfig(global_threshold="online")
    with pytest.raises(ValueError, match="official"):
        GBMStage(5, threshold=ONLINE)
    with pytest.raises(TypeError, match="mode"):  # only CLAP and GBM have an official mode
        ToMeStage(2, r=4, mode="official")
    model = small_segmenter
    apply_algm(model, 1, 3, mode="official")
    try:
        state = algm_state(model)
        assert state.config.global_threshold == ONLINE
        assert [s.mode for s in state.stages] == ["official", "official"]
        set_thresholds(model, global_threshold=0.9)  # mode "official" was asked for: it stays
        assert state.stages[1].threshold == 0.9 and state.stages[1].mode == "official"
    finally:
        remove_algm(model)
    apply_algm(model, 1, 3, global_threshold=0.9)
    try:
        set_thresholds(model, global_threshold="official")  # follows the threshold: official mode
        assert algm_state(model).stages[1].mode == "official"
    finally:
        remove_algm(model)


# ----------------------------------------------------------------------------------------------------
# Position embeddings: the official code's bilinear resize
# ----------------------------------------------------------------------------------------------------

def official_resize_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """The official Segmenter's ``resize_pos_embed``: the grid part resized bilinearly, class token kept."""
    token, grid = pos_embed[:, :1], pos_embed[0, 1:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bilinear")
    return torch.cat([token, grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)], dim=1)


@torch.no_grad()
def test_bilinear_pos_embed_is_the_official_resize():
    from algm_viz.models import set_pos_embed_interpolation

    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=5, depth=4, embed_dim=64, num_heads=2,
                             image_size=64, pos_embed_interpolation="bilinear").eval()
    assert model.pos_embed_interpolation == "bilinear"
    encoder, images = model.encoder, mixed_images()
    patches = encoder.patch_embed(images)  # [2, 5, 7, C]
    expected = torch.cat([encoder.cls_token.expand(2, -1, -1), patches.flatten(1, 2)], 1)
    expected = expected + official_resize_pos_embed(encoder.pos_embed, (4, 4), (5, 7))
    torch.testing.assert_close(encoder._pos_embed(patches), expected, atol=1e-6, rtol=0)
    bilinear = model(images)
    apply_algm(model, 1, 3, local_threshold=0.5, mode="official")
    set_pos_embed_interpolation(model, "bicubic")  # merging stays applied
    assert model.pos_embed_interpolation == "bicubic" and algm_state(model) is not None
    remove_algm(model)
    bicubic = model(images)
    assert (bicubic - bilinear).abs().max() > 1e-3  # timm's bicubic antialiased resize differs
    square = torch.randn(1, 3, 64, 64)  # the size the embedding is laid out for: both are the identity
    reference = model(square)
    set_pos_embed_interpolation(model, "bilinear")
    torch.testing.assert_close(model(square), reference)
    torch.testing.assert_close(model(images), bilinear)
    with pytest.raises(ValueError, match="bicubic, bilinear"):
        set_pos_embed_interpolation(model, "nearest")


# ----------------------------------------------------------------------------------------------------
# The sweep: --taus official
# ----------------------------------------------------------------------------------------------------

def test_sweep_runs_the_official_mode_and_reports_the_thresholds_used(tmp_path):
    import cv2
    import numpy as np

    from algm_viz.datasets import open_dataset
    from algm_viz.evaluation.sweep import SweepConfig, parse_taus, sweep
    from algm_viz.plots import row_threshold, rows_to_csv, threshold_figure

    assert parse_taus("official") == ["official"]
    assert parse_taus("0.9,official,auto,0.8") == [0.8, 0.9, "auto", "official"]
    rng = np.random.default_rng(0)
    for i in range(2):
        label = cv2.resize(rng.integers(0, 3, (4, 4)).astype(np.uint8), (80, 64), interpolation=cv2.INTER_NEAREST)
        image = (rng.integers(0, 256, (3, 3))[label] + rng.normal(0, 8, (64, 80, 3))).clip(0, 255).astype(np.uint8)
        for folder, array in (("images", image), ("labels", label)):
            (tmp_path / folder).mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / folder / f"{i}.png"), array)
    dataset = open_dataset("folder", tmp_path, class_names=["a", "b", "c"])
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2,
                             image_size=64).eval()
    config = SweepConfig(taus=parse_taus("0.9,official"), methods=["algm", "gbm"], warmup=0, flops_images=0,
                         bootstrap=0)
    rows = sweep(model, dataset, config, progress=False)
    official = [r for r in rows if r["value"] == "official"]
    assert [r["method"] for r in official] == ["algm", "gbm"]
    for row in official:
        assert row["global_threshold"] == "official"
        used = row["thresholds_used"]["global"]
        assert -1.0 <= used <= 1.0 and used != 0.9
    paper = next(r for r in rows if r["method"] == "algm" and r["value"] == 0.9)
    assert paper["thresholds_used"] == {"local": pytest.approx(0.9), "global": pytest.approx(0.9)}
    gbm_official = official[1]
    assert row_threshold(gbm_official) == gbm_official["thresholds_used"]["global"]
    threshold_figure(rows)  # draws the official rows as markers, not on the τ lines
    rows_to_csv(rows, tmp_path / "rows.csv")
    header, *lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert "thresholds_used" in header and any("global:" in line for line in lines)


def test_load_segmenter_offers_the_official_interpolation(tiny_official_model):
    from algm_viz.models import load_segmenter

    official = load_segmenter(tiny_official_model, pos_embed_interpolation="bilinear")
    default = load_segmenter(tiny_official_model)
    assert (official.pos_embed_interpolation, default.pos_embed_interpolation) == ("bilinear", "bicubic")
    images = mixed_images()[:1, :, :48, :80]
    with torch.no_grad():
        assert (official(images) - default(images)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        load_segmenter(tiny_official_model, pos_embed_interpolation="area")


# ----------------------------------------------------------------------------------------------------
# The app: "official (online)" for the global τ, and the threshold each image used in the readout
# ----------------------------------------------------------------------------------------------------

def test_app_offers_the_official_global_tau_and_shows_the_threshold_used(tmp_path):
    import cv2
    import gradio as gr
    import numpy as np

    from algm_viz.app.session import SessionCache, Settings
    from algm_viz.app.ui import Handlers

    handlers = Handlers(tiny_registry(), SessionCache(max_side=128), thresholds=(0.6, 1.0))
    image = np.clip(np.random.default_rng(0).integers(0, 60, (60, 90, 3)) + 100, 0, 255).astype(np.uint8)
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, image)
    assert Settings(0.8, "official").global_threshold == "official"
    with pytest.raises(ValueError, match="global_threshold"):
        Settings(0.8, "online")
    markdown, readout = handlers.analyze("untrained", path, None, 0.8, 0.9, 2, 5, False, True)[5:7]
    assert readout["thresholds"] == {"local": 0.8, "global": "official"}
    used = readout["thresholds_used"]["global"]
    assert used != 0.9 and -1.0 <= used <= 1.0  # the slider's 0.9 is ignored: the image's online τ
    assert f"official (online) {used:.3f}" in markdown
    paper_markdown, paper = handlers.analyze("untrained", path, None, 0.8, 0.9, 2, 5, False, False)[5:7]
    assert paper["thresholds_used"] == {"local": pytest.approx(0.8), "global": pytest.approx(0.9)}
    assert "global 0.900" in paper_markdown
    with pytest.raises(gr.Error, match="official-τ switch"):
        handlers.settings(0.8, 0.9, 2, 5, False, "yes")
