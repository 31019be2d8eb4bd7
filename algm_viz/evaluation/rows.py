"""One result row of a τ sweep (the data set's, or one image's in the app): one type for every producer.

``to_dict`` gives the JSON/CSV form that :mod:`algm_viz.plots` draws and ``sweep.json`` files hold;
``from_dict`` reads it back (keys it does not know are kept in ``extra`` and written out again).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

__all__ = ["SweepRow"]

#: Optional keys left out of :meth:`SweepRow.to_dict` while None (older rows and the app's lack them).
_OMITTED_WHEN_NONE = ("flops_images", "stages", "thresholds_used", "images", "confusion", "miou_ci", "delta_miou",
                      "delta_miou_ci", "bootstrap", "varied")


@dataclass(kw_only=True)
class SweepRow:
    """One merging configuration measured over a set of images.

    Attributes:
        method: ``"baseline"`` or a name of :data:`algm_viz.methods.METHODS`.
        local_threshold, global_threshold: the CLAP / GBM τ of an ALGM variant (``"official"``: GBM's
            online τ), None for a stage that did not run or another method.
        knob, value: what the method's setting is (``"τ"``, ``"r"``, ...; None for the baseline) and its value
            (``"auto"``: the model's calibrated pair).
        miou: mIoU (%) against the labels (in the app: agreement with the baseline's prediction).
        per_class_iou: IoU (%) per class, None for a class absent from target and prediction.
        images_per_s, images_per_s_spread: median throughput and its ``[p25, p75]`` (None: one timing).
        gflops: per image; flops_images: over how many images it was averaged.
        tokens: ``{"patches", "local", "global", "final"}`` mean tokens per image (None: no such stage).
        stages: ``[{"name", "layer", "tokens", "threshold"}]`` of the token-reducing stages, in order.
        thresholds_used: ``{stage name: mean similarity threshold it merged with}``.
        images: images evaluated; confusion: ``[K, K]`` pooled confusion matrix.
        miou_ci, delta_miou, delta_miou_ci, bootstrap: see :func:`~algm_viz.evaluation.sweep.add_intervals`.
        varied: in a per-image curve, the stage whose τ varies (``"local"``/``"global"``).
        extra: keys of a stored row this version does not know.
    """

    method: str
    local_threshold: float | str | None = None
    global_threshold: float | str | None = None
    knob: str | None = None
    value: float | str | None = None
    miou: float
    per_class_iou: list[float | None]
    images_per_s: float
    images_per_s_spread: list[float] | None = None
    gflops: float
    flops_images: int | None = None
    tokens: dict[str, float | None]
    stages: list[dict[str, Any]] | None = None
    thresholds_used: dict[str, float] | None = None
    images: int | None = None
    confusion: list[list[int]] | None = None
    miou_ci: list[float] | None = None
    delta_miou: float | None = None
    delta_miou_ci: list[float] | None = None
    bootstrap: dict[str, Any] | None = None
    varied: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as plots, ``sweep.json`` and CSV files hold it (the optional keys only when set)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for key in _OMITTED_WHEN_NONE:
            if out[key] is None:
                del out[key]
        return {**out, **self.extra}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "SweepRow":
        """The row ``data`` (e.g. one of a stored ``sweep.json``'s ``rows``)."""
        names = {f.name for f in fields(SweepRow)} - {"extra"}
        return SweepRow(**{k: v for k, v in data.items() if k in names},
                        extra={k: v for k, v in data.items() if k not in names})
