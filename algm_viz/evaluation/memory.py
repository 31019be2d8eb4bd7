"""Peak host memory of one prediction: class logits at full resolution vs the tiled label path.

Each case runs in a fresh (spawned) process, so that one case's allocator cache cannot hide another's
peak: the child builds the model, runs one small warm-up, reads its resident memory, predicts, and reports
the growth of its peak resident memory (``ru_maxrss``) over that level. CPU only (CUDA memory has its own
counters, ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import multiprocessing
import resource
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["MemoryCase", "peak_prediction_memory"]


@dataclass(frozen=True)
class MemoryCase:
    """One prediction to measure: ``path`` is ``"logits"`` (``predict_logits``) or ``"labels"``
    (``predict_labels``); ``tau`` None runs the baseline, else ALGM with that τ for both stages."""

    backbone: str
    num_classes: int
    height: int
    width: int
    path: str
    tau: float | None = None
    threads: int = 1


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(case: MemoryCase) -> dict[str, Any]:
    from .. import apply_algm
    from ..models import create_segmenter
    from .inference import predict_labels, predict_logits

    torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    model = create_segmenter(case.backbone, num_classes=case.num_classes, image_size=min(case.height, case.width)).eval()
    if case.tau is not None:
        apply_algm(model, local_threshold=case.tau, global_threshold=case.tau)
    predict = {"logits": lambda im: predict_logits(model, im).argmax(0), "labels": lambda im: predict_labels(model, im)}[case.path]
    image = np.random.default_rng(0).integers(0, 256, (case.height, case.width, 3), dtype=np.uint8)
    predict(image[:64, :64])
    before = _rss_mb()
    labels = predict(image)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**asdict(case), "rss_before_mb": round(before, 1), "peak_growth_mb": round(peak - before, 1),
            "labels_shape": list(labels.shape)}


def peak_prediction_memory(case: MemoryCase) -> dict[str, Any]:
    """The case's fields plus ``rss_before_mb`` and ``peak_growth_mb`` (peak resident memory of the
    prediction over the warmed-up process), measured in a fresh process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (case,))
