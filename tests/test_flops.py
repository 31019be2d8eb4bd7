"""FLOPs from token counts (TokenCountFlops) equal the counter's on every forward, with few forwards counted."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from algm_viz import apply_algm, algm_state
from algm_viz.flops import TokenCountFlops, count_flops, stage_lengths
from algm_viz.merging import Merge, forced_length
from algm_viz.methods import apply_method
from algm_viz.models import create_segmenter
from algm_viz.patch import lengths_forced

flops_module = importlib.import_module("algm_viz.flops")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64,
                            layer_norm_eps=1e-6, mlp_ratio=4.0).eval()


def _images(count: int, height: int = 128, width: int = 192) -> list[torch.Tensor]:
    """Images from flat to noisy, so that CLAP and GBM leave a different number of tokens in each."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for i in range(count):
        flat = torch.rand(1, 3, 1, 1, generator=generator).expand(1, 3, height, width)
        noise = torch.randn(1, 3, height, width, generator=generator)
        mask = torch.zeros(1, 1, height, width)
        mask[..., : int(height * (i + 1) / count), : int(width * ((i * 7) % count + 1) / count)] = 1
        images.append(flat + mask * noise * (0.2 + i / count))
    return images


def _forward_and_estimate(model: nn.Module, estimate: TokenCountFlops, x: torch.Tensor) -> tuple[int, int, tuple]:
    with torch.inference_mode():
        model(x)
    lengths = stage_lengths(model)
    return estimate(x), count_flops(model, x), lengths


@pytest.mark.parametrize("options", [{}, {"prop_attn": True}, {"mode": "official"}, {"global_layer": None},
                                     {"local_layer": None}])
def test_every_forward_of_algm_gets_the_counters_flops_from_a_few_counts(options):
    model = _model()
    apply_algm(model, local_threshold=0.6, global_threshold=0.6, **options)
    estimate = TokenCountFlops(model)
    images = _images(14)
    results = [_forward_and_estimate(model, estimate, x) for x in images]
    assert len({lengths for _, _, lengths in results}) >= 6  # the lengths vary: the law is what answers
    assert [flops for flops, _, _ in results] == [truth for _, truth, _ in results]
    stages = len(results[0][2])
    assert estimate.counted == 4 + len(flops_module._DESIGN[stages])  # then every forward came from the law
    assert algm_state(model).record.stages[-1][2].num_out == results[-1][2][-1][1]  # the record is the last forward's


def test_a_batch_with_padding_and_a_second_input_shape():
    model = _model()
    apply_algm(model, local_threshold=0.6, global_threshold=0.6)
    estimate = TokenCountFlops(model)
    small = _images(12)
    batches = [torch.cat(small[i:i + 2]) for i in range(0, 12, 2)] + _images(6, 64, 160)
    padded = 0
    for x in batches:
        flops, truth, _ = _forward_and_estimate(model, estimate, x)
        assert flops == truth
        counts = algm_state(model).record.stages[0][2].counts
        padded += bool((counts != counts.max()).any())  # images of one batch kept different numbers of tokens
    assert padded >= 3 and len(estimate._shapes) == 2


def test_a_fixed_count_method_and_the_baseline_are_counted_twice():
    for configure in (lambda m: apply_method(m, "tome", 4), lambda m: None):
        model = _model()
        configure(model)
        estimate = TokenCountFlops(model)
        results = [_forward_and_estimate(model, estimate, x) for x in _images(6)]
        assert [flops for flops, _, _ in results] == [truth for _, truth, _ in results]
        assert estimate.counted == 2


class _DataDependent(nn.Module):
    """A matrix product whose size depends on the values: its FLOPs are no function of token counts."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = 1 + int(x.abs().sum() * 10) % 5
        return self.linear(x[:rows])


def test_flops_that_depend_on_the_data_are_counted_every_time():
    model = _DataDependent()
    estimate = TokenCountFlops(model)
    inputs = [torch.rand(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    results = []
    for x in inputs:
        results.append((estimate(x), count_flops(model, x)))
    assert len({truth for _, truth in results}) > 1
    assert [f for f, _ in results] == [t for _, t in results]
    assert estimate.counted >= 7


def test_a_law_that_misses_a_count_is_not_used(monkeypatch):
    """Without the parity feature the law misses GBM's uneven split of an odd number of CLAP outputs: it is
    rejected, every forward is counted and the figures stay exact."""
    features = flops_module._features

    def no_parity(lengths, base):
        row = features(lengths, base)
        row[3] = row[1] ** 3  # t_1 mod 2 replaced by u_1³: the design matrix stays invertible, the law is wrong
        return row

    monkeypatch.setattr(flops_module, "_features", no_parity)
    model = _model()
    apply_algm(model, local_threshold=0.6, global_threshold=0.6)
    estimate = TokenCountFlops(model)
    images = _images(14)
    results = [_forward_and_estimate(model, estimate, x) for x in images]
    assert len({lengths[0][1] % 2 for _, _, lengths in results}) == 2  # CLAP leaves odd and even lengths
    assert [flops for flops, _, _ in results] == [truth for _, truth, _ in results]
    assert all(shape.law is None for shape in estimate._shapes.values())
    seen = [lengths for _, _, lengths in results]
    counted = sum(seen[:i].count(lengths) < 2 for i, lengths in enumerate(seen))  # all but vectors counted twice
    assert estimate.counted == counted + len(flops_module._DESIGN[2])  # and the rejected law's measurements


def test_forced_length_keeps_the_first_tokens_and_discards_padding():
    merge = Merge(torch.tensor([[0, 0, 1, 2, 3], [0, 1, 1, 2, 2]]), torch.tensor([4, 3]), 4,
                  torch.tensor([[True] * 5, [True, True, True, True, False]]))
    forced = forced_length(merge, 3)
    assert forced.groups.tolist() == [[0, 1, 2, 2, 2], [0, 1, 2, 2, 3]]
    assert forced.counts.tolist() == [3, 3] and forced.num_out == 3
    with pytest.raises(ValueError, match="cannot force"):
        forced_length(merge, 6)
    with pytest.raises(ValueError, match="cannot force"):
        forced_length(merge, 0)


def test_lengths_forced_sets_the_lengths_and_gives_the_record_back():
    model = _model()
    apply_algm(model, local_threshold=0.99, global_threshold=0.99)
    x = _images(1)[0]
    with torch.inference_mode():
        model(x)
    record = algm_state(model).record
    with lengths_forced(model, {"local": 30, "global": 20}), torch.inference_mode():
        model(x)
        assert stage_lengths(model) == (("local", 30), ("global", 20))
    assert algm_state(model).record is record and algm_state(model).forced_lengths is None
    with pytest.raises(ValueError, match="no stages named"):
        with lengths_forced(model, {"gbm": 3}):
            pass
