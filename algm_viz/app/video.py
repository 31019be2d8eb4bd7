"""The video panel: upload a short clip or a zip of frames, get baseline | ALGM | merge groups as a clip, tokens
and latency per frame, and the frame-to-frame stability of merge groups and predictions (the ``/video`` endpoint).

``/video`` takes (model, video file or zip of frames, τ local, τ global, window, GBM layer, proportional attention,
frame stride, with the baseline, a zip's frame rate) and returns (output clip, tokens-and-latency figure, summary
Markdown, summary dict). Work is bounded (:class:`~algm_viz.video.VideoLimits`, a zip's by its
:class:`~algm_viz.frame_zip.ZipLimits`); it runs in the ``"long"`` queue one frame at a time after any waiting
interactive request (:class:`~.longjobs.PriorityGate`), within the long-request time budget.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Any, Iterator, Sequence

import gradio as gr
import plotly.graph_objects as go

from ..frame_zip import IMAGE_SUFFIXES, ZIP_FPS, is_zip
from ..video import Clip, FrameResult, VideoError, VideoLimits, analyze_frames, probe, read_clip, render_frame, \
    stability, write_video
from .gpu import forward_budget, gpu
from .longjobs import WorkStopped

__all__ = ["VideoPanel", "video_figure", "video_summary", "LIMITS"]

logger = logging.getLogger(__name__)

#: The app's bounds on one clip (the stride is the user's).
LIMITS = VideoLimits(max_frames=48, max_seconds=30.0, max_pixels=1920 * 1080)
#: Largest frame stride the panel offers.
MAX_STRIDE = 30


def video_figure(results: Sequence[FrameResult], stride: int) -> go.Figure:
    """Tokens after ALGM (left axis) and both forwards' latency (right axis) per analysed frame."""
    frames = [i * stride for i in range(len(results))]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=frames, y=[r.tokens["global"] for r in results], mode="lines+markers",
                                name="ALGM tokens", line={"color": "#1f77b4"}))
    figure.add_trace(go.Scatter(x=frames, y=[r.tokens["patches"] for r in results], mode="lines",
                                name="baseline tokens (patches)", line={"color": "#7f7f7f"}))
    for key, name, color in (("baseline_s", "baseline", "#7f7f7f"), ("algm_s", "ALGM", "#1f77b4")):
        if getattr(results[0], key) is None:
            continue
        figure.add_trace(go.Scatter(x=frames, y=[1e3 * getattr(r, key) for r in results], mode="lines",
                                    name=f"{name} latency (ms)", line={"color": color, "dash": "dot"}, yaxis="y2"))
    figure.update_layout(title="Tokens and latency per frame", xaxis={"title": "frame of the video or zip"},
                         yaxis={"title": "tokens", "rangemode": "tozero"},
                         yaxis2={"title": "ms per forward", "overlaying": "y", "side": "right", "showgrid": False,
                                 "rangemode": "tozero"},
                         height=360, legend={"orientation": "h", "y": -0.25})
    return figure


def video_summary(clip: Clip, results: Sequence[FrameResult]) -> dict[str, Any]:
    """Per-frame tokens and times, and the frame-to-frame stability (:func:`algm_viz.video.stability`)."""
    return {
        "frames": len(results), "stride": clip.stride, "fps": clip.fps,
        "size": [int(results[0].image.shape[1]), int(results[0].image.shape[0])],
        "tokens": [dict(r.tokens) for r in results],
        "latency_ms": {"algm": [1e3 * r.algm_s for r in results],
                       "baseline": None if results[0].baseline_s is None else [1e3 * r.baseline_s for r in results]},
        "stability": stability(results),
        "notes": list(clip.notes),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary in two lines, and what reading changed (a zip's skipped members, resized frames)."""
    mean = summary["stability"]["mean"]
    tokens = [t["global"] for t in summary["tokens"]]
    latency = summary["latency_ms"]
    lines = [f"**{summary['frames']} frames** (every {summary['stride']}. of the input, {summary['size'][0]}×"
             f"{summary['size'][1]} model input) · ALGM tokens {min(tokens)}–{max(tokens)} of "
             f"{summary['tokens'][0]['patches']} · latency "
             + (f"baseline {sum(latency['baseline']) / len(tokens):.0f} ms, " if latency["baseline"] else "")
             + f"ALGM {sum(latency['algm']) / len(tokens):.0f} ms (means)"]
    if mean["groups"] is None:
        lines.append("One frame: no frame-to-frame stability to measure.")
    else:
        classes = f"{100 * mean['class_algm']:.1f} % for ALGM"
        if mean.get("class_baseline") is not None:
            classes = f"{100 * mean['class_baseline']:.1f} % for the baseline, " + classes
        lines.append(f"**Frame to frame** (means over consecutive analysed frames): {100 * mean['groups']:.1f} % of "
                     f"patches change merge group; predicted class changes on {classes} of pixels")
    lines += [f"Note: {note}." for note in summary["notes"]]
    return "\n\n".join(lines)


class VideoPanel:
    """The panel's components, built where it is created (inside a ``gr.Blocks``); :meth:`wire` connects them.
    ``handlers``: the app's :class:`~.ui.Handlers` (registry, gate, budget, exports)."""

    def __init__(self, handlers: Any, limits: VideoLimits = LIMITS) -> None:
        self.handlers, self.limits = handlers, limits
        with gr.Accordion("Video: merging frame by frame", open=False, elem_id="video-panel"):
            gr.Markdown(f"Upload a short clip (mp4, webm, avi, ...) or a zip of frames: each analysed frame runs ALGM "
                        f"(and the baseline) at the settings above. Bounds: {limits.describe()}; a longer clip needs a "
                        "larger stride. A zip holds image frames (PNG or JPEG; also "
                        f"{', '.join(s[1:].upper() for s in IMAGE_SUFFIXES[3:])}), taken in natural name order "
                        "(frame2 before frame10, folders included); frames of another size than the first are "
                        "resized to it, other files and hidden ones (`__MACOSX/`, `.DS_Store`) are skipped; "
                        f"{limits.archive.describe()}. The output shows baseline | ALGM | ALGM's merge groups per "
                        "frame.")
            with gr.Row():
                self.video = gr.File(label="Clip or zip of frames", file_types=["video", ".zip"], type="filepath",
                                     elem_id="video-input")
                with gr.Column():
                    self.stride = gr.Number(1, label="Frame stride (analyse every n-th frame)", minimum=1,
                                            maximum=MAX_STRIDE, precision=0, elem_id="video-stride")
                    self.with_baseline = gr.Checkbox(True, label="Also run the baseline (beside ALGM; about twice the time)",
                                                     elem_id="video-baseline")
                    self.fps = gr.Number(ZIP_FPS, label="Frame rate of a zip of frames (per second; a video keeps its own)",
                                         minimum=0.1, maximum=240, elem_id="video-fps")
                    self.button = gr.Button("Analyse the clip", variant="primary")
            self.output = gr.Video(label="Baseline | ALGM | merge groups", interactive=False, elem_id="video-output")
            self.plot = gr.Plot(label="Tokens and latency per frame", elem_id="video-plot")
            self.summary = gr.Markdown(elem_id="video-summary")
            self.summary_json = gr.JSON(visible=False)

    def analyze(self, model: str, video: str | None, local_tau: float | None = None, global_tau: float | None = None,
                window: int | None = None, global_layer: int | None = None, prop_attn: bool = False,
                stride: float = 1, with_baseline: bool = True, zip_fps: float = ZIP_FPS,
                request: gr.Request | None = None,
                progress: gr.Progress = gr.Progress()):
        """-> (output clip path, tokens-and-latency figure, summary Markdown, summary dict). Settings of None: the
        page's opening ones (:meth:`~.ui.Handlers.settings`); a stride of 1: every frame. ``video``: a video file or
        a ``.zip`` of frames, played at ``zip_fps``."""
        if not video:
            raise gr.Error("upload a video or a zip of frames first")
        if (isinstance(stride, bool) or not isinstance(stride, (int, float)) or not math.isfinite(stride)
                or stride != int(stride) or not 1 <= stride <= MAX_STRIDE):
            raise gr.Error(f"the frame stride must be a whole number in 1..{MAX_STRIDE}, got {str(stride)[:20]}")
        if not isinstance(with_baseline, bool):
            raise gr.Error(f"with the baseline must be true or false, got {str(with_baseline)[:20]}")
        budget = self.handlers.budget(request)
        try:
            entry = self.handlers.registry.get(model)  # CheckpointError is a ValueError
            settings = self.handlers.settings(local_tau, global_tau, window, global_layer, prop_attn)
            clip = read_clip(video, replace(self.limits, stride=int(stride)), zip_fps if is_zip(video) else None)
        except ValueError as error:  # VideoError is one
            logger.info("video refused: %s", error)
            raise gr.Error(str(error)) from error

        @contextmanager
        def step(done: int, total: int) -> Iterator[None]:
            budget.check(done, total)
            progress((done, total), desc="frames")
            with ExitStack() as stack:
                stack.enter_context(self.handlers.gate.background(entry.lock, lambda: budget.check(done, total)))
                stack.enter_context(entry.precision())
                yield

        algm = dict(local_layer=settings.local_layer, global_layer=settings.global_layer,
                    window=(settings.window, settings.window), local_threshold=settings.local_threshold,
                    global_threshold=settings.global_threshold, prop_attn=settings.prop_attn)
        try:
            results = analyze_frames(entry.model, clip.frames, algm, short_side=entry.short_side,
                                     device=entry.device, step=step, baseline=with_baseline)
        except WorkStopped as error:
            raise gr.Error(str(error).replace("configurations", "frames")) from error
        except ValueError as error:  # e.g. a layer beyond the model's depth
            logger.info("video refused: %s", error)
            raise gr.Error(str(error)) from error
        progress(1.0, desc="writing the clip")
        frames = [render_frame(r, entry.colors, entry.patch_size, i * clip.stride) for i, r in enumerate(results)]
        path = write_video(frames, self.handlers.exports.new() / "merging", clip.output_fps)
        summary = video_summary(clip, results)
        return str(path), video_figure(results, clip.stride), summary_markdown(summary), summary

    def wire(self, model: gr.components.Component, settings: Sequence[gr.components.Component]) -> None:
        """Connect the button (``/video``). ``settings``: (τ local, τ global, window, GBM layer, proportional
        attention) of the page."""
        limits = self.limits

        def duration(model: str, video: str | None, *rest: Any) -> int:
            try:
                info = probe(video, limits) if video else None
            except VideoError:
                info = None
            pixels = (info.width * info.height if info else 0) or limits.max_pixels  # a zip's size is unknown
            return forward_budget(2 * limits.max_frames, pixels)

        self.button.click(gpu(duration)(self.analyze), [model, self.video, *settings, self.stride, self.with_baseline,
                                                           self.fps],
                          [self.output, self.plot, self.summary, self.summary_json], api_name="video",
                          concurrency_id="long", concurrency_limit=1)
