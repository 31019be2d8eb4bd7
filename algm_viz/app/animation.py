"""The τ animation of one image: the merge map and the ALGM segmentation as τ sweeps from high to low."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import render
from ..animation import MAX_FRAMES, caption_frame, write_gif, write_mp4
from .session import ImageSession, Settings

__all__ = ["tau_frames", "tau_animation"]


def tau_frames(session: ImageSession, settings: Settings, taus: Sequence[float]) -> list[np.ndarray]:
    """One frame per τ (both stages; window, GBM layer and proportional attention of ``settings``), highest
    τ first: GBM merge groups beside the ALGM segmentation, captioned with τ and the token counts. The
    forwards come from the session's cache where the τ curve has already run them."""
    if not 1 <= len(taus) <= MAX_FRAMES:
        raise ValueError(f"an animation takes 1..{MAX_FRAMES} τ values, got {len(taus)}")
    entry, image, p = session.entry, session.image, session.entry.patch_size
    frames = []
    for tau in sorted((float(t) for t in taus), reverse=True):
        step = Settings(tau, tau, settings.window, settings.global_layer, settings.local_layer, settings.prop_attn)
        result = session.algm(step)
        maps, tokens = result.maps, result.maps.tokens
        panels = [render.group_overlay(image, maps.final_groups, maps.global_merged, p),
                  render.segmentation_overlay(image, result.prediction, entry.colors)]
        caption = (f"tau {tau:.3f}   tokens {tokens['patches']} -> {tokens['local']} -> {tokens['global']} "
                   f"({100 * tokens['global'] / tokens['patches']:.0f} % kept)")
        frames.append(caption_frame(panels, caption))
    return frames


def tau_animation(session: ImageSession, settings: Settings, taus: Sequence[float], folder: Path,
                  fps: float = 2.0) -> list[Path]:
    """Write ``tau_animation.gif`` (and ``tau_animation.mp4``, H.264, where FFmpeg has the encoder) into ``folder``."""
    frames = tau_frames(session, settings, taus)
    paths = [write_gif(frames, folder / "tau_animation.gif", fps)]
    mp4 = write_mp4(frames, folder / "tau_animation.mp4", fps)
    return paths + ([mp4] if mp4 is not None else [])
