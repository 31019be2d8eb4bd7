"""Fixtures and helpers shared by the tests: tiny models and data sets, synthetic images, the browser setup."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz.serving import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: F401 (the tests import them from here)
from algm_viz.models import create_segmenter, save_segmenter

#: :func:`create_segmenter` arguments of the app tests' untrained model: 6 layers of width 64, 8-pixel patches, 5 classes.
APP_TINY = dict(num_classes=5, depth=6, embed_dim=64, num_heads=2, decoder="linear", patch_size=8, image_size=64)
#: How long a page of the browser tests may take.
BROWSER_TIMEOUT_MS = 60_000

#: ``variant.yml`` net_kwargs of the tiny official-format model below.
TINY_NET = {"backbone": "vit_tiny_patch16_384", "d_model": 64, "n_heads": 2, "n_layers": 6, "patch_size": 16,
            "image_size": 64, "n_cls": 3, "d_ff": 256, "layer_norm_eps": 1e-6}


@pytest.fixture
def random_folder_data(tmp_path: Path) -> Path:
    """Two random 48×64 images with 3-class label maps in the folder layout (``images/``, ``labels/``)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(2):
        for folder, array in (("images", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
                              ("labels", rng.integers(0, 3, (48, 64), dtype=np.uint8))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / folder / f"{i}.png"), array)
    return root


@pytest.fixture
def tiny_official_model(tmp_path: Path) -> Path:
    """A random tiny Segmenter (3 classes) saved in the official checkpoint format; returns its folder."""
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, image_size=64,
                             layer_norm_eps=1e-6, mlp_ratio=4.0)
    return save_segmenter(model, tmp_path / "model", TINY_NET)


def tiny_registry(short_side: int = 64, **options):
    """The app's model registry on the CPU offering the untrained :data:`APP_TINY` model (no bundled model)."""
    from algm_viz.app.models import ModelRegistry

    return ModelRegistry(device="cpu", default_short_side=short_side, untrained=APP_TINY, include_bundled=False, **options)


def scene(height: int = 60, width: int = 90, seed: int = 0) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB: flat regions (which merge) plus noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (200, 60, 40)
    image[height // 2 :, : width // 3] = (30, 180, 60)
    return np.clip(image + rng.integers(0, 25, image.shape), 0, 255).astype(np.uint8)


def write(tmp_path: Path, name: str, array: np.ndarray) -> str:
    """Write an RGB image (or a 2-D label map) as ``tmp_path / name``; its path."""
    path = tmp_path / name
    cv2.imwrite(str(path), array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    return str(path)
