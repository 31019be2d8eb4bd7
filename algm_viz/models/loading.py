"""One entry point for every kind of model the tools accept."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import KNOWN_MODELS, load_segmenter
from .segmenter import Segmenter, create_segmenter
from .variant import check_backbone

__all__ = ["load_model", "UNTRAINED_PREFIX"]

UNTRAINED_PREFIX = "untrained:"


def load_model(spec: str, num_classes: int = 150) -> Segmenter:
    """``spec`` is one of:

    * a bundled model name or folder (``assets/models/<name>``, with ``config.json``);
    * an official Segmenter checkpoint: a known name (``seg_tiny_mask``), URL, or local folder;
    * ``untrained:<timm backbone>``: random weights with ``num_classes`` classes (for trying things out);
      a plain timm ViT name only (:func:`~.variant.check_backbone`), never pretrained.
    """
    if spec.startswith(UNTRAINED_PREFIX):
        backbone = check_backbone(spec[len(UNTRAINED_PREFIX):] or "vit_tiny_patch16_384")
        return create_segmenter(backbone, num_classes=num_classes, pretrained=False).eval()
    if spec in KNOWN_MODELS or "://" in spec:
        return load_segmenter(spec)
    path = Path(spec).expanduser()
    if path.is_file() or (path / "variant.yml").is_file():
        return load_segmenter(path)
    from .bundled import load_bundled

    try:
        return load_bundled(spec)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{spec!r} is not a bundled model, an official Segmenter checkpoint folder (checkpoint.pth + "
            f"variant.yml), a known name ({', '.join(KNOWN_MODELS)}), a URL, or untrained:<backbone>. {error}"
        ) from error
