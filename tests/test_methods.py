"""The comparison methods (ToMe, Segformer++, CTS-style, ALGM variants) on the shared engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from algm_viz import algm_state, remove_algm
from algm_viz.merging import budget_window_merge, bipartite_merge, grid_destinations, local_merge, window_index
from algm_viz.methods import METHODS, apply_method, colour_homogeneity_policy
from algm_viz.patch import (
    GBMStage,
    GridStage,
    PlanContext,
    Pool2dStage,
    ShareStage,
    ToMeStage,
    apply_merging,
    merging_disabled,
)
from algm_viz.patch.surgery import _attention_with_keys

from test_merging import cosine, partition, structured_tokens
from test_patch import smooth_images, tiny_segmenter


def reference_bipartite_r(tokens: torch.Tensor, destinations: list[int], r: int) -> set[frozenset[int]]:
    """One image ``[N, C]``: each source keeps its best destination; the r most similar edges merge."""
    n = tokens.shape[0]
    sources = [i for i in range(n) if i not in destinations]
    edges = sorted(
        ((max(cosine(tokens[i], tokens[j]) for j in destinations), i) for i in sources), reverse=True
    )[:r]
    groups = {j: {j} for j in destinations}
    merged = set()
    for _, i in edges:
        best = max(destinations, key=lambda j: cosine(tokens[i], tokens[j]))
        groups[best].add(i)
        merged.add(i)
    return {frozenset(g) for g in groups.values()} | {frozenset([i]) for i in sources if i not in merged}


@pytest.mark.parametrize("r", [0, 3, 8, 100])
def test_tome_matching_merges_the_r_best_edges(r):
    tokens = structured_tokens(2, (1, 17), seed=r)
    destinations = list(range(1, 17, 2))
    merge = bipartite_merge(tokens, torch.arange(17) % 2 == 1, r=r)
    for b in range(2):
        assert partition(merge.groups[b]) == reference_bipartite_r(tokens[b], destinations, r)
    assert merge.counts.tolist() == [17 - min(r, 9)] * 2


def test_grid_destinations_and_matching():
    grid = (5, 6)
    destinations = grid_destinations(grid, (2, 3))
    assert destinations.nonzero().flatten().tolist() == [0, 3, 12, 15, 24, 27]
    tokens = structured_tokens(1, grid, seed=2)
    merge = bipartite_merge(tokens, destinations, r=10)
    assert partition(merge.groups[0]) == reference_bipartite_r(tokens[0], [0, 3, 12, 15, 24, 27], 10)


def test_pool2d_is_average_pooling_of_full_windows():
    grid = (6, 8)
    tokens = torch.randn(2, 48, 5)
    merge = local_merge(tokens, grid, (2, 2), float("-inf"))
    pooled, _ = merge.merge(tokens)
    expected = F.avg_pool2d(tokens.transpose(1, 2).reshape(2, 5, 6, 8), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("budget", [0, 3, 7, 50])
def test_budget_window_merge_respects_its_budget(budget):
    grid = (5, 6)
    scores = torch.randn(3, window_index(grid, (2, 2)).shape[0])  # 2 × 3 = 6 full windows
    merge = budget_window_merge(scores, grid, (2, 2), budget)
    merged_windows = min(budget, 6)
    assert merge.counts.tolist() == [30 - 3 * merged_windows] * 3
    for b in range(3):  # the merged windows are the best-scoring ones
        merged = {g for g in partition(merge.groups[b]) if len(g) > 1}
        best = scores[b].argsort(descending=True)[:merged_windows].tolist()
        index = window_index(grid, (2, 2))
        assert merged == {frozenset(index[w].tolist()) for w in best}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_in_batches_on_non_square_images(name):
    model = tiny_segmenter()
    method = METHODS[name]
    value = method.values[len(method.values) // 2]
    images = torch.cat([smooth_images(1, 70, 100, seed=0), torch.randn(1, 3, 70, 100)])
    with torch.no_grad():
        apply_method(model, name, value)
        out = model(images)
    assert out.shape == (2, 4, 70, 100) and torch.isfinite(out).all()
    record = algm_state(model).record
    assert record.stages or record.kv_stages


def test_algm_prop_is_algm_with_size_weighted_attention():
    images = smooth_images(2, 64, 96, seed=1)
    outputs = {}
    for name in ("algm", "algm_prop"):
        model = apply_method(tiny_segmenter(), name, 0.5)
        with torch.no_grad():
            outputs[name] = model(images)
        assert algm_state(model).prop_attn is (name == "algm_prop")
        assert algm_state(model).record.stages
    assert not torch.allclose(outputs["algm"], outputs["algm_prop"])


def test_tome_removes_exactly_r_tokens_per_layer():
    model = apply_method(tiny_segmenter(), "tome", 3)
    with torch.no_grad():
        model(smooth_images(2, 96, 128))
    counts = [int(c[0]) for name, c in algm_state(model).record.token_counts().items() if name != "patches"]
    assert counts == [48 - 3 * (i + 1) for i in range(6)]


def test_cts_sharing_happens_before_the_first_attention():
    model = apply_method(tiny_segmenter(), "cts", 0.5)
    seen = []
    model.encoder.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(smooth_images(1, 96, 128))
    # 3 × 4 = 12 superpatches, half of them shared: 48 - 6 * 3 tokens, plus the class token.
    assert seen == [48 - 18 + 1]


def test_kv_merging_keeps_tokens_and_equals_baseline_when_nothing_merges():
    model = tiny_segmenter()
    images = smooth_images(2, 70, 100)
    with torch.no_grad():
        expected = model(images)
        apply_method(model, "kv_grid", 0.0)
        same = model(images)
        apply_method(model, "kv_grid", 0.75)
        merged = model(images)
    torch.testing.assert_close(same, expected, atol=1e-5, rtol=0)
    record = algm_state(model).record
    assert not record.stages and len(record.kv_stages) == 6
    assert not torch.allclose(merged, expected)


def test_kv_merging_of_duplicate_keys_is_exact():
    """Merging identical keys/values with their log-size bias leaves attention unchanged."""
    encoder = tiny_segmenter().encoder
    block = encoder.blocks[0]
    with torch.no_grad():
        tokens = torch.randn(1, 24, 64).repeat_interleave(2, dim=1)  # a 6×8 grid: every token twice in its row
        x = block.norm1(torch.cat([encoder.cls_token, tokens], 1))
        expected = block.attn(x)
        apply_merging(encoder, [GridStage(1, ratio=1.0, stride=(1, 2), kv_only=True)])
        state = algm_state(encoder)
        state.begin((6, 8))
        got, _ = _attention_with_keys(block.attn, x, None, state, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert state.record.kv_stages[0][2].counts.tolist() == [24]


def test_remove_after_a_method_restores_the_model():
    model = tiny_segmenter()
    images = smooth_images(1, 64, 64)
    with torch.no_grad():
        expected = model(images)
        apply_method(model, "tome", 4)
        remove_algm(model)
        torch.testing.assert_close(model(images), expected)


@pytest.mark.parametrize(
    "kind, kwargs, error, message",
    [
        (GBMStage, {"threshold": float("nan")}, ValueError, "threshold"),
        (ToMeStage, {"r": -1}, ValueError, "r >= 0"),
        (ToMeStage, {"r": 2, "metric": "queries"}, ValueError, "metric"),
        (GridStage, {"ratio": 1.5}, ValueError, "ratio"),
        (ShareStage, {"budget": None}, ValueError, "budget"),
        (ShareStage, {}, TypeError, "budget"),
        (GBMStage, {"threshold": 0.5, "kv_only": True}, TypeError, "kv_only"),
    ],
)
def test_bad_stages_are_rejected(kind, kwargs, error, message):
    with pytest.raises(error, match=message):
        kind(1, **kwargs)


def test_sharing_needs_a_policy_and_uses_the_one_given():
    images = smooth_images(1, 96, 128)
    model = apply_merging(tiny_segmenter(), [ShareStage(1, budget=0.5)])
    with pytest.raises(RuntimeError, match="policy"), torch.no_grad():
        model(images)
    chosen = []

    def policy(*args):
        chosen.append(args[1:])
        return -colour_homogeneity_policy(*args)  # the least uniform windows first

    with torch.no_grad():
        apply_method(model, "cts", 0.5, policy=policy)
        flipped = model(images)
        apply_method(model, "cts", 0.5)
        expected = model(images)
    assert chosen == [((6, 8), (2, 2), (16, 16))] and not torch.allclose(flipped, expected)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_a_plan_whose_stages_plan_with_one_signature(name):
    method = METHODS[name]
    plan = method.build(method.values[0], 6, defaults={"local": 0.8, "global": 0.7}, prop_attn=method.prop_attn)
    assert plan.stages and plan.prop_attn is method.prop_attn
    assert (plan.config is not None) is method.algm
    if method.algm:
        assert plan.stages == tuple(plan.config.stages()) and {s.threshold for s in plan.stages} == {method.values[0]}
    grid, images = (6, 8), smooth_images(2, 96, 128)
    context = PlanContext(grid, 1, images=images, policy=colour_homogeneity_policy)
    sequence = torch.cat([torch.randn(2, 1, 16), structured_tokens(2, grid, seed=1)], 1)  # [B, 1 + 48, C]
    merge = plan.stages[0].plan(sequence, None, context)
    assert merge.groups.shape == (2, 48) and 0 < int(merge.counts.max()) <= 48


@pytest.mark.parametrize("name", ["algm", "tome", "kv_grid", "cts", "ailurus"])
def test_merging_disabled_runs_the_baseline_and_gives_the_stages_back(name):
    model = tiny_segmenter()
    images = smooth_images(1, 64, 96)
    with torch.no_grad():
        expected = model(images)
        apply_method(model, name, METHODS[name].values[-1])
        merged = model(images)
        stages = algm_state(model).stages
        with merging_disabled(model):
            torch.testing.assert_close(model(images), expected, atol=0, rtol=0)
            assert not algm_state(model).record.stages and not algm_state(model).record.kv_stages
        assert algm_state(model).stages == stages
        torch.testing.assert_close(model(images), merged, atol=0, rtol=0)


def test_unknown_method_and_grid_stage_after_merging_are_errors():
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(tiny_segmenter(), "magic", 1)
    model = apply_merging(tiny_segmenter(), [ToMeStage(1, r=2), Pool2dStage(2)])
    with pytest.raises(RuntimeError, match="full patch grid"), torch.no_grad():
        model(smooth_images(1, 64, 64))
