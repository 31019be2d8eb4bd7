"""Model surgery on timm ViTs and on Segmenter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import algm_viz
from algm_viz import algm_state, apply_algm, remove_algm, set_thresholds
from algm_viz.models import create_segmenter

import timm

TINY = dict(depth=6, embed_dim=64, num_heads=2)


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency images: neighbouring patch tokens are similar, so windows merge."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 3, 4, generator=g)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=64, num_classes=5, dynamic_img_size=True, **TINY)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def tiny_segmenter(decoder: str = "mask_transformer") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", decoder=decoder, num_classes=4, image_size=64, **TINY).eval()


VIT_VARIANTS = {
    "cls": {},
    "no_cls": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2},
}


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_no_merge_equals_baseline_timm(variant, fused):
    model = tiny_vit(**VIT_VARIANTS[variant])
    for block in model.blocks:
        block.attn.fused_attn = fused
    images = smooth_images(2, 80, 112)  # non-square, not the model's img_size
    with torch.no_grad():
        expected = model.forward_features(images)
        apply_algm(model, local_threshold=1.0, global_threshold=1.5)
        got = model.forward_features(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert algm_state(model).record.token_counts()["global"].tolist() == [35, 35]


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_no_merge_equals_baseline_segmenter(decoder):
    model = tiny_segmenter(decoder)
    images = smooth_images(2, 70, 100)
    with torch.no_grad():
        expected = model(images)
        apply_algm(model, local_threshold=1.0, global_threshold=1.0, prop_attn=True)
        got = model(images)
    assert got.shape == (2, 4, 70, 100)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_batch_gives_each_image_its_own_result(decoder):
    """Per-image adaptive merging: padding is masked, so a batch equals its images run alone."""
    model = apply_algm(tiny_segmenter(decoder), local_threshold=0.5, global_threshold=0.6)
    images = torch.cat([smooth_images(1, 96, 128, seed=0), torch.randn(1, 3, 96, 128)])
    with torch.no_grad():
        batched = model(images)
        counts = algm_state(model).record.token_counts()
        alone = torch.cat([model(images[i : i + 1]) for i in range(2)])
    assert counts["local"][0] < counts["local"][1], "test needs different merge counts"
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_merging_reduces_tokens_and_records_groups():
    model = apply_algm(tiny_segmenter(), local_threshold=0.3, global_threshold=0.3)
    with torch.no_grad():
        model(smooth_images(2, 96, 128))
    record = algm_state(model).record
    counts = record.token_counts()
    assert record.grid == (6, 8)
    assert (counts["local"] < 48).all() and (counts["global"] < counts["local"]).all()
    assert record.final.groups.shape == (2, 48)
    assert [(name, layer) for name, layer, _ in record.stages] == [("local", 1), ("global", 5)]


def test_mask_transformer_runs_on_merged_tokens_linear_on_unmerged():
    seen = {}
    for decoder in ("linear", "mask_transformer"):
        model = apply_algm(tiny_segmenter(decoder), local_threshold=0.3, global_threshold=0.3)
        model.decoder.register_forward_hook(lambda m, args, out, d=decoder: seen.__setitem__(d, args[0].shape[1]))
        with torch.no_grad():
            model(smooth_images(1, 96, 128))
        final_tokens = int(algm_state(model).record.token_counts()["global"][0])
        assert seen[decoder] == (48 if decoder == "linear" else final_tokens)
    assert seen["mask_transformer"] < 48


def test_prop_attn_changes_merged_output_only():
    model = apply_algm(tiny_segmenter(), local_threshold=0.3, global_threshold=0.3)
    images = smooth_images(1, 96, 128)
    with torch.no_grad():
        plain = model(images)
        apply_algm(model, local_threshold=0.3, global_threshold=0.3, prop_attn=True)
        proportional = model(images)
    assert not torch.allclose(plain, proportional)


def test_remove_restores_the_model():
    model = tiny_vit()
    original = type(model), [type(b) for b in model.blocks]
    images = smooth_images(1, 64, 64)
    with torch.no_grad():
        expected = model(images)
        apply_algm(model, local_threshold=0.0, global_threshold=0.0)
        merged = model(images)
        remove_algm(model)
        restored = model(images)
    assert not torch.allclose(merged, expected)
    assert (type(model), [type(b) for b in model.blocks]) == original
    assert algm_state(model) is None
    torch.testing.assert_close(restored, expected)


def test_thresholds_default_to_calibrated_then_authors():
    model = tiny_segmenter()
    model.info = dataclasses.replace(model.info, thresholds={"local": 0.77, "global": 0.66})
    apply_algm(model)
    assert (algm_state(model).config.local_threshold, algm_state(model).config.global_threshold) == (0.77, 0.66)
    set_thresholds(model, global_threshold=0.5)
    assert algm_state(model).config.global_threshold == 0.5
    vit_s = timm.create_model("vit_small_patch16_224", depth=6, num_classes=0)
    assert algm_viz.patch.default_thresholds(model) == {"local": 0.77, "global": 0.66}
    authors = algm_viz.patch.AUTHOR_DEFAULT_THRESHOLDS[384]
    assert algm_viz.patch.default_thresholds(vit_s) == {"local": authors, "global": authors}
    assert algm_state(apply_algm(vit_s)).config.local_threshold == authors


def test_batch_min_option_gives_equal_counts():
    model = apply_algm(tiny_segmenter(), local_threshold=0.5, global_threshold=0.6, batch_min=True)
    with torch.no_grad():
        model(torch.cat([smooth_images(1, 96, 128), torch.randn(1, 3, 96, 128)]))
    counts = algm_state(model).record.token_counts()
    assert counts["local"][0] == counts["local"][1] and counts["global"][0] == counts["global"][1]


def test_gbm_only_and_clap_only_variants():
    model = tiny_segmenter()
    with torch.no_grad():
        apply_algm(model, local_layer=None, global_layer=1, global_threshold=0.3)
        model(smooth_images(1, 96, 128))
        assert [n for n, _, _ in algm_state(model).record.stages] == ["global"]
        apply_algm(model, local_layer=1, global_layer=None, local_threshold=0.3)
        model(smooth_images(1, 96, 128))
        assert [n for n, _, _ in algm_state(model).record.stages] == ["local"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"local_layer": 0}, ValueError, "outside"),
        ({"global_layer": 7}, ValueError, "outside"),
        ({"local_layer": 3, "global_layer": 2}, ValueError, "before"),
        ({"local_threshold": float("nan")}, ValueError, "NaN"),
        ({"window": (2, 0)}, ValueError, "positive"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        apply_algm(tiny_segmenter(), **kwargs)


def test_non_vit_is_rejected():
    with pytest.raises(TypeError, match="plain ViT"):
        apply_algm(torch.nn.Linear(3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_runs(dtype):
    model = apply_algm(tiny_segmenter(), local_threshold=0.3, global_threshold=0.3).cuda().to(dtype)
    with torch.no_grad():
        out = model(smooth_images(2, 96, 128).cuda().to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["cls", "no_cls", "registers"])
def test_official_mode_runs_on_every_vit_variant_and_records_thresholds(variant):
    """The official mode on timm ViTs with a class token, without one and with registers: prefix tokens
    never merge, each image's GBM threshold is recorded, and a batch gives each image its own result."""
    model = tiny_vit(**VIT_VARIANTS[variant])
    images = smooth_images(2, 64, 96)
    with torch.no_grad():
        baseline_shape = model(images).shape
        apply_algm(model, 1, 3, local_threshold=0.5, global_threshold="official")
        out = model(images)
        record = algm_state(model).record
        thresholds = record.thresholds()
        alone = [model(images[i : i + 1]) for i in range(2)]
        single = [algm_state(model).record.thresholds()["global"]]
    assert out.shape == baseline_shape and [s.mode for s in algm_state(model).stages] == ["official", "official"]
    assert thresholds["local"].tolist() == pytest.approx([0.5, 0.5])
    assert thresholds["global"].shape == (2,) and torch.isfinite(thresholds["global"]).all()
    assert float(single[0][0]) == pytest.approx(float(thresholds["global"][1]), abs=1e-6)
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-4, rtol=0)
    remove_algm(model)


def test_paper_mode_records_its_fixed_thresholds():
    model = tiny_segmenter()
    apply_algm(model, local_threshold=0.7, global_threshold=0.8)
    with torch.no_grad():
        model(smooth_images(3, 64, 64))
    thresholds = algm_state(model).record.thresholds()
    assert thresholds["local"].tolist() == pytest.approx([0.7] * 3)
    assert thresholds["global"].tolist() == pytest.approx([0.8] * 3)
    remove_algm(model)
