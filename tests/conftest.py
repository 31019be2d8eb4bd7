"""Fixtures shared by the command tests."""

from __future__ import annotations

import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz.models import create_segmenter, save_segmenter

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
