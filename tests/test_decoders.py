"""SETR and SegViT-ATM decoders on Segmenter, with and without ALGM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algm_viz import algm_state, apply_algm
from algm_viz.flops import count_gflops
from algm_viz.models import create_segmenter, load_segmenter, save_segmenter
from algm_viz.models.decoders import SETRNaive, SETRProgressive

NEW_DECODERS = ("setr_naive", "setr_pup", "atm")


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency images: neighbouring patch tokens are similar, so windows merge."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 3, 4, generator=g)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


def tiny_segmenter(decoder: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_segmenter(
        "vit_tiny_patch16_384", decoder=decoder, num_classes=4, image_size=64, depth=6, embed_dim=64, num_heads=2,
        **kwargs,
    ).eval()


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_logits_shape_with_and_without_merging(decoder):
    model = tiny_segmenter(decoder)
    images = smooth_images(2, 70, 100)  # 5x7 patch grid after padding
    with torch.no_grad():
        plain = model(images)
        apply_algm(model, local_threshold=0.3, global_threshold=0.3)
        merged = model(images)
    counts = algm_state(model).record.token_counts()
    assert (counts["global"] < 35).all(), "test needs merging"
    for logits in (plain, merged):
        assert logits.shape == (2, 4, 70, 100)
        assert torch.isfinite(logits).all()
    assert not torch.equal(merged, plain), "the decoder sees the merged tokens"


@pytest.mark.parametrize("decoder", NEW_DECODERS)
@pytest.mark.parametrize("prop_attn", [False, True])
def test_no_merge_equals_unpatched(decoder, prop_attn):
    model = tiny_segmenter(decoder)
    images = smooth_images(2, 70, 100)
    with torch.no_grad():
        expected = model(images)
        apply_algm(model, local_threshold=1.0, global_threshold=1.0, prop_attn=prop_attn)
        got = model(images)
    assert algm_state(model).record.token_counts()["global"].tolist() == [35, 35]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_batch_equals_images_alone_under_algm(decoder):
    """Per-image merging pads the merged tokens; ATM must mask the padding in its cross-attention."""
    model = apply_algm(tiny_segmenter(decoder), local_threshold=0.5, global_threshold=0.6, prop_attn=True)
    images = torch.cat([smooth_images(1, 96, 128, seed=0), torch.randn(1, 3, 96, 128)])
    with torch.no_grad():
        batched = model(images)
        counts = algm_state(model).record.token_counts()
        alone = torch.cat([model(images[i : i + 1]) for i in range(2)])
    assert counts["global"][0] < counts["global"][1], "test needs different merge counts"
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_where_unmerging_happens(decoder):
    """ATM runs on the merged tokens (unmerging after it); SETR gets the unmerged grid with its shape."""
    model = apply_algm(tiny_segmenter(decoder), local_threshold=0.3, global_threshold=0.3)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(tokens=args[0].shape[1], grid=kwargs["grid"], output=tuple(output.shape))

    model.decoder.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(smooth_images(2, 96, 128))
    final = algm_state(model).record.final
    assert seen["grid"] == (6, 8)
    if decoder == "atm":
        assert seen["tokens"] == final.num_out < 48
        assert seen["output"] == (2, final.num_out, 4)
    else:
        assert seen["tokens"] == 48
        scale = 16 if decoder == "setr_pup" else 1
        assert seen["output"] == (2, 4, 6 * scale, 8 * scale)


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_merging_saves_decoder_flops_only_after_unmerging(decoder):
    model = tiny_segmenter(decoder)
    images = smooth_images(1, 96, 128)

    def decoder_gflops() -> float:
        return count_gflops(model, images) - count_gflops(model.encoder, images)

    plain = decoder_gflops()
    apply_algm(model, local_threshold=0.3, global_threshold=0.3)
    merged = decoder_gflops()
    assert plain > 0
    if decoder == "atm":
        assert merged < plain
    else:
        assert merged == pytest.approx(plain, rel=1e-9)


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_merging_changes_the_output(decoder):
    model = tiny_segmenter(decoder)
    images = smooth_images(1, 96, 128)
    with torch.no_grad():
        plain = model(images)
        merged = apply_algm(model, local_threshold=0.3, global_threshold=0.3)(images)
    assert not torch.allclose(plain, merged, atol=1e-4)


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_every_decoder_parameter_is_trained(decoder):
    model = apply_algm(tiny_segmenter(decoder, dropout=0.1), local_threshold=0.3, global_threshold=0.3).train()
    labels = torch.randint(0, 4, (2, 70, 100))
    F.cross_entropy(model(smooth_images(2, 70, 100)), labels).backward()
    unused = [name for name, p in model.decoder.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused


@pytest.mark.parametrize(("patch_size", "stages", "scale"), [(16, 4, 16), (8, 4, 8), (16, 2, 4)])
def test_progressive_upsampling_is_capped_at_the_patch_size(patch_size, stages, scale):
    head = SETRProgressive(3, 32, channels=8, stages=stages, patch_size=patch_size).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 3 * 5, 32), grid=(3, 5))
    assert out.shape == (2, 3, 3 * scale, 5 * scale)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in head.modules()) == stages


def test_setr_needs_the_full_grid():
    with pytest.raises(ValueError, match="grid"):
        SETRNaive(3, 32)(torch.randn(1, 14, 32), grid=(3, 5))


def test_unknown_decoder_lists_the_choices():
    with pytest.raises(ValueError, match="setr_naive.*setr_pup.*atm"):
        tiny_segmenter("setr")


def test_merged_token_decoder_may_not_return_a_map():
    class MapOnMergedTokens(nn.Module):
        unmerge_before = False

        def forward(self, tokens, key_bias=None, *, grid):
            return tokens.new_zeros(tokens.shape[0], 4, *grid)

    model = tiny_segmenter("linear")
    model.decoder = MapOnMergedTokens()
    with pytest.raises(RuntimeError, match="merged tokens"):
        model(smooth_images(1, 64, 64))


@pytest.mark.parametrize("decoder", NEW_DECODERS)
def test_checkpoint_round_trip(decoder, tmp_path):
    model = tiny_segmenter(decoder)
    net_kwargs = {"backbone": "vit_tiny_patch16_384", "image_size": 64, "patch_size": 16, "d_model": 64,
                  "n_layers": 6, "n_heads": 2, "n_cls": 4, "layer_norm_eps": 1e-6, "decoder": {"name": decoder}}
    loaded = load_segmenter(save_segmenter(model, tmp_path, net_kwargs))
    images = smooth_images(1, 70, 100)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
