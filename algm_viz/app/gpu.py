"""``spaces.GPU`` where the Hugging Face ``spaces`` package is installed (ZeroGPU Spaces), a no-op elsewhere.

On ZeroGPU every decorated call reserves a GPU slice for a stated number of seconds; a call that runs
longer is killed, a call that asks for much more waits longer in the queue. :func:`forward_budget` turns
the work a request needs (forward passes × pixels) into such a duration, so each handler asks for what
its own request costs (``spaces.GPU`` accepts a callable that takes the handler's arguments).
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any, Callable, TypeVar

from PIL import Image

__all__ = ["gpu", "on_zero_gpu", "forward_budget", "image_pixels", "MAX_CALL_S"]

F = TypeVar("F", bound=Callable)

#: ZeroGPU's longest reservation for one call that this app asks for (seconds).
MAX_CALL_S = 120
#: Fixed cost of a call: moving the model's output to the CPU, drawing overlays, encoding pictures.
BASE_CALL_S = 5.0
#: A generous GPU time for one forward pass (model + merging + upsampling) per megapixel of input.
FORWARD_S_PER_MEGAPIXEL = 0.25


def gpu(duration: int | Callable[..., int] = 60) -> Callable[[F], F]:
    """Decorator: run the function on a ZeroGPU slice for at most ``duration`` seconds per call
    (an int, or a callable given the function's arguments that returns one)."""
    try:
        spaces = importlib.import_module("spaces")
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def on_zero_gpu() -> bool:
    """True on a ZeroGPU Space, where CUDA work is only allowed inside :func:`gpu` functions."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def image_pixels(path: Any, default: int = 1_000_000) -> int:
    """Pixel count of an uploaded image file from its header alone (no decoding); ``default`` if unreadable."""
    if not isinstance(path, (str, os.PathLike)) or not path:
        return default
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return default
    return width * height


def forward_budget(forwards: int, pixels: int) -> int:
    """Seconds to reserve for ``forwards`` forward passes on a ``pixels``-pixel image, within 1..MAX_CALL_S."""
    seconds = BASE_CALL_S + forwards * FORWARD_S_PER_MEGAPIXEL * max(pixels, 1) / 1e6
    return int(min(MAX_CALL_S, max(1, math.ceil(seconds))))
