"""Attention balance: class token/attention shares against weights captured from timm's own attention."""

import math

import pytest
import torch

from algm_viz import algm_state, apply_algm
from algm_viz.evaluation.balance import aggregate_balance, attention_balance, default_balance_layers, summarize
from algm_viz.models import create_segmenter

P = 16


def _model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64).eval()


def _patch_labels(grid_labels: torch.Tensor) -> torch.Tensor:
    """``[B, h, w]`` per-patch classes -> ``[B, h*16, w*16]`` pixel labels."""
    return grid_labels.repeat_interleave(P, 1).repeat_interleave(P, 2)


def _images(batch=2, h=4, w=5):
    torch.manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.randn(batch, 3, 2, 2), size=(h * P, w * P), mode="bilinear")
    return smooth.clamp(-1, 1)


def test_baseline_shares_equal_those_from_timm_attention_weights():
    model = _model()
    images = _images(1)
    grid = torch.randint(0, 3, (1, 4, 5))
    grid[0, 0, :3] = 255  # unlabelled patches take part in no class
    layer = 6
    captured = []
    attn = model.encoder.blocks[layer - 1].attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(images)
    handle.remove()
    weights = captured[0].mean(1)[0]  # [T, T], heads averaged
    key_mass = weights.mean(0)[1:]  # mean over queries; drop the class token key
    classes = grid.flatten()
    expected = torch.stack([key_mass[classes == c].sum() for c in range(3)]).double()
    attn.fused_attn = True
    stats = attention_balance(model, images, _patch_labels(grid), 3, layer=layer)
    base = stats["baseline"]
    assert stats["algm"] is None and stats["layers"] == [6]
    assert base["token_count"] == [int((classes == c).sum()) for c in range(3)]
    assert torch.allclose(torch.tensor(base["attention_mass"], dtype=torch.float64), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(base["attention_share"], dtype=torch.float64), expected / expected.sum(), atol=1e-5)


def test_padded_batch_equals_images_one_by_one():
    model = _model()
    images = _images(2)
    images[1] = torch.rand_like(images[1]) * 2 - 1  # noisy: merges far less than the smooth image
    labels = _patch_labels(torch.randint(0, 3, (2, 4, 5)))
    apply_algm(model, local_layer=1, global_layer=3, local_threshold=0.3, global_threshold=0.3)
    batch = attention_balance(model, images, labels, 3)
    state = algm_state(model)
    assert state.record.stage("global").mask is not None, "the two images should merge differently"
    single = aggregate_balance([attention_balance(model, images[i : i + 1], labels[i : i + 1], 3) for i in range(2)])
    for run in ("baseline", "algm"):
        assert batch[run]["token_count"] == single[run]["token_count"]
        assert batch[run]["attention_mass"] == pytest.approx(single[run]["attention_mass"], abs=1e-5)
        assert batch[run]["entropy"] == pytest.approx(single[run]["entropy"], abs=1e-5)
    assert batch["algm"]["mean_tokens"] < batch["baseline"]["mean_tokens"] == 20
    assert batch["layers"] == default_balance_layers(model) == [4, 5, 6]


def test_no_merging_gives_baseline_and_model_is_left_alone():
    model = _model()
    images, labels = _images(1), _patch_labels(torch.randint(0, 3, (1, 4, 5)))
    apply_algm(model, local_threshold=2.0, global_threshold=2.0)
    config = algm_state(model).config
    with torch.no_grad():
        before = model(images)
    stats = attention_balance(model, images, labels, 3, layer=[2, 6])
    assert stats["algm"]["attention_share"] == pytest.approx(stats["baseline"]["attention_share"], abs=1e-6)
    assert stats["algm"]["token_count"] == stats["baseline"]["token_count"]
    assert algm_state(model).config == config
    assert all(not block.norm1._forward_hooks for block in model.encoder.blocks)
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_merging_everything_concentrates_tokens():
    model = _model()
    images, labels = _images(1), _patch_labels(torch.zeros(1, 4, 5, dtype=torch.long))
    labels[:, :P, :P] = 1
    apply_algm(model, local_threshold=-2.0, global_threshold=-2.0)
    stats = attention_balance(model, images, labels, 3)
    algm = stats["algm"]
    assert stats["classes"] == [0, 1]
    assert sum(algm["token_count"]) == algm["mean_tokens"] < 20
    assert sum(algm["token_share"]) == pytest.approx(1.0)
    assert sum(algm["attention_share"]) == pytest.approx(1.0)


def test_other_engine_methods_are_measured_too():
    from algm_viz.methods import apply_method

    model = _model()
    images, labels = _images(1), _patch_labels(torch.randint(0, 3, (1, 4, 5)))
    apply_method(model, "tome", 2)  # ToMe computes attention through its own path (keys as metric)
    stats = attention_balance(model, images, labels, 3, layer=[3, 6])
    assert stats["algm"]["mean_tokens"] == 20 - 2 * 5  # r = 2 merged before layer 6 in each of layers 1..5
    assert sum(stats["algm"]["attention_share"]) == pytest.approx(1.0)


def test_summaries_known_answers():
    even = summarize({"images": 1, "num_tokens": 4, "token_count": [2, 2, 0], "attention_mass": [0.3, 0.3, 0.0]}, [0, 1])
    assert even["entropy"] == pytest.approx(math.log(2)) and even["gini"] == pytest.approx(0.0)
    assert even["entropy_normalized"] == pytest.approx(1.0) and even["attention_share"] == pytest.approx([0.5, 0.5, 0])
    skewed = summarize({"images": 1, "num_tokens": 4, "token_count": [3, 1, 0], "attention_mass": [0.6, 0.0, 0.0]}, [0, 1])
    assert skewed["entropy"] == pytest.approx(0.0) and skewed["gini"] == pytest.approx(0.5)
    assert skewed["token_share"] == pytest.approx([0.75, 0.25, 0.0])


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError):
        attention_balance(model, _images(1), torch.zeros(1, 10, 10, dtype=torch.long), 3)
    with pytest.raises(ValueError):
        attention_balance(model, _images(1), torch.zeros(1, 64, 80, dtype=torch.long), 3, layer=7)
    with pytest.raises(ValueError):
        attention_balance(model, _images(1), torch.full((1, 64, 80), 5), 3)
    with pytest.raises(ValueError):
        aggregate_balance([])


def test_cli_balance_aggregates_images(tmp_path, random_folder_data, tiny_official_model):
    import json

    from algm_viz.cli import main

    folder = tiny_official_model
    out = tmp_path / "balance.json"
    for labels in ("gt", "pred"):
        assert main(["balance", "--model", str(folder), "--data", str(random_folder_data), "--dataset", "folder",
                     "--classes", "a,b,c", "--tau", "0.2", "--labels", labels, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["images"] == 2 and result["algm"]["images"] == 2
        assert sum(result["baseline"]["token_count"]) <= 2 * 12
    assert out.with_suffix(".html").stat().st_size > 0
