"""Merging on a short video: frames read within bounds, the baseline and ALGM forward per frame, the
temporal stability of merge groups and predictions, and the rendered output clip.

Frames are read from a video file with OpenCV (``cv2.VideoCapture``: whatever its FFmpeg reads, e.g. mp4, webm,
avi) or from a ``.zip`` of image frames (:mod:`.frame_zip`: in memory, natural order, bounded), both by
:func:`read_clip`, and written as H.264 MP4 with PyAV (every current browser plays it), else VP8 WebM.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from . import render
from .animation import CODECS, caption_frame, write_clip
from .frame_zip import ZIP_FPS, ZipFramesError, ZipLimits, is_zip, list_frames, read_frames
from .evaluation.inference import class_argmax, default_short_side, prepare, resized_shape
from .patch import algm_state, apply_algm, group_map, merging_restored, remove_algm
from .timing import timed

__all__ = ["VideoError", "VideoLimits", "VideoInfo", "Clip", "FrameResult", "probe", "read_clip", "analyze_frames",
           "group_changes", "class_changes", "stability", "render_frame", "write_video", "CODECS"]


class VideoError(ValueError):
    """A video that cannot be read or lies outside the bounds; the message says which and why."""


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on the work of one clip: frames analysed (after the ``stride``), seconds of video (a video file's;
    a zip of frames is bounded by ``archive`` instead), pixels per frame, and the stride (every ``stride``-th
    frame is analysed)."""

    max_frames: int = 48
    max_seconds: float = 30.0
    max_pixels: int = 1920 * 1080
    stride: int = 1
    archive: ZipLimits = ZipLimits()

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_seconds <= 0 or self.max_pixels < 1:
            raise ValueError(f"video limits must be positive, got {self}")
        if not isinstance(self.stride, (int, np.integer)) or not 1 <= self.stride <= 1000:
            raise ValueError(f"the frame stride must be a whole number in 1..1000, got {self.stride!r}")

    def describe(self) -> str:
        """The bounds in words (shown in the app)."""
        return (f"at most {self.max_seconds:g} s of video, {self.max_frames} analysed frames (every stride-th frame) "
                f"and {self.max_pixels / 1e6:.1f} megapixels per frame")


@dataclass(frozen=True)
class VideoInfo:
    """What the file's header says: ``frames`` (0 when it does not say), ``fps``, ``width``, ``height`` (0 when
    unknown: a zip's frames are not decoded by :func:`probe`)."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps if self.fps > 0 else math.nan


@dataclass
class Clip:
    """Frames read from a video or a zip of frames: ``frames`` ``[H, W, 3]`` uint8 RGB (every ``stride``-th),
    their ``fps``, and ``notes`` on what reading changed (a zip's skipped members, resized frames)."""

    frames: list[np.ndarray]
    fps: float
    stride: int
    info: VideoInfo
    notes: list[str] = field(default_factory=list)

    @property
    def output_fps(self) -> float:
        """Frame rate that keeps the clip's duration when only every ``stride``-th frame is shown."""
        return max(self.fps / self.stride, 1.0)


def _open(path: str | Path) -> cv2.VideoCapture:
    name = Path(path).name
    if not Path(path).is_file():
        raise VideoError(f"{name}: no such file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{name} is not a video this app can read (corrupt file or unsupported format)")
    return capture


def _info(capture: cv2.VideoCapture) -> VideoInfo:
    def number(prop: int) -> float:
        value = capture.get(prop)
        return value if math.isfinite(value) and value > 0 else 0.0

    return VideoInfo(int(number(cv2.CAP_PROP_FRAME_COUNT)), number(cv2.CAP_PROP_FPS),
                     int(number(cv2.CAP_PROP_FRAME_WIDTH)), int(number(cv2.CAP_PROP_FRAME_HEIGHT)))


def probe(path: str | Path, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """The header of the video at ``path`` (no frame decoded), or of a ``.zip`` of frames (its image count,
    :data:`~.frame_zip.ZIP_FPS`, size unknown: 0 × 0); :class:`VideoError` if it is neither."""
    if is_zip(path):
        try:
            images, _ = list_frames(path, limits.archive)
        except ZipFramesError as error:
            raise VideoError(str(error)) from None
        return VideoInfo(len(images), ZIP_FPS, 0, 0)
    capture = _open(path)
    try:
        return _info(capture)
    finally:
        capture.release()


def _check_bounds(name: str, info: VideoInfo, limits: VideoLimits) -> None:
    if info.width * info.height > limits.max_pixels:
        raise VideoError(f"{name} is {info.width}×{info.height} pixels a frame; at most "
                         f"{limits.max_pixels / 1e6:.1f} megapixels are accepted: refused")
    if info.frames and info.fps and info.seconds > limits.max_seconds:
        raise VideoError(f"{name} lasts {info.seconds:.1f} s; at most {limits.max_seconds:g} s are accepted: refused")
    if info.frames and -(-info.frames // limits.stride) > limits.max_frames:
        needed = -(-info.frames // limits.max_frames)
        raise VideoError(f"{name} has {info.frames} frames: with stride {limits.stride} that is "
                         f"{-(-info.frames // limits.stride)} to analyse, over the {limits.max_frames} accepted; "
                         f"use a stride of at least {needed} or a shorter clip")


def _check_fps(fps: float | None) -> None:
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0.1 <= fps <= 240):
        raise VideoError(f"the frame rate must be a number in 0.1..240 frames per second, got {str(fps)[:20]}")


def _read_zip(path: str | Path, limits: VideoLimits, fps: float | None) -> Clip:
    try:
        read = read_frames(path, stride=limits.stride, max_frames=limits.max_frames, max_pixels=limits.max_pixels,
                           limits=limits.archive)
    except ZipFramesError as error:
        raise VideoError(str(error)) from None
    rate = float(fps or ZIP_FPS)
    height, width = read.frames[0].shape[:2]
    return Clip(read.frames, rate, limits.stride, VideoInfo(read.images, rate, width, height), read.notes)


def read_clip(path: str | Path, limits: VideoLimits = VideoLimits(), fps: float | None = None) -> Clip:
    """Every ``limits.stride``-th frame of the video, or of the ``.zip`` of image frames
    (:func:`~.frame_zip.read_frames`), at ``path`` as RGB. ``fps``: the frames' rate (the output clip's, times
    the stride); None takes the video header's (25 where it has none) or :data:`~.frame_zip.ZIP_FPS` for a zip.

    Raises :class:`VideoError` for a file that is no readable video or zip of frames or has no frame, and for
    one beyond ``limits`` (checked from the header or the zip's directory before decoding, and again while
    reading, as headers may be wrong).
    """
    _check_fps(fps)
    if is_zip(path):
        return _read_zip(path, limits, fps)
    name = Path(path).name
    capture = _open(path)
    try:
        info = _info(capture)
        _check_bounds(name, info, limits)
        frames: list[np.ndarray] = []
        index = 0
        while True:
            if not capture.grab():
                break
            if index % limits.stride == 0:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    break
                if frame.shape[0] * frame.shape[1] > limits.max_pixels:
                    raise VideoError(f"{name} has {frame.shape[1]}×{frame.shape[0]}-pixel frames; at most "
                                     f"{limits.max_pixels / 1e6:.1f} megapixels are accepted: refused")
                if len(frames) == limits.max_frames:
                    raise VideoError(f"{name} has more than {limits.max_frames} frames to analyse at stride "
                                     f"{limits.stride}: use a larger stride or a shorter clip")
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else
                              cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB))
            index += 1
            if info.fps and index / info.fps > limits.max_seconds:
                raise VideoError(f"{name} lasts more than {limits.max_seconds:g} s: refused")
    finally:
        capture.release()
    if not frames:
        raise VideoError(f"{name} holds no frame this app can decode (corrupt file or unsupported codec)")
    return Clip(frames, float(fps or info.fps or 25.0), limits.stride, info)


@dataclass
class FrameResult:
    """One frame: the model input ``image`` ``[H, W, 3]`` uint8, the predictions ``[H, W]`` int16 (``baseline``
    None where the baseline did not run), ALGM's final token of each patch ``groups`` ``[gh, gw]`` and ``merged``
    ``[gh, gw]`` bool (the patch's token holds several patches), ``tokens`` after each stage, and the forwards'
    wall times in seconds."""

    image: np.ndarray
    baseline: np.ndarray | None
    algm: np.ndarray
    groups: np.ndarray
    merged: np.ndarray
    tokens: dict[str, int]
    baseline_s: float | None
    algm_s: float


def _forward(model: nn.Module, tensor: torch.Tensor) -> tuple[np.ndarray, float]:
    """``[1, 3, H, W]`` -> (``[H, W]`` int16 class map, seconds of the forward itself, the arg-max excluded)."""
    logits, seconds = timed(lambda: model(tensor), tensor.device)
    return class_argmax(logits)[0].to(torch.int16).cpu().numpy(), seconds


def analyze_frames(model: nn.Module, frames: Sequence[np.ndarray], algm: Mapping[str, Any], *,
                   short_side: int | None = None, device: torch.device | str = "cpu",
                   step: Callable[[int, int], ContextManager[Any]] | None = None,
                   baseline: bool = True) -> list[FrameResult]:
    """The baseline (unless ``baseline`` is False) and the ALGM forward (``apply_algm(model, **algm)``) of each
    ``[H, W, 3]`` uint8 frame, resized so its short side is ``short_side`` (default: the model's).
    ``step(done, total)`` wraps each frame's work (a lock, a progress bar, a time budget that raises to stop).
    The model's merging is restored afterwards."""
    short_side = short_side or default_short_side(model)
    results = []
    with merging_restored(model), torch.inference_mode():
        for done, frame in enumerate(frames):
            height, width = resized_shape(*frame.shape[:2], short_side)
            shown = frame if (height, width) == frame.shape[:2] else cv2.resize(frame, (width, height),
                                                                                 interpolation=cv2.INTER_AREA)
            with step(done, len(frames)) if step is not None else nullcontext():
                tensor = prepare(model, shown, None, device)
                reference, reference_s = None, None
                if baseline:
                    remove_algm(model)
                    reference, reference_s = _forward(model, tensor)
                apply_algm(model, **algm)
                merged_prediction, algm_s = _forward(model, tensor)
                record = algm_state(model).record
            grid = record.grid
            groups = group_map(record, record.final)
            counts = {name: int(value[0]) for name, value in record.token_counts().items()}
            tokens = {"patches": grid[0] * grid[1], "local": counts.get("local", grid[0] * grid[1])}
            tokens["global"] = counts.get("global", tokens["local"])
            results.append(FrameResult(shown, reference, merged_prediction, groups, render.merged_mask(groups), tokens,
                                       reference_s, algm_s))
    return results


def group_changes(before: np.ndarray, after: np.ndarray) -> float:
    """Share of patches whose merge group (the set of patches sharing its token) differs between two frames'
    ``[gh, gw]`` token maps (token ids need not match across frames: only membership counts)."""
    before, after = np.asarray(before).ravel(), np.asarray(after).ravel()
    if before.shape != after.shape:
        raise ValueError(f"the token maps differ in size: {before.size} and {after.size} patches")
    _, a = np.unique(before, return_inverse=True)
    _, b = np.unique(after, return_inverse=True)
    pair = a.astype(np.int64) * (b.max() + 1) + b
    _, pair_index, pair_sizes = np.unique(pair, return_inverse=True, return_counts=True)
    same = (pair_sizes[pair_index] == np.bincount(a)[a]) & (pair_sizes[pair_index] == np.bincount(b)[b])
    return float(1.0 - same.mean())


def class_changes(before: np.ndarray, after: np.ndarray) -> float:
    """Share of pixels whose predicted class differs between two ``[H, W]`` class maps."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"the class maps differ in size: {before.shape} and {after.shape}")
    return float((before != after).mean())


def stability(results: Sequence[FrameResult]) -> dict[str, Any]:
    """Frame-to-frame change (shares in [0, 1], one per consecutive pair): ALGM's merge groups
    (``"groups"``), ALGM's and, where it ran, the baseline's predicted class (``"class_algm"``,
    ``"class_baseline"``), and their means (``"mean"``; None for a single frame)."""
    pairs = list(zip(results[:-1], results[1:]))
    changes = {
        "groups": [group_changes(a.groups, b.groups) for a, b in pairs],
        "class_algm": [class_changes(a.algm, b.algm) for a, b in pairs],
    }
    if all(r.baseline is not None for r in results):
        changes["class_baseline"] = [class_changes(a.baseline, b.baseline) for a, b in pairs]
    changes["mean"] = {key: (float(np.mean(values)) if values else None) for key, values in list(changes.items())}
    return changes


def render_frame(result: FrameResult, colors: Sequence[Sequence[int]] | np.ndarray, patch_size: int,
                 index: int) -> np.ndarray:
    """One output frame ``[28 + H, 3W + 8, 3]`` uint8: the baseline segmentation (where it ran; else
    ``[28 + H, 2W + 4, 3]``), ALGM's, and ALGM's merge groups, captioned with the frame number, token counts and
    the forwards' times."""
    panels = [render.segmentation_overlay(result.image, result.algm, colors),
              render.group_overlay(result.image, result.groups, result.merged, patch_size)]
    tokens = result.tokens
    shown, times = "ALGM | merge groups", f"{1e3 * result.algm_s:.0f} ms"
    if result.baseline is not None:
        panels.insert(0, render.segmentation_overlay(result.image, result.baseline, colors))
        shown, times = f"baseline | {shown}", f"{1e3 * result.baseline_s:.0f} -> {times}"
    caption = (f"frame {index}  {shown}   tokens {tokens['patches']} -> {tokens['local']} -> {tokens['global']}   "
               f"{times}")
    return caption_frame(panels, caption)


def write_video(frames: Sequence[np.ndarray], stem: str | Path, fps: float) -> Path:
    """``[H, W, 3]`` uint8 RGB frames of one shape -> ``<stem>.mp4`` (H.264), or ``<stem>.webm`` (VP8) where
    FFmpeg has no H.264 encoder (see :data:`~.animation.CODECS`); odd sides are padded. ``OSError`` if neither
    encoder exists."""
    for codec in CODECS:
        path = write_clip(frames, Path(stem).with_suffix(codec.suffix), fps, codec)
        if path is not None:
            return path
    raise OSError(f"FFmpeg has none of the video encoders {[c.encoder for c in CODECS]}: no video written")
