"""Masked attention biases stay finite in half precision: padded keys take no attention weight, no row turns NaN,
and a padded batch equals its images run alone in float32, bfloat16 and float16."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import algm_viz
from algm_viz.attention import attend
from algm_viz.evaluation.inference import autocast
from algm_viz.methods import apply_method
from algm_viz.models import create_segmenter
from algm_viz.patch.state import MASKED_BIAS, ALGMState

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

#: Patches per token of a padded batch of two ``[B, T, 1]``: a prefix token, merged tokens, and two padded slots
#: (size 0) in the first image.
SIZE = torch.tensor([[1.0, 1.0, 3.0, 2.0, 0.0, 0.0], [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])[..., None]
PADDED = SIZE[..., 0] <= 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_masked_bias_survives_every_sum_the_engine_makes(dtype):
    """Stored in the dtype, cast from float32 (as autocast casts SDPA's mask), added to a score and to a second
    bias (a block's own mask): finite each time, and ``exp`` of it relative to a real score is exactly 0."""
    bias = torch.tensor(MASKED_BIAS, dtype=dtype)
    scores = torch.tensor([-1000.0, 0.0, 1000.0], dtype=dtype)
    for total in (bias, torch.tensor(MASKED_BIAS).to(dtype), bias + scores, bias + bias + scores):
        assert torch.isfinite(total).all(), (dtype, total)
    assert torch.exp((bias + scores - scores.max()).float()).max() == 0
    assert not torch.isfinite(torch.tensor(torch.finfo(torch.float32).min).to(torch.float16)), "why not fp32's min"


@pytest.mark.parametrize("prop_attn", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_biases_are_finite_and_padded_keys_get_no_weight(dtype, prop_attn):
    state = ALGMState([], num_prefix_tokens=1, prop_attn=prop_attn)
    token_bias = state.key_bias(SIZE, dtype)  # [B, 1, 1, T]
    state.size = SIZE
    k = v = torch.randn(2, 2, SIZE.shape[1], 8, dtype=dtype)
    _, _, kv_bias = state.merge_keys_values(1, torch.randn(2, SIZE.shape[1], 16), k.mean(1), k, v)  # no kv stage
    real_bias = SIZE[..., 0].clamp_min(1).log() if prop_attn else torch.zeros(SIZE.shape[:2])  # [B, T]
    for bias in (token_bias, kv_bias):
        assert bias.dtype == dtype and bias.shape == (2, 1, 1, SIZE.shape[1])
        assert torch.isfinite(bias).all() and torch.isfinite(bias + bias).all()
        assert (bias[:, 0, 0][PADDED] == torch.tensor(MASKED_BIAS, dtype=dtype)).all()
        scores = (torch.randn(2, 4, SIZE.shape[1]) * 30).to(dtype)  # [B, queries, T]
        weights = (scores + bias[:, 0]).float().softmax(-1)
        assert torch.isfinite(weights).all() and (weights[0][:, PADDED[0]] == 0).all()
        kept = ~PADDED[0]  # image 0 without its padding: the same weights on its real keys
        alone = (scores[0][:, kept] + bias[0, 0, 0, kept]).float().softmax(-1)
        torch.testing.assert_close(weights[0][:, kept], alone, atol=1e-6, rtol=1e-5)
    assert torch.equal(token_bias[:, 0, 0][~PADDED], real_bias[~PADDED].to(dtype))
    assert torch.equal(kv_bias[:, 0, 0][~PADDED], SIZE[..., 0][~PADDED].log().to(dtype))  # always log-size


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_over_padded_keys_equals_attention_without_them(dtype, fused):
    """Through :func:`attend`, fused (SDPA) and written out: image 0's padded keys change nothing."""
    torch.manual_seed(0)
    attn = SimpleNamespace(fused_attn=fused, scale=8 ** -0.5, attn_drop=nn.Dropout(0.0), training=False)
    q, k, v = (torch.randn(2, 2, SIZE.shape[1], 8).to(dtype) for _ in range(3))
    v[0, :, PADDED[0]] = 1e3  # padded values would show if they took any weight
    bias = ALGMState([], num_prefix_tokens=1).key_bias(SIZE, dtype)
    out = attend(attn, q, k, v, bias)
    kept = ~PADDED[0]
    alone = attend(attn, q[:1], k[:1, :, kept], v[:1, :, kept])
    assert torch.isfinite(out).all()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out[:1].float(), alone.float(), atol=tolerance, rtol=tolerance)


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=5, depth=6, embed_dim=64, num_heads=2, image_size=64).eval()


def _images() -> torch.Tensor:
    """Two scenes of one size that merge to different token counts: a smooth one and noise."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 3, 3, 4, generator=g), size=(96, 128), mode="bicubic", align_corners=False)
    return torch.cat([smooth, torch.randn(1, 3, 96, 128, generator=g)])


#: Mean absolute logit error, as a share of the reference logits' standard deviation, of a padded half-precision
#: batch against its images run alone in the same precision (padding must add nothing but rounding; measured at most
#: 1.3 % in bf16, 0.3 % in fp16) and against them in float32 (a random model, whose near-tied merge decisions flip
#: more readily than a trained one's: at most 2.4 % in bf16, 0.5 % in fp16; the bundled model: tests/test_precision.py).
HALF_PADDING_ERROR = 0.03
HALF_FP32_ERROR = 0.05


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().mean() / reference.std()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["algm", "algm_prop", "kv_grid"])
def test_a_padded_batch_equals_its_images_alone_in_half_precision(tiny_model, method, dtype):
    """Per-image adaptive merging pads the batch (ALGM, with and without the log-size bias; key/value merging's
    own bias as a control without padding); under autocast the logits stay finite and match the images run one
    at a time (float32: to 1e-4)."""
    algm_viz.remove_algm(tiny_model)
    apply_method(tiny_model, method, 0.5)
    images = _images()
    with torch.inference_mode():
        reference = torch.cat([tiny_model(images[i : i + 1]) for i in range(2)])
        with autocast("cpu", dtype):
            batched = tiny_model(images).float()
            size = algm_viz.algm_state(tiny_model).size
            alone = torch.cat([tiny_model(images[i : i + 1]) for i in range(2)]).float()
    padded = size is not None and bool((size <= 0).any())
    assert padded == method.startswith("algm"), f"{method}: padding expected only where merging is per image"
    assert torch.isfinite(batched).all(), f"{method} {dtype}: a masked bias turned into NaN or inf"
    if dtype == torch.float32:
        torch.testing.assert_close(batched, reference, atol=1e-4, rtol=1e-4)
    else:
        assert _relative_error(batched, alone) <= HALF_PADDING_ERROR, f"{method} {dtype} against itself alone"
        assert _relative_error(batched, reference) <= HALF_FP32_ERROR, f"{method} {dtype} against float32"
    algm_viz.remove_algm(tiny_model)
