"""Frames per second of the video path: ``python scripts/bench_video.py [--frames N] [--threads T] [--data DIR]``.

A zip of ``--frames`` consecutive CamVid val frames (sequence 0016E5, 480×360; from ``--data``, by default
``../shared/data/camvid``; without it, the project's synthetic street scenes) goes through what the app's video
panel runs: :func:`~algm_viz.video.read_clip` (zip read and decode), :func:`~algm_viz.video.analyze_frames`
(baseline and ALGM forwards at the calibrated τ, or ALGM only), :func:`~algm_viz.video.render_frame` (drawing)
and :func:`~algm_viz.video.write_video` (encoding), on the bundled model, each stage timed. The two runs (with and
without the baseline) alternate ``--repeats`` times; medians are reported. Each run also encodes the same frames
with OpenCV's VP8 writer (what the app used before PyAV; not in the total), for the encoders' ratio measured side
by side. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import torch

from algm_viz.models.bundled import load_bundled
from algm_viz.scenes import street_scene
from algm_viz.video import analyze_frames, read_clip, render_frame, write_video

STAGES = ("read", "forwards", "draw", "encode")


def encode_opencv_vp8(frames: list, path: Path, fps: float) -> None:
    """``[H, W, 3]`` uint8 RGB frames (even sides) -> VP8 WebM by OpenCV's writer, the reference encoder."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def write_frame_zip(path: Path, frames: int, data: Path) -> str:
    """A zip of ``frames`` PNG frames at ``path``; -> where they come from."""
    source = sorted((data / "val").glob("0016E5_*.png"))[:frames]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        if len(source) == frames:
            for index, frame in enumerate(source):
                archive.write(frame, f"frame{index}.png")
            return f"CamVid val {source[0].stem} .. {source[-1].stem}"
        for index in range(frames):
            archive.writestr(f"frame{index}.png", cv2.imencode(".png", street_scene(index).image[:, :, ::-1])[1].tobytes())
    return f"synthetic street scenes 0..{frames - 1} (no CamVid val frames under {data})"


def run_once(model: torch.nn.Module, clip_path: Path, out: Path, baseline: bool) -> dict[str, float]:
    """Seconds per stage of one pass over the clip."""
    seconds = {}
    start = time.perf_counter()
    clip = read_clip(clip_path)
    seconds["read"] = time.perf_counter() - start
    start = time.perf_counter()
    results = analyze_frames(model, clip.frames, {}, baseline=baseline)
    seconds["forwards"] = time.perf_counter() - start
    start = time.perf_counter()
    drawn = [render_frame(result, model.info.colors, model.patch_size, index) for index, result in enumerate(results)]
    seconds["draw"] = time.perf_counter() - start
    start = time.perf_counter()
    write_video(drawn, out / ("with" if baseline else "without"), clip.output_fps)
    seconds["encode"] = time.perf_counter() - start
    seconds["total"] = sum(seconds[stage] for stage in STAGES)
    start = time.perf_counter()
    encode_opencv_vp8([frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2] for frame in drawn],
                      out / "opencv.webm", clip.output_fps)
    seconds["encode_opencv_vp8"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_bundled().eval()
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        source = write_frame_zip(folder / "clip.zip", args.frames, args.data)
        run_once(model, folder / "clip.zip", folder, baseline=False)  # warm-up: allocator, codec
        for _ in range(args.repeats):
            for baseline in (True, False):
                runs[baseline].append(run_once(model, folder / "clip.zip", folder, baseline))
    report = {"model": model.info.name, "frames": args.frames, "source": source, "threads": torch.get_num_threads(),
              "thresholds": dict(model.info.thresholds or {}), "repeats": args.repeats}
    for baseline, samples in runs.items():
        medians = {stage: statistics.median(s[stage] for s in samples) for stage in (*STAGES, "total", "encode_opencv_vp8")}
        report["with_baseline" if baseline else "algm_only"] = {
            "fps": args.frames / medians["total"], "seconds": medians,
            "fps_each_run": [args.frames / s["total"] for s in samples]}
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
