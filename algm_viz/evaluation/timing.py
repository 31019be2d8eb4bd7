"""Per-batch timing for evaluation loops: one synchronised call at a time, summarised as median and spread.

(Repeated timing of one call, with warm-up, is :func:`algm_viz.timing.time_call`.)
"""

from __future__ import annotations

import time
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from ..timing import synchronize

__all__ = ["timed", "rate_summary"]

T = TypeVar("T")


def timed(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """``(fn(), seconds)`` with ``device`` synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def rate_summary(rates: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """``{"median", "p25", "p75", "samples"}`` of ``rates``, each multiplied by ``scale`` (NaN if empty)."""
    if not len(rates):
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "samples": 0}
    p25, median, p75 = np.percentile(np.asarray(rates, dtype=np.float64) * scale, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75), "samples": len(rates)}
