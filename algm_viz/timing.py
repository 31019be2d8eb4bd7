"""Wall-clock timing of model calls: warm-up, CUDA synchronisation, median and spread.

:func:`time_call` times one call repeatedly (benchmarks); :func:`timed` times one call and keeps its result
(evaluation loops, the app), and :func:`rate_summary` summarises the rates such loops collect.
:func:`engine_range` marks the engine's own work in a forward (merging, clustering, unmerging) as an ``algm.*``
profiler range, and :func:`engine_clock` adds up the wall time spent in those ranges without the profiler.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

__all__ = ["Timing", "engine_clock", "engine_range", "time_call", "time_once", "timed", "rate_summary", "synchronize"]

T = TypeVar("T")

#: Seconds per engine range of the active :func:`engine_clock`, or None.
_ENGINE_SECONDS: ContextVar[dict[str, float] | None] = ContextVar("algm_engine_seconds", default=None)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call (or any samples): median and the 25th/75th percentiles (linear interpolation, as
    ``numpy.percentile``) over ``repeats`` samples."""

    median: float
    p25: float
    p75: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        """Median and quartiles of ``samples`` (seconds)."""
        if not samples:
            raise ValueError("no timing samples")
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], 1)
        quartiles = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), quartiles[0], quartiles[2], len(samples))

    def as_dict(self, per: int = 1) -> dict[str, float]:
        """Milliseconds per item when each call handled ``per`` items."""
        return {
            "ms_median": 1e3 * self.median / per,
            "ms_p25": 1e3 * self.p25 / per,
            "ms_p75": 1e3 * self.p75 / per,
            "repeats": self.repeats,
        }


def time_call(fn: Callable[[], object], device: torch.device | str, repeats: int = 10, warmup: int = 2) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls, synchronising ``device`` around each."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    return Timing.from_samples([time_once(fn, device) for _ in range(repeats)])


def time_once(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds for one synchronised call of ``fn()``."""
    return timed(fn, device)[1]


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
    summary = Timing.from_samples([float(rate) * scale for rate in rates])
    return {"median": summary.median, "p25": summary.p25, "p75": summary.p75, "samples": summary.repeats}


@contextmanager
def engine_range(name: str) -> Iterator[None]:
    """The profiler range ``algm.<name>`` around the engine's work, also timed by an active :func:`engine_clock`."""
    with torch.profiler.record_function(f"algm.{name}"):
        seconds = _ENGINE_SECONDS.get()
        if seconds is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def engine_clock() -> Iterator[dict[str, float]]:
    """While active, ``{range name: wall seconds}`` of the :func:`engine_range` work of this thread's forwards.

    A wall clock with no profiler attached, so the engine and the forward around it are timed alike (the
    profiler's per-operator cost falls mostly on the engine's many small operators). On CUDA, kernels run
    asynchronously and the wall time of a range is not theirs: use the profiler's device times there."""
    seconds: dict[str, float] = {}
    token = _ENGINE_SECONDS.set(seconds)
    try:
        yield seconds
    finally:
        _ENGINE_SECONDS.reset(token)
