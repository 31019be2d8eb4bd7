"""Animations of merging as a setting sweeps: frames captioned with the setting, written as GIF (Pillow) and
MP4 (OpenCV, where its writer has a codec)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

__all__ = ["caption_frame", "write_clip", "write_gif", "write_mp4", "MAX_FRAMES"]

logger = logging.getLogger(__name__)

#: Frames one animation may hold (a bound on the work and the file size).
MAX_FRAMES = 64
CAPTION_HEIGHT = 28


def caption_frame(panels: Sequence[np.ndarray], caption: str, gap: int = 4) -> np.ndarray:
    """``[H, W, 3]`` uint8 panels of one height side by side, with ``caption`` on a dark band above them."""
    if not panels:
        raise ValueError("a frame needs at least one panel")
    height = panels[0].shape[0]
    if any(p.shape[0] != height or p.ndim != 3 or p.dtype != np.uint8 for p in panels):
        raise ValueError(f"panels must be [H, W, 3] uint8 of one height, got {[p.shape for p in panels]}")
    spacer = np.full((height, gap, 3), 255, np.uint8)
    row = np.concatenate([part for panel in panels for part in (panel, spacer)][:-1], axis=1)
    band = np.full((CAPTION_HEIGHT, row.shape[1], 3), 30, np.uint8)
    cv2.putText(band, caption, (8, CAPTION_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([band, row], axis=0)


def _check_frames(frames: Sequence[np.ndarray]) -> None:
    if not frames or len(frames) > MAX_FRAMES:
        raise ValueError(f"an animation takes 1..{MAX_FRAMES} frames, got {len(frames)}")
    if len({f.shape for f in frames}) != 1:
        raise ValueError("every frame must have the same shape")


def write_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 2.0) -> Path:
    """``[H, W, 3]`` uint8 frames -> a looping GIF at ``path``."""
    _check_frames(frames)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return Path(path)


def write_mp4(frames: Sequence[np.ndarray], path: str | Path, fps: float = 2.0) -> Path | None:
    """``[H, W, 3]`` uint8 frames -> an MP4 (``mp4v``) at ``path``; None where OpenCV's writer has no such codec
    (nothing is left behind then). Odd sides are padded to even ones, which the codecs need."""
    _check_frames(frames)
    return write_clip(frames, path, fps, "mp4v")


def write_clip(frames: Sequence[np.ndarray], path: str | Path, fps: float, fourcc: str) -> Path | None:
    """``[H, W, 3]`` uint8 RGB frames of one shape -> a video at ``path`` in the OpenCV codec ``fourcc``, odd
    sides padded to even ones (edge pixels repeated); None where OpenCV cannot write that codec (nothing is
    left behind then)."""
    if not frames or len({f.shape for f in frames}) != 1:
        raise ValueError("a clip takes one or more frames of one shape")
    height, width = frames[0].shape[:2]
    size = (width + width % 2, height + height % 2)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), size)
    if not writer.isOpened():
        writer.release()
        Path(path).unlink(missing_ok=True)
        logger.info("OpenCV cannot write %s: %s not written", fourcc, path)
        return None
    try:
        for frame in frames:
            padded = cv2.copyMakeBorder(frame, 0, size[1] - height, 0, size[0] - width, cv2.BORDER_REPLICATE)
            writer.write(cv2.cvtColor(padded, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return Path(path)
