"""Time a Segmenter with and without ALGM, side by side in one run (the work behind ``algm-viz bench``).

For the baseline and for ALGM at each τ: wall time per image (median and quartiles of repeated,
synchronised calls after warm-up, the configurations interleaved round by round) end to end (logits at the input size) and for the network alone
(``decoder_logits``: the logits before the final bilinear upsampling, a fixed cost that no FLOP count
includes), images/s, GFLOPs (attention counted), tokens after each stage, and the time spent in the
engine itself (similarities, index building, merge, unmerge) in the ``algm.*`` ranges (a wall clock on the CPU,
the profiler's device times on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from typing import Any, Iterator, Sequence

import cv2
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import read_image
from ..flops import count_gflops
from ..patch import algm_state, apply_algm, remove_algm
from ..preprocess import normalize
from ..timing import Timing, engine_clock, synchronize, time_call, time_once
from .sweep import AUTO

__all__ = ["describe", "engine_ms", "engine_share", "image_batch", "run_benchmark", "synthetic_scenes"]


def synthetic_scenes(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``[B, 3, H, W]`` piecewise-smooth images in [-1, 1], image ``i`` coarser than image ``i + 1``,
    so that images of one batch merge different numbers of tokens."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(batch):
        cells = 3 + 3 * (i % 6)
        coarse = torch.rand(1, 3, cells, cells * 4 // 3, generator=g) * 2 - 1
        image = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
        images.append(image + 0.02 * torch.randn(1, 3, height, width, generator=g))
    return torch.cat(images).clamp(-1, 1)


def image_batch(path: str, batch: int, height: int, width: int, mean_std: tuple) -> torch.Tensor:
    """``[B, 3, H, W]``: the image at ``path`` resized to ``(height, width)``, normalised, ``batch`` times."""
    image = cv2.resize(read_image(path), (width, height), interpolation=cv2.INTER_AREA)
    return normalize(image, *mean_std).expand(batch, -1, -1, -1).contiguous()


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Point file descriptor 2 at the null device for the duration: the profiler's native code writes
    ``profiler_start``/``profiler_stop`` lines there that no log level turns off. Python exceptions still
    propagate; anything else written to stderr meanwhile is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def engine_ms(model: nn.Module, images: torch.Tensor, forwards: int = 3) -> float:
    """Milliseconds per forward spent inside the engine's ``algm.*`` ranges (mean of ``forwards``): on the CPU by
    :func:`~algm_viz.timing.engine_clock` (wall time, no profiler: timed as the forward is), on CUDA by the
    profiler's device time of the ranges."""
    if images.device.type != "cuda":
        with engine_clock() as seconds:
            for _ in range(forwards):
                model(images)
        return 1e3 * sum(seconds.values()) / forwards
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with _quiet_native_stderr(), torch.profiler.profile(activities=activities) as profiler:
        for _ in range(forwards):
            model(images)
        synchronize(images.device)
    total_us = sum(event.device_time_total for event in profiler.key_averages() if event.key.startswith("algm."))
    return total_us / 1e3 / forwards


def engine_share(model: nn.Module, images: Sequence[torch.Tensor], repeats: int = 3) -> dict[str, float]:
    """The engine's share of ``model``'s forward as configured now, over ``images`` (``[1, 3, H, W]`` each, one
    device): ``{"forward_ms", "engine_ms", "engine_fraction"}``, the medians over the images of the forward's median
    time (:func:`~algm_viz.timing.time_call`, ``repeats`` calls after one warm-up), of :func:`engine_ms` over
    ``repeats`` forwards, and of their per-image ratio."""
    forward, engine = [], []
    for batch in images:
        forward.append(1e3 * time_call(lambda: model(batch), batch.device, repeats=repeats, warmup=1).median)
        engine.append(engine_ms(model, batch, forwards=repeats))
    return {"forward_ms": statistics.median(forward), "engine_ms": statistics.median(engine),
            "engine_fraction": statistics.median(e / f for e, f in zip(engine, forward))}


def describe(model: nn.Module, images: torch.Tensor, e2e: Timing, network: Timing) -> dict[str, Any]:
    """One row: timings per image, GFLOPs, tokens and engine time of ``model`` as configured now."""
    batch = images.shape[0]
    row: dict[str, Any] = e2e.as_dict(per=batch)
    row["images_per_s"] = batch / e2e.median
    row["network_ms_median"] = 1e3 * network.median / batch
    row["gflops"] = count_gflops(model, images) / batch
    state = algm_state(model)
    if state is not None:
        counts = state.record.token_counts()
        row["tokens"] = {name: float(c.float().mean()) for name, c in counts.items()}
        row["engine_ms"] = engine_ms(model, images) / batch
        row["engine_fraction"] = row["engine_ms"] / row["ms_median"]
    else:
        patch_h, patch_w = model.encoder.patch_embed.patch_size  # the Segmenter pads images to whole patches
        height, width = images.shape[-2:]
        row["tokens"] = {"patches": float(-(-height // patch_h) * -(-width // patch_w))}
    return row


def run_benchmark(
    model: nn.Module,
    images: torch.Tensor,
    taus: list[float | str],
    *,
    window: tuple[int, int] = (2, 2),
    global_layer: int = 5,
    repeats: int = 10,
    warmup: int = 3,
    compare_batch_min: bool = False,
) -> list[dict[str, Any]]:
    """Rows for the baseline, then ALGM at each τ (same τ for CLAP and GBM; ``"auto"``: the model's
    calibrated (local, global) pair). Each ALGM row's ``thresholds`` is the (local, global) pair it ran at.

    The configurations are timed side by side: each of the ``repeats`` rounds times one end-to-end and
    one network call of every configuration in turn, so that drifts of the machine hit all alike.
    """
    variants = [("algm", False)] + ([("algm-batch-min", True)] if compare_batch_min else [])
    configs = [("baseline", None, False)] + [(m, tau, b) for tau in taus for m, b in variants]

    def configure(method: str, tau: float | str | None, batch_min: bool) -> None:
        if method == "baseline":
            remove_algm(model)
        else:
            value = None if tau == AUTO else tau  # None: the model's calibrated τ
            apply_algm(model, window=window, global_layer=global_layer, local_threshold=value, global_threshold=value,
                       batch_min=batch_min)

    device = images.device
    samples: dict[tuple, tuple[list[float], list[float]]] = {config: ([], []) for config in configs}
    with torch.inference_mode():
        for config in configs:
            configure(*config)
            for _ in range(warmup):
                model(images)
        for _ in range(repeats):
            for config in configs:
                configure(*config)
                samples[config][0].append(time_once(lambda: model(images), device))
                samples[config][1].append(time_once(lambda: model.decoder_logits(images), device))
        rows = []
        for config in configs:
            configure(*config)
            e2e, network = (Timing.from_samples(s) for s in samples[config])
            state = algm_state(model)
            thresholds = None if state is None else [state.config.local_threshold, state.config.global_threshold]
            rows.append({"method": config[0], "tau": config[1], "thresholds": thresholds,
                         **describe(model, images, e2e, network)})
        remove_algm(model)
    baseline = rows[0]
    for row in rows[1:]:
        row["speedup"] = baseline["ms_median"] / row["ms_median"]
        row["network_speedup"] = baseline["network_ms_median"] / row["network_ms_median"]
        row["gflops_ratio"] = baseline["gflops"] / row["gflops"]
        row["speedup_over_gflops_ratio"] = row["speedup"] / row["gflops_ratio"]
        row["network_speedup_over_gflops_ratio"] = row["network_speedup"] / row["gflops_ratio"]
    if compare_batch_min:
        adaptive = {r["tau"]: r for r in rows if r["method"] == "algm"}
        for row in rows:
            if row["method"] == "algm-batch-min":
                row["adaptive_throughput_vs_this"] = adaptive[row["tau"]]["images_per_s"] / row["images_per_s"]
    return rows
