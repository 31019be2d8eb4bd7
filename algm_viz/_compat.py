"""Make ``import timm`` work where torchvision's compiled ops cannot load.

The only torchvision wheel on PyPI for a given torch is CUDA-built. Next to a CPU-only torch its
``_C`` extension fails to load, and ``import torchvision`` then dies while registering fake kernels
for ``torchvision::nms``/``qnms`` (pytorch/vision#9085). timm imports torchvision, so it would fail
too. When (and only when) the extension does not load, we declare those two operator schemas
ourselves; torchvision then imports, and its compiled ops (unused by this project) stay unavailable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None


def _torchvision_ops_load() -> bool:
    """True when torchvision is absent or its compiled extension loads into this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    extension = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if extension is None:
        return True
    try:
        torch.ops.load_library(str(extension))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Declare torchvision's NMS schemas if its extension cannot load (idempotent)."""
    global _library
    if _library is not None or _torchvision_ops_load():
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


ensure_torchvision_importable()
