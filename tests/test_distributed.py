"""Data-parallel sweep under torchrun (two CPU processes, gloo) equals the single-process sweep exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz.models import create_segmenter, save_segmenter

NET = {"backbone": "vit_tiny_patch16_384", "d_model": 64, "n_heads": 2, "n_layers": 6, "patch_size": 16, "image_size": 64,
       "n_cls": 3, "normalization": "vit", "d_ff": 256, "layer_norm_eps": 1e-6, "decoder": {"name": "mask_transformer", "n_layers": 2}}


def _data(root: Path, count: int = 5) -> Path:
    rng = np.random.default_rng(1)
    for i in range(count):
        label = cv2.resize(rng.integers(0, 3, (3, 4)).astype(np.uint8), (80, 64), interpolation=cv2.INTER_NEAREST)
        image = (rng.integers(0, 256, (3, 3))[label] + rng.normal(0, 10, (64, 80, 3))).clip(0, 255).astype(np.uint8)
        label[-2:] = 255
        for folder, array in (("images", image), ("labels", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / folder / f"{i}.png"), array)
    return root


def _sweep(command_prefix: list[str], model: Path, data: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same kernels (thread count) in both runs
    command = [*command_prefix, "-m", "algm_viz", "sweep", "--model", str(model), "--data", str(data),
               "--dataset", "folder", "--classes", "a,b,c", "--taus", "0.3", "--methods", "baseline,algm",
               "--warmup", "0", "--flops-images", "1", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_process_sweep_equals_single_process(tmp_path):
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64,
                             layer_norm_eps=1e-6).eval()
    folder = save_segmenter(model, tmp_path / "model", NET)
    data = _data(tmp_path / "data")
    single = _sweep([sys.executable], folder, data, tmp_path / "single.json")
    parallel = _sweep([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                      folder, data, tmp_path / "parallel.json")
    assert single["processes"] == 1 and parallel["processes"] == 2
    assert len(single["rows"]) == len(parallel["rows"]) == 2
    for one, two in zip(single["rows"], parallel["rows"]):
        assert (one["method"], one["local_threshold"]) == (two["method"], two["local_threshold"])
        assert one["images"] == two["images"] == 5
        assert one["confusion"] == two["confusion"]
        assert one["miou"] == two["miou"]
        assert one["tokens"] == two["tokens"]
    assert single["rows"][1]["tokens"]["global"] < single["rows"][0]["tokens"]["global"], "τ=0.3 should merge"
