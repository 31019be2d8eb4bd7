"""GPU correctness (run by ``algm-viz gpu-check``; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from algm_viz.evaluation.inference import predict_labels, predict_logits
from algm_viz.evaluation.gpu_check import compare_devices
from algm_viz.models.loading import load_model
from algm_viz.preprocess import read_image
from test_precision import HALF_PIXEL_AGREEMENT, HALF_RELATIVE_ERROR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_every_method_matches_the_cpu():
    bad = [row for row in compare_devices("camvid-vit-tiny", "cuda") if not row["ok"]]
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_within_the_stated_tolerance(dtype):
    model = load_model("camvid-vit-tiny").eval().cuda()
    image = read_image("assets/models/camvid-vit-tiny/test_image.png")
    reference = predict_logits(model, image, short_side=360, device="cuda")
    half = predict_logits(model, image, short_side=360, device="cuda", dtype=dtype)
    assert torch.isfinite(half).all()
    assert (half.argmax(0) == reference.argmax(0)).float().mean() >= HALF_PIXEL_AGREEMENT
    assert (half - reference).abs().mean() / reference.std() <= HALF_RELATIVE_ERROR


def test_cuda_label_path_equals_the_logits_path():
    model = load_model("camvid-vit-tiny").eval().cuda()
    image = read_image("assets/models/camvid-vit-tiny/test_image.png")
    logits = predict_logits(model, image, short_side=360, device="cuda")
    labels = predict_labels(model, image, short_side=360, device="cuda")
    assert labels.device.type == "cuda"
    assert (labels == logits.argmax(0)).float().mean() > 0.999
