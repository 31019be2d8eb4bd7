"""Animations of merging as a setting sweeps: frames captioned with the setting, written as GIF (Pillow) and
as browser-playable video (PyAV's FFmpeg encoders: H.264 MP4, else VP8 WebM)."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, Sequence

import av
import cv2
import numpy as np
from PIL import Image

__all__ = ["VideoCodec", "CODECS", "caption_frame", "write_clip", "write_gif", "write_mp4", "MAX_FRAMES"]

logger = logging.getLogger(__name__)


class VideoCodec(NamedTuple):
    """An FFmpeg encoder (PyAV name), the container's file suffix, and options of the stream and container."""

    encoder: str
    suffix: str
    options: dict[str, str]
    container_options: dict[str, str]


#: Tried in order by :func:`write_clip`. H.264 in MP4 plays in every current browser (``superfast``: ~10x faster than
#: OpenCV's VP8 writer at the same PSNR on segmentation frames, see BENCHMARKS.md; moov atom first, so playback starts
#: before the download ends); VP8 WebM (Chromium, Firefox) in real-time mode where the FFmpeg build has no H.264.
CODECS = (VideoCodec("libx264", ".mp4", {"preset": "superfast", "crf": "18"}, {"movflags": "+faststart"}),
          VideoCodec("libvpx", ".webm", {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "8M"}, {}))

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
    """``[H, W, 3]`` uint8 frames -> an H.264 MP4 at ``path``; None where PyAV's FFmpeg has no H.264 encoder
    (nothing is left behind then). Odd sides are padded to even ones, which the codec needs."""
    _check_frames(frames)
    return write_clip(frames, path, fps, CODECS[0])


def write_clip(frames: Sequence[np.ndarray], path: str | Path, fps: float, codec: VideoCodec) -> Path | None:
    """``[H, W, 3]`` uint8 RGB frames of one shape -> a video at ``path`` (its suffix as given) in ``codec``, odd
    sides padded to even ones (edge pixels repeated), YUV 4:2:0; None where this FFmpeg build lacks the encoder
    (nothing is left behind then)."""
    if not frames or len({f.shape for f in frames}) != 1:
        raise ValueError("a clip takes one or more frames of one shape")
    if codec.encoder not in av.codecs_available:
        logger.info("FFmpeg has no %s encoder: %s not written", codec.encoder, path)
        return None
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", options=codec.container_options) as container:
        stream = container.add_stream(codec.encoder, rate=Fraction(fps).limit_denominator(1001), options=codec.options)
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        for frame in frames:
            padded = cv2.copyMakeBorder(frame, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)
