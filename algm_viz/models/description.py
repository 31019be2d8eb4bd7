"""What the tools know about a model beyond its weights: one typed description every loader sets.

Every :class:`~algm_viz.models.segmenter.Segmenter` carries one as ``model.info``; :func:`describe`
reads it from any module (a bare timm ViT gets a placeholder), so no caller reads loose attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

__all__ = ["ModelInfo", "describe", "placeholder_names"]


def placeholder_names(num_classes: int) -> tuple[str, ...]:
    """``("class 0", ..., "class K-1")``: the names of classes nobody named."""
    return tuple(f"class {i}" for i in range(num_classes))


@dataclass(frozen=True)
class ModelInfo:
    """A model's description.

    Attributes:
        name: how the model was asked for (a bundled name, a checkpoint name or folder, ``untrained:...``).
        class_names: one name per output class.
        colors: one RGB triple per class, or None (the renderer's palette).
        short_side: inputs are resized to this short side before the model sees them; None = not stated.
        thresholds: calibrated τ (μ+σ) for ``"local"`` and/or ``"global"``, or None (the authors' defaults apply).
        trained: False for random weights (the segmentation means nothing).
        card: further fields the model was shipped with (e.g. ``training``: epochs, validation mIoU).
    """

    name: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] | None = None
    short_side: int | None = None
    thresholds: Mapping[str, float] | None = None
    trained: bool = True
    card: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.colors is not None and len(self.colors) < len(self.class_names):
            raise ValueError(f"{self.name}: {len(self.colors)} colours for {len(self.class_names)} classes")
        if self.short_side is not None and self.short_side <= 0:
            raise ValueError(f"{self.name}: the input short side must be positive, got {self.short_side}")
        if self.thresholds is not None and not set(self.thresholds) <= {"local", "global"}:
            raise ValueError(f"{self.name}: thresholds are for 'local' and 'global', got {sorted(self.thresholds)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @staticmethod
    def untrained(num_classes: int, name: str = "untrained") -> "ModelInfo":
        """The description of random weights with ``num_classes`` unnamed classes."""
        return ModelInfo(name, placeholder_names(num_classes), trained=False)


def describe(model: nn.Module) -> ModelInfo:
    """``model.info``; for a module without one (e.g. a bare timm ViT) an untrained placeholder with its
    ``num_classes`` (0 when it has none)."""
    info = getattr(model, "info", None)
    return info if isinstance(info, ModelInfo) else ModelInfo.untrained(int(getattr(model, "num_classes", 0) or 0))
