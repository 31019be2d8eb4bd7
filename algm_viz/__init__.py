"""algm-viz: see and measure ALGM token merging in Vision Transformers for semantic segmentation."""

from . import _compat  # noqa: F401  (makes timm importable next to a CPU-only torch)
from .merging import Merge, global_merge, local_merge
from .patch import ALGMConfig, MergeRecord, algm_state, apply_algm, remove_algm, set_thresholds

__version__ = "0.1.0"
__all__ = [
    "ALGMConfig",
    "Merge",
    "MergeRecord",
    "algm_state",
    "apply_algm",
    "global_merge",
    "local_merge",
    "remove_algm",
    "set_thresholds",
]
