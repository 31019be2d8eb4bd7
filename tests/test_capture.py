"""block_tokens: what a forward shows at a layer, and nothing left behind."""

from __future__ import annotations

import pytest
import torch

import algm_viz
from algm_viz.capture import ATTENTION_INPUT, MLP_INPUT, block_tokens
from algm_viz.models import create_segmenter
from algm_viz.patch import find_vit


def test_tokens_at_each_point_and_hooks_removed():
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=4, embed_dim=64, num_heads=2, image_size=64).eval()
    algm_viz.apply_algm(model, local_layer=1, global_layer=3, local_threshold=-2.0, global_threshold=-2.0)
    vit = find_vit(model)
    images = torch.randn(1, 3, 64, 64)  # 16 patches + class token
    seen: dict[tuple[str, int], torch.Tensor] = {}
    for point in (MLP_INPUT, ATTENTION_INPUT):
        record = lambda layer, tokens, point=point: seen.__setitem__((point, layer), tokens)  # noqa: E731
        with block_tokens(vit, [1, 3, 1], record, point):
            with torch.inference_mode():
                model(images)
    assert seen[(ATTENTION_INPUT, 1)].shape[1] == 17  # before CLAP
    assert seen[(MLP_INPUT, 1)].shape[1] == 1 + 4  # τ < -1: every 2×2 window merged in layer 1
    assert seen[(MLP_INPUT, 3)].shape[1] < seen[(ATTENTION_INPUT, 3)].shape[1]  # GBM between attention and MLP
    expected = vit.blocks[0].norm1(vit.norm_pre(vit._pos_embed(vit.patch_embed(images))))
    torch.testing.assert_close(seen[(ATTENTION_INPUT, 1)], expected)
    assert all(not block.norm1._forward_hooks and not block.norm2._forward_pre_hooks for block in vit.blocks)


def test_hooks_are_removed_when_the_forward_fails():
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=2, embed_dim=64, num_heads=2, image_size=64).eval()
    vit = find_vit(model)

    def fail(layer: int, tokens: torch.Tensor) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), block_tokens(vit, [2], fail):
        model(torch.randn(1, 3, 64, 64))
    assert not vit.blocks[1].norm2._forward_pre_hooks
    with pytest.raises(ValueError, match="point"):
        with block_tokens(vit, [1], fail, point="somewhere"):
            pass


def test_attention_helpers_match_timm_fused_and_written_out():
    """attention.attend honours ``fused_attn`` as timm does; attention_weights are timm's softmax weights."""
    from algm_viz.attention import attend, attention_weights, project_qkv

    torch.manual_seed(0)
    vit = find_vit(create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=1, embed_dim=64, num_heads=2,
                                    image_size=64).eval())
    attn, x = vit.blocks[0].attn, torch.randn(2, 9, 64)
    bias = torch.zeros(2, 1, 1, 9)
    bias[1, ..., -3:] = float("-inf")  # padding of the second image
    q, k, v = project_qkv(attn, x)
    outputs = []
    for fused in (True, False):
        attn.fused_attn = fused
        outputs.append(attend(attn, q, k, v, bias))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    weights = attention_weights(attn, x, bias)
    torch.testing.assert_close(weights @ v, outputs[0], atol=1e-5, rtol=1e-5)
    assert torch.all(weights[1, ..., -3:] == 0) and torch.allclose(weights.sum(-1), torch.ones(2, 2, 9))
    attn.fused_attn = True
    unbiased = attend(attn, q, k, v).transpose(1, 2).reshape(2, 9, 64)
    torch.testing.assert_close(attn.proj(attn.norm(unbiased)), attn(x), atol=1e-5, rtol=1e-5)  # timm's own forward
