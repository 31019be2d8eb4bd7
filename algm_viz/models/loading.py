"""The one place that turns a model name into a model, for the commands and the app alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .bundled import DEFAULT_MODEL, load_bundled
from .checkpoint import KNOWN_MODELS, load_segmenter
from .description import ModelInfo
from .segmenter import Segmenter, create_segmenter
from .variant import DEFAULT_LIMITS, ModelLimits, check_backbone

__all__ = ["load_model", "DEFAULT_MODEL", "UNTRAINED", "KINDS"]

#: The spec of random weights (``untrained:<timm backbone>`` names the backbone).
UNTRAINED = "untrained"
#: Prefixes that name a spec's kind outright (the app's keys); a spec without one is recognised by its form.
KINDS = ("bundled", "official", "path", UNTRAINED)


def load_model(spec: str, *, num_classes: int = 150, untrained: Mapping[str, Any] | None = None, seed: int = 0,
               limits: ModelLimits = DEFAULT_LIMITS, max_checkpoint_bytes: int | None = None) -> Segmenter:
    """The model ``spec`` names, in eval mode on the CPU, described by ``model.info``. ``spec`` is one of:

    * ``bundled:<name>`` or a bundled model name or folder (``assets/models/<name>``, with ``config.json``);
    * ``official:<name>`` or an official Segmenter checkpoint: a known name (``seg_tiny_mask``), a URL;
    * ``path:<folder>`` or a local folder in the official format (``checkpoint.pth`` + ``variant.yml``),
      read within ``limits`` and ``max_checkpoint_bytes``;
    * ``untrained`` or ``untrained:<timm backbone>``: random weights drawn from ``seed`` (the global random
      state is left as it was) with ``num_classes`` classes and ``untrained`` (more :func:`create_segmenter` arguments); a plain timm
      ViT name only (:func:`~.variant.check_backbone`), never pretrained.

    Raises ``ValueError`` for an unknown official name, ``FileNotFoundError`` for a name that is none of these.
    """
    kind, _, name = spec.partition(":")
    if kind == UNTRAINED:
        return _untrained(spec, name, num_classes, untrained or {}, seed)
    if kind == "bundled" and name:
        return load_bundled(name)
    if kind == "official":
        if name not in KNOWN_MODELS:
            raise ValueError(f"unknown official model {name!r}: choose one of {', '.join(KNOWN_MODELS)}")
        return load_segmenter(name)
    if kind == "path" and name:
        return load_segmenter(Path(name).expanduser(), limits=limits, max_checkpoint_bytes=max_checkpoint_bytes)
    if spec in KNOWN_MODELS or "://" in spec:
        return load_segmenter(spec)
    path = Path(spec).expanduser()
    if path.is_file() or (path / "variant.yml").is_file():
        return load_segmenter(path, limits=limits, max_checkpoint_bytes=max_checkpoint_bytes)
    try:
        return load_bundled(spec)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{spec!r} is not a bundled model, an official Segmenter checkpoint folder (checkpoint.pth + "
            f"variant.yml), a known name ({', '.join(KNOWN_MODELS)}), a URL, or untrained:<backbone>. {error}"
        ) from error


def _untrained(spec: str, backbone: str, num_classes: int, kwargs: Mapping[str, Any], seed: int) -> Segmenter:
    """Random weights from ``seed``."""
    arguments = {"num_classes": num_classes, **kwargs, "pretrained": False}
    if backbone:
        arguments["backbone"] = check_backbone(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_segmenter(**arguments)
    model.info = ModelInfo.untrained(model.num_classes, name=spec)
    return model.eval()
