"""Half precision and devices: bf16/fp16 ALGM against fp32 on padded batches; every tensor the engine makes
follows its input's device."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import algm_viz
from algm_viz.evaluation.inference import autocast, predict_labels, predict_logits, prepare
from algm_viz.methods import METHODS, apply_method
from algm_viz.models import create_segmenter
from algm_viz.models.loading import load_model
from algm_viz.preprocess import read_image

#: Stated tolerance of half precision against fp32, baseline and ALGM alike: the share of pixels that keep their
#: class, and the mean absolute logit error as a share of the fp32 logits' standard deviation. Measured on the
#: bundled model (padded batch of two): baseline bf16 99.7 % / 0.3 %, ALGM bf16 97.6 % / 1.6 % (a τ decision
#: near the threshold flips with bf16's 8-bit mantissa), ALGM fp16 98.9 % / 0.5 %.
HALF_PIXEL_AGREEMENT = 0.96
HALF_RELATIVE_ERROR = 0.03


@pytest.fixture(scope="module")
def bundled_batch() -> tuple[torch.nn.Module, torch.Tensor]:
    """The bundled model and a batch of two different scenes, which merge to different token counts (padding)."""
    model = load_model("camvid-vit-tiny").eval()
    image = read_image("assets/models/camvid-vit-tiny/test_image.png")
    first = prepare(model, image, 360)
    second = first.flip(-1).clone()
    second[..., :, :200] = 0.0  # a flat region: many more merges than the first image
    return model, torch.cat([first, second])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_algm_stays_within_the_stated_tolerance(bundled_batch, dtype):
    model, images = bundled_batch
    with torch.inference_mode():
        for merging in (False, True):
            algm_viz.remove_algm(model)
            if merging:
                algm_viz.apply_algm(model)
            reference = model(images)
            counts = algm_viz.algm_state(model).record.token_counts() if merging else None
            with autocast("cpu", dtype):
                half = model(images).float()
            assert torch.isfinite(half).all(), "a masked attention bias turned into NaN in half precision"
            agreement = (half.argmax(1) == reference.argmax(1)).float().mean().item()
            assert agreement >= HALF_PIXEL_AGREEMENT, f"{dtype}, merging={merging}: {agreement:.3f} of pixels agree"
            relative_error = ((half - reference).abs().mean() / reference.std()).item()
            assert relative_error <= HALF_RELATIVE_ERROR, f"{dtype}, merging={merging}: {relative_error:.4f}"
            if merging:
                half_counts = algm_viz.algm_state(model).record.token_counts()
                assert not torch.equal(counts["global"][0], counts["global"][1]), "the batch must be padded"
                for stage in ("local", "global"):  # the same merges as fp32, image by image
                    assert (half_counts[stage] - counts[stage]).abs().max() <= 0.02 * counts[stage].max()
    algm_viz.remove_algm(model)


def test_predict_functions_take_a_dtype(bundled_batch):
    model, _ = bundled_batch
    image = read_image("assets/models/camvid-vit-tiny/test_image.png")
    logits = predict_logits(model, image, short_side=360, dtype=torch.bfloat16)
    assert logits.dtype == torch.float32 and logits.shape[-2:] == image.shape[:2]
    labels = predict_labels(model, image, short_side=360, dtype=torch.bfloat16)
    assert (labels == predict_logits(model, image, short_side=360).argmax(0)).float().mean() >= HALF_PIXEL_AGREEMENT


class DeviceGuard(TorchFunctionMode):
    """Records tensor factories called from algm_viz without a device: on a GPU they would make CPU tensors."""

    FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.eye, torch.rand,
                 torch.randn, torch.randint, torch.linspace, torch.as_tensor, torch.randperm}

    def __init__(self) -> None:
        super().__init__()
        self.offenders: set[tuple[str, str, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code
            if "algm_viz" in caller.co_filename.replace("\\", "/").split("/tests/")[0]:
                self.offenders.add((func.__name__, caller.co_filename.rsplit("algm_viz", 1)[-1], sys._getframe(1).f_lineno))
        return func(*args, **kwargs)


def test_every_method_creates_its_tensors_on_the_input_device():
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=5, depth=6, embed_dim=64, num_heads=2, image_size=64).eval()
    images = torch.randn(2, 3, 64, 96)
    guard = DeviceGuard()
    for name, method in METHODS.items():
        algm_viz.remove_algm(model)
        apply_method(model, name, method.values[len(method.values) // 2])
        with guard, torch.inference_mode():
            model(images)
    assert not guard.offenders, f"tensors made without the input's device: {sorted(guard.offenders)}"


def test_the_guard_catches_a_device_less_factory():
    guard = DeviceGuard()
    with guard:
        np.asarray(algm_viz.merging.window_index((4, 4), (2, 2)))  # device left to its default
    assert guard.offenders


def test_sweep_runs_in_half_precision(random_folder_data):
    """``SweepConfig(dtype=...)`` (``algm-viz sweep --dtype``): the forwards run under autocast and score
    like fp32 (a random model's predictions, so agreement is the check, not the mIoU itself)."""
    from algm_viz.datasets import open_dataset
    from algm_viz.evaluation.sweep import SweepConfig, sweep

    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64).eval()
    dataset = open_dataset("folder", random_folder_data, class_names=["a", "b", "c"])
    rows, computed_in = {}, set()
    model.encoder.blocks[0].mlp.register_forward_hook(lambda module, args, out: computed_in.add(out.dtype))
    for dtype in (None, torch.bfloat16):
        config = SweepConfig(taus=[0.9], methods=["baseline", "algm"], warmup=0, bootstrap=0, dtype=dtype)
        rows[dtype] = {row["method"]: row for row in sweep(model, dataset, config, progress=False)}
        assert computed_in == {dtype or torch.float32}, computed_in  # the forwards really ran in that precision
        computed_in.clear()
    for method in ("baseline", "algm"):
        confusion = {dtype: torch.as_tensor(rows[dtype][method]["confusion"]) for dtype in rows}
        predicted = {dtype: c.sum(0).double() / c.sum() for dtype, c in confusion.items()}  # share of each class
        assert torch.allclose(predicted[None], predicted[torch.bfloat16], atol=0.05), (method, predicted)


def test_the_app_runs_its_forwards_in_the_registry_precision(tmp_path):
    """``python app.py --dtype bf16``: every forward of an app session runs under autocast."""
    import cv2

    from algm_viz.app.models import ModelRegistry
    from algm_viz.app.session import SessionCache
    from algm_viz.app.ui import Handlers

    registry = ModelRegistry(device="cpu", default_short_side=64, include_bundled=False, dtype=torch.bfloat16,
                             untrained=dict(num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64))
    handlers = Handlers(registry, SessionCache(max_side=128), thresholds=(0.6, 1.0), with_gflops=False)
    entry = registry.get("untrained")
    computed_in: set[torch.dtype] = set()
    entry.model.encoder.blocks[0].mlp.register_forward_hook(lambda module, args, out: computed_in.add(out.dtype))
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    outputs = handlers.analyze("untrained", str(path), None, 0.8, 0.8, 2, 5, False)
    assert computed_in == {torch.bfloat16}
    readout = next(o for o in outputs if isinstance(o, dict))
    assert readout["tokens"] and 0.0 <= readout["agreement_miou"] <= 100.0  # a real analysis came back


def test_bench_runs_in_half_precision(capsys):
    """``algm-viz bench --dtype bf16`` casts the model and the images: the report says so, ALGM still merges and
    the half-precision forward is timed."""
    from algm_viz.cli import main

    assert main(["bench", "--backbone", "vit_tiny_patch16_384", "--num-classes", "3", "--size", "64", "96",
                 "--repeats", "1", "--warmup", "0", "--taus", "0.0", "--dtype", "bf16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bf16"
    baseline, merged = report["results"]
    assert merged["tokens"]["global"] < merged["tokens"]["local"] < baseline["tokens"]["patches"] == 24
    assert merged["gflops"] < baseline["gflops"] and merged["network_ms_median"] > 0
