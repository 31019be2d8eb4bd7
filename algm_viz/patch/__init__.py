"""Token merging in a timm plain ViT (or a model that holds one): the stages, the record, the surgery.

A patched ViT runs a list of merge stages (:mod:`.stages`: ALGM's CLAP and GBM, and the other reducers
the comparison needs: ToMe, Segformer++'s pooling, grid matching and key/value merging, CTS-style
sharing, clustering), all on the same :class:`~algm_viz.merging.Merge` objects, and after a forward its
state's :class:`MergeRecord` (:mod:`.record`) says what was merged, per image. :mod:`.surgery` puts the
stages in and takes them out (:func:`apply_merging`, :func:`remove_algm`, :func:`merging_disabled`);
:mod:`.algm` is the paper's configuration (:func:`apply_algm`: CLAP in block ``local_layer`` and GBM in
block ``global_layer``). Prefix tokens (class/register tokens) are never merged.

Two modes (``mode=``): ``"paper"`` (the default) follows the paper's text; ``"official"`` follows the
official ALGM code where it differs: ``>=`` comparisons, CLAP's output order, GBM's A/B partition over
the whole sequence (class token included) and, by default, GBM's online threshold
(``global_threshold="official"``, :data:`~algm_viz.merging.ONLINE`).
"""

from ..merging import ONLINE
from .algm import AUTHOR_DEFAULT_THRESHOLDS, algm_config, apply_algm, default_thresholds, set_thresholds
from .record import MergeRecord, compose, group_map, merge_before_layer
from .stages import (
    MODES,
    ALGMConfig,
    CLAPStage,
    ClusterPlanner,
    ClusterStage,
    GBMStage,
    GridStage,
    MergePlan,
    MergeStage,
    PlanContext,
    Pool2dStage,
    ShareStage,
    SharePolicy,
    ToMeStage,
)
from .state import ALGMState
from .surgery import (algm_state, apply_merging, apply_plan, find_vit, lengths_forced, merging_disabled, merging_restored,
                      remove_algm)

__all__ = [
    "AUTHOR_DEFAULT_THRESHOLDS",
    "MODES",
    "ONLINE",
    "ALGMConfig",
    "ALGMState",
    "CLAPStage",
    "ClusterPlanner",
    "ClusterStage",
    "GBMStage",
    "GridStage",
    "MergePlan",
    "MergeRecord",
    "MergeStage",
    "PlanContext",
    "Pool2dStage",
    "ShareStage",
    "SharePolicy",
    "ToMeStage",
    "algm_config",
    "algm_state",
    "apply_algm",
    "apply_merging",
    "apply_plan",
    "compose",
    "group_map",
    "default_thresholds",
    "find_vit",
    "lengths_forced",
    "merge_before_layer",
    "merging_disabled",
    "merging_restored",
    "remove_algm",
    "set_thresholds",
]
