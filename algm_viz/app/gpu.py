"""``spaces.GPU`` where the Hugging Face ``spaces`` package is installed (ZeroGPU Spaces), a no-op elsewhere."""

from __future__ import annotations

import importlib
import os
from typing import Callable, TypeVar

__all__ = ["gpu", "on_zero_gpu"]

F = TypeVar("F", bound=Callable)


def gpu(duration: int = 60) -> Callable[[F], F]:
    """Decorator: run the function on a ZeroGPU slice for at most ``duration`` seconds per call."""
    try:
        spaces = importlib.import_module("spaces")
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def on_zero_gpu() -> bool:
    """True on a ZeroGPU Space, where CUDA work is only allowed inside :func:`gpu` functions."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
