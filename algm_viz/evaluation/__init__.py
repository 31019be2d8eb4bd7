"""Measure ALGM: segmentation quality, speed, FLOPs, thresholds, attention balance, token similarity.

Modules: :mod:`.metrics` (confusion matrix, mIoU), :mod:`.inference` (Segmenter-style single-scale
inference), :mod:`.sweep` (τ sweeps), :mod:`.distributed` (torchrun data parallelism),
:mod:`.calibrate` (automatic τ), :mod:`.balance` (attention balance), :mod:`.similarity` (paper Fig. 2),
:mod:`.tokens` (token classes and merge bookkeeping).
"""

from .balance import aggregate_balance, attention_balance
from .calibrate import calibrate, store_thresholds
from .inference import predict_logits, prepare
from .metrics import confusion_matrix, miou
from .similarity import similarity_analysis
from .sweep import SweepConfig, sweep

__all__ = [
    "SweepConfig",
    "aggregate_balance",
    "attention_balance",
    "calibrate",
    "confusion_matrix",
    "miou",
    "predict_logits",
    "prepare",
    "similarity_analysis",
    "store_thresholds",
    "sweep",
]
