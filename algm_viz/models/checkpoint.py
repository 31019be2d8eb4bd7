"""Read and write Segmenter checkpoints in the official format, with a download cache.

The official format is a folder with ``checkpoint.pth`` (a dict whose ``"model"`` entry is the state
dict) and ``variant.yml`` (whose ``net_kwargs`` describe the network). Checkpoints are read with
``torch.load(..., weights_only=True)``: nothing in them is executed; ``variant.yml`` is untrusted input
checked by :mod:`.variant` before anything is built.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml
from tqdm.auto import tqdm

from .ade20k import ADE20K_CLASSES
from .description import ModelInfo, placeholder_names
from .segmenter import POS_EMBED_INTERPOLATIONS, Segmenter, create_segmenter, set_pos_embed_interpolation
from .variant import DEFAULT_LIMITS, CheckpointError, ModelLimits, NetSpec, check_budget, check_state_shapes, excerpt, read_variant

__all__ = ["KNOWN_MODELS", "load_segmenter", "save_segmenter", "fetch_checkpoint", "cache_dir", "CheckpointError"]

_OFFICIAL_ROOT = "https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints"

#: The official Segmenter ADE20K checkpoints (150 classes); mIoU and GFLOPs as the ALGM paper's Table 1.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "seg_tiny_mask": {"url": f"{_OFFICIAL_ROOT}/seg_tiny_mask", "dataset": "ade20k", "backbone": "ViT-Ti/16", "miou": 38.1, "gflops": 12.8},
    "seg_small_mask": {"url": f"{_OFFICIAL_ROOT}/seg_small_mask", "dataset": "ade20k", "backbone": "ViT-S/16", "miou": 45.3, "gflops": 38.6},
    "seg_base_mask": {"url": f"{_OFFICIAL_ROOT}/seg_base_mask", "dataset": "ade20k", "backbone": "ViT-B/16", "miou": 48.5, "gflops": 130},
    "seg_large_mask_640": {"url": f"{_OFFICIAL_ROOT}/seg_large_mask_640", "dataset": "ade20k", "backbone": "ViT-L/16", "miou": 51.8, "gflops": 672},
}
_FILES = ("checkpoint.pth", "variant.yml")


def cache_dir() -> Path:
    """Where downloads go: ``$ALGM_VIZ_CACHE``, else ``~/.cache/algm_viz``."""
    return Path(os.environ.get("ALGM_VIZ_CACHE", Path.home() / ".cache" / "algm_viz"))


def _download(url: str, target: Path, progress: bool, timeout: float) -> None:
    """Stream ``url`` to ``target`` (via a temporary file, renamed when complete) with a progress bar."""
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def fetch_checkpoint(url: str, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download ``checkpoint.pth`` and ``variant.yml`` from the folder ``url`` into the cache (once).

    Returns the local folder. Raises :class:`CheckpointError` with the reason when a file cannot be
    fetched (no network, an unknown host, no answer within ``timeout`` seconds, ...).
    """
    url = url.rstrip("/")
    name = Path(urlparse(url).path).name or "checkpoint"
    folder = cache_dir() / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for file in _FILES:
            if not (folder / file).exists():
                _download(f"{url}/{file}", folder / file, progress, timeout)
    except (OSError, ValueError) as error:  # URLError, HTTPError and timeouts are OSErrors
        if not any(folder.iterdir()):
            folder.rmdir()
        raise CheckpointError(f"could not download {url}/{file}: {error}") from error
    return folder


def _resolve(path_or_url: str | os.PathLike) -> Path:
    text = str(path_or_url)
    if text in KNOWN_MODELS:
        return fetch_checkpoint(KNOWN_MODELS[text]["url"])
    if urlparse(text).scheme in ("http", "https", "file"):
        return fetch_checkpoint(text)
    path = Path(text).expanduser()
    folder = path.parent if path.is_file() else path
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a Segmenter checkpoint folder: missing {', '.join(missing)}")
    return folder


def _build(spec: NetSpec) -> Segmenter:
    try:
        return create_segmenter(**spec.create_kwargs())
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"variant.yml does not describe a supported Segmenter: {excerpt(str(error), 200)}") from error


def _check_unpacked_size(path: Path, max_bytes: int) -> None:
    """Refuse a zip ``checkpoint.pth`` (torch's format) whose members unpack to more than ``max_bytes``: torch
    reads deflated members too, so a file of a few hundred KB could otherwise fill gigabytes (a zip bomb).
    The sizes come from the archive's directory, before anything is unpacked."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: tensors are read as stored, bounded by the file's size
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint.pth could not be read safely: {excerpt(str(error), 200)}") from None
    if unpacked > max_bytes:
        raise CheckpointError(f"checkpoint.pth unpacks to {unpacked / 2**20:,.0f} MiB, more than the "
                              f"{max_bytes / 2**20:,.0f} MiB accepted here")


def _read_state(path: Path, map_location: str | torch.device, max_bytes: int | None) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint.pth`` (its ``"model"`` entry, or the file's dict itself), read with
    ``weights_only=True``; refused without reading when the file, or what its zip members unpack to, is
    larger than ``max_bytes``."""
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"checkpoint.pth is {size / 2**20:,.0f} MiB, more than the {max_bytes / 2**20:,.0f} MiB "
                              "accepted here")
    if max_bytes is not None:
        _check_unpacked_size(path, max_bytes)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle/zip errors come in many types
        raise CheckpointError(f"checkpoint.pth could not be read safely: {excerpt(str(error), 200)}") from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint.pth holds no state dict")
    return state


def _official_to_local(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Segmenter names -> this model's (identical except for the unused classifier head)."""
    return {k: v for k, v in state.items() if not k.startswith("encoder.head.")}


def load_segmenter(path_or_url: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                   limits: ModelLimits = DEFAULT_LIMITS, max_checkpoint_bytes: int | None = None,
                   pos_embed_interpolation: str = "bicubic") -> Segmenter:
    """Load a Segmenter from a known model name, a URL, or a local folder/``checkpoint.pth``.

    Nothing is allocated for the network before ``variant.yml`` passed :func:`~.variant.read_variant`,
    its dimensions ``limits`` (bounds and the parameter/activation budget) and the state dict's shapes;
    ``checkpoint.pth`` larger than ``max_checkpoint_bytes`` is refused unread. Raises
    :class:`CheckpointError` with a clear message for anything that is not such a checkpoint.
    ``pos_embed_interpolation="bilinear"`` resizes the position embedding as the official Segmenter code
    does (to reproduce its logits at other input sizes; see :func:`~.segmenter.set_pos_embed_interpolation`).
    """
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}")
    folder = _resolve(path_or_url)
    variant = read_variant(folder / "variant.yml")
    spec = NetSpec.from_net_kwargs(variant["net_kwargs"], limits)
    check_budget(spec, limits)
    state = _official_to_local(_read_state(folder / "checkpoint.pth", map_location, max_checkpoint_bytes))
    check_state_shapes(spec, state)
    model = _build(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint.pth does not fit variant.yml: {excerpt(str(error), 300)}") from error
    model.info = _describe(str(path_or_url), variant, model.num_classes)
    return set_pos_embed_interpolation(model, pos_embed_interpolation).eval()


def _describe(name: str, variant: dict[str, Any], num_classes: int) -> ModelInfo:
    """What a checkpoint says of itself: calibrated τ from ``variant.yml``'s ``algm_thresholds``; the ADE20K
    class names for an official ADE20K checkpoint (:data:`KNOWN_MODELS`), else placeholders. Inputs keep
    their size (official checkpoints state none)."""
    thresholds = variant.get("algm_thresholds")
    ade20k = KNOWN_MODELS.get(name, {}).get("dataset") == "ade20k" and num_classes == len(ADE20K_CLASSES)
    try:
        calibrated = {str(k): float(v) for k, v in thresholds.items()} if isinstance(thresholds, dict) else None
        return ModelInfo(name, ADE20K_CLASSES if ade20k else placeholder_names(num_classes), thresholds=calibrated)
    except (TypeError, ValueError):
        raise CheckpointError(f"variant.yml: algm_thresholds must map 'local'/'global' to numbers, got {excerpt(thresholds)}") from None


def save_segmenter(model: Segmenter, folder: str | os.PathLike, net_kwargs: dict[str, Any], **extra: Any) -> Path:
    """Write ``model`` in the official format (``net_kwargs`` as ``variant.yml`` describes it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, folder / "checkpoint.pth")
    (folder / "variant.yml").write_text(yaml.safe_dump({"net_kwargs": net_kwargs, **extra}, sort_keys=False))
    return folder
