"""Models that ship with the project, under ``assets/models/<name>/``: loaded with no network.

A bundled model is a folder with ``model.safetensors`` (fp16 weights) and ``config.json``:
``model`` (keyword arguments of :func:`create_segmenter`), ``class_names``, ``colors`` (RGB),
``normalization`` (mean/std), ``input_short_side`` (inputs are resized to this short side before the
model sees them), ``algm_thresholds`` ({"local", "global"}, calibrated τ = μ+σ, or null) and any
extra fields (e.g. ``training``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .description import ModelInfo, placeholder_names
from .segmenter import Segmenter, create_segmenter

__all__ = [
    "DEFAULT_MODEL",
    "ASSETS_DIR",
    "bundled_dir",
    "build_from_config",
    "save_bundled",
    "load_bundled",
    "read_bundled_config",
    "export_run",
    "prediction_digest",
]

#: The model the app and the CLI use when none is named.
DEFAULT_MODEL = "camvid-vit-tiny"
#: Where bundled models live: ``<repository>/assets/models``.
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "models"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def bundled_dir(name: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """The folder of a bundled model: ``name`` under :data:`ASSETS_DIR`, or ``name`` itself if it is a
    folder. Raises ``FileNotFoundError`` naming the models that exist when it is neither."""
    path = Path(name).expanduser()
    folder = path if (path / CONFIG).is_file() else ASSETS_DIR / str(name)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        known = sorted(p.name for p in ASSETS_DIR.glob("*") if (p / CONFIG).is_file()) if ASSETS_DIR.is_dir() else []
        raise FileNotFoundError(f"no bundled model {str(name)!r} (needs {CONFIG} and {WEIGHTS}); bundled: {known}")
    return folder


def read_bundled_config(name: str | os.PathLike = DEFAULT_MODEL) -> dict[str, Any]:
    """The ``config.json`` of a bundled model."""
    folder = bundled_dir(name)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{folder / CONFIG} has no 'model' mapping")
    return config


def build_from_config(model_config: dict[str, Any], **overrides: Any) -> Segmenter:
    """:func:`create_segmenter` from a stored ``model`` config (JSON lists become tuples); ``overrides``
    (e.g. ``drop_path_rate``) are passed on too."""
    kwargs = {**model_config, **overrides}
    size = kwargs.pop("image_size", 512)
    return create_segmenter(image_size=tuple(size) if isinstance(size, (list, tuple)) else int(size), **kwargs)


def save_bundled(
    model: Segmenter,
    folder: str | os.PathLike,
    *,
    config: dict[str, Any],
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    thresholds: Optional[dict[str, float]] = None,
    input_size: int,
    **extra: Any,
) -> Path:
    """Write ``model`` as a bundled model.

    Args:
        config: keyword arguments of :func:`create_segmenter` that rebuild ``model``.
        class_names, colors: one name and one RGB triple per class.
        thresholds: calibrated ``{"local", "global"}`` τ, or None (ALGM then uses the authors' defaults).
        input_size: the short side inputs are resized to before the model sees them.
        extra: more JSON-serialisable fields for ``config.json`` (e.g. ``training``).
    """
    if len(class_names) != model.num_classes or len(colors) != model.num_classes:
        raise ValueError(f"need {model.num_classes} class names and colours, got {len(class_names)} and {len(colors)}")
    if thresholds is not None and set(thresholds) != {"local", "global"}:
        raise ValueError(f"thresholds must have keys 'local' and 'global', got {sorted(thresholds)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    mean, std = model.mean_std
    document = {
        "model": dict(config),
        "class_names": list(class_names),
        "colors": [[int(c) for c in color] for color in colors],
        "normalization": {"name": model.normalization, "mean": list(mean), "std": list(std)},
        "input_short_side": int(input_size),
        "algm_thresholds": None if thresholds is None else {k: float(v) for k, v in thresholds.items()},
        **extra,
    }
    (folder / CONFIG).write_text(json.dumps(document, indent=2) + "\n")
    return folder


def load_bundled(name_or_folder: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a bundled model in fp32 on ``device``, in eval mode, described (``model.info``) by its config.json."""
    folder = bundled_dir(name_or_folder)
    config = read_bundled_config(folder)
    try:
        model = build_from_config(config["model"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
        model.info = _describe(folder.name, config, model.num_classes)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{folder} does not hold a model its config.json describes: {error}") from error
    return model.to(device).eval()


def _describe(name: str, config: dict[str, Any], num_classes: int) -> ModelInfo:
    """The :class:`ModelInfo` of a bundled model's ``config.json``; its fields other than the network's go to ``card``."""
    thresholds = config.get("algm_thresholds")
    short_side = config.get("input_short_side")
    known = {"model", "class_names", "colors", "normalization", "input_short_side", "algm_thresholds"}
    return ModelInfo(
        name=name,
        class_names=tuple(config.get("class_names") or placeholder_names(num_classes)),
        colors=tuple(tuple(int(v) for v in c) for c in config["colors"]) if config.get("colors") else None,
        short_side=int(short_side) if short_side is not None else None,
        thresholds={k: float(v) for k, v in thresholds.items()} if thresholds else None,
        card={k: v for k, v in config.items() if k not in known},
    )


def export_run(checkpoint: str | os.PathLike, folder: str | os.PathLike, thresholds: Optional[dict[str, float]] = None) -> Path:
    """Write a training run's ``best.pt`` (see :mod:`algm_viz.training`) as a bundled model."""
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build_from_config(data["model_config"])
    model.load_state_dict(data["model"])
    run = data["config"]
    training = {"epochs": run["epochs"], "best_epoch": data["epoch"], "val_miou": data["val_miou"],
                "dataset": run["dataset"], "train_split": run["train_split"], "val_split": run["val_split"],
                "train_sequences": run.get("train_sequences"), "val_sequences": run.get("val_sequences"),
                "shared_sequences": data.get("shared_sequences")}
    return save_bundled(model, folder, config=data["model_config"], class_names=data["class_names"],
                        colors=data["colors"], thresholds=thresholds, input_size=run["short_side"], training=training)


@torch.no_grad()
def prediction_digest(model: Segmenter, image: np.ndarray) -> dict[str, Any]:
    """Fingerprint of ``model``'s prediction on ``image`` (``[H, W, 3]`` uint8) as the tools make it
    (resized to ``model.info.short_side``, logits resized back): ``{"sha256"`` of the ``[H, W]`` uint8
    class map, ``"class_pixels"`` per class``}``."""
    from ..evaluation.inference import predict_logits

    classes = predict_logits(model, image, short_side=model.info.short_side).argmax(0).to(torch.uint8).cpu().numpy()
    counts = np.bincount(classes.ravel(), minlength=model.num_classes)
    return {"sha256": hashlib.sha256(np.ascontiguousarray(classes).tobytes()).hexdigest(),
            "shape": list(classes.shape), "class_pixels": [int(c) for c in counts]}
