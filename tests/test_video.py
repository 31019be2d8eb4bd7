"""Video: frames read within bounds from clips written here, bad files refused, per-frame analysis, the
stability metrics on hand-built cases, and the output clip read back."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz import algm_state, apply_algm, remove_algm
from algm_viz.evaluation.inference import prepare
from algm_viz.models import create_segmenter
from algm_viz.video import (CODECS, VideoError, VideoLimits, analyze_frames, class_changes, group_changes, probe,
                            read_clip, render_frame, stability, write_video)

from conftest import APP_TINY as TINY, free_port, tiny_registry

ALGM = dict(local_layer=1, global_layer=3, window=(2, 2), local_threshold=0.0, global_threshold=0.0)


def write_clip(path, frames: int = 6, size: tuple[int, int] = (48, 32), fps: float = 10.0):
    """An MJPG avi of a bright square moving right over two colours."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:, : width // 2] = (40, 160, 40)
        frame[4:12, 2 + 3 * i: 10 + 3 * i] = (250, 250, 250)
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", **TINY).eval()


def test_frames_are_read_with_the_stride(tmp_path):
    path = write_clip(tmp_path / "clip.avi", frames=7)
    info = probe(path)
    assert (info.frames, info.width, info.height) == (7, 48, 32) and info.fps == pytest.approx(10.0)
    clip = read_clip(path, VideoLimits(stride=3))
    assert len(clip.frames) == 3 and clip.frames[0].shape == (32, 48, 3) and clip.frames[0].dtype == np.uint8
    assert clip.output_fps == pytest.approx(10.0 / 3)
    # RGB: the left half was written as BGR (40, 160, 40), i.e. green in both orders; the square moves right
    columns = [np.flatnonzero(frame[8, :, 0] > 200) for frame in clip.frames]
    assert columns[0][0] < columns[1][0] < columns[2][0]


@pytest.mark.parametrize("limits, words", [
    (VideoLimits(max_frames=4), "use a stride of at least 2"),
    (VideoLimits(max_seconds=0.5), "lasts 0.8 s"),
    (VideoLimits(max_pixels=1000), "megapixels"),
])
def test_clips_beyond_the_bounds_are_refused(tmp_path, limits, words):
    path = write_clip(tmp_path / "clip.avi", frames=8)
    with pytest.raises(VideoError, match=words):
        read_clip(path, limits)


def test_bad_limits_are_refused():
    for bad in (dict(stride=0), dict(stride=1.5), dict(max_frames=0)):
        with pytest.raises(ValueError):
            VideoLimits(**bad)


def test_hostile_files_get_a_clear_error(tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="clip.mp4 (is not a video|holds no frame)"):
        read_clip(fake)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.webm"):
        read_clip(empty)
    with pytest.raises(VideoError, match="no such file"):
        read_clip(tmp_path / "missing.avi")


def test_group_changes_count_membership_not_ids():
    a = np.array([[0, 0, 1], [2, 3, 3]])
    assert group_changes(a, a + 7) == 0.0  # same groups, other ids
    b = np.array([[0, 0, 1], [2, 3, 4]])  # patch 5 left its group: patches 4 and 5 changed
    assert group_changes(a, b) == pytest.approx(2 / 6)
    c = np.array([[0, 1, 1], [2, 3, 3]])  # patch 1 moved from {0, 1} to {1, 2}: patches 0, 1, 2 changed
    assert group_changes(a, c) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        group_changes(a, a[:1])


def test_class_changes_are_the_share_of_changed_pixels():
    a = np.zeros((4, 5), np.int16)
    b = a.copy()
    b[0, :2] = 3
    assert class_changes(a, b) == pytest.approx(2 / 20) and class_changes(a, a) == 0.0


def test_frames_are_analysed_as_single_forwards(model, tmp_path):
    clip = read_clip(write_clip(tmp_path / "clip.avi", frames=4))
    seen = []

    def step(done, total):
        seen.append((done, total))
        return torch.no_grad()

    results = analyze_frames(model, clip.frames, ALGM, short_side=64, step=step)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)] and algm_state(model) is None  # merging restored (none)
    first = results[0]
    assert first.image.shape == (64, 96, 3) and first.baseline.shape == first.algm.shape == (64, 96)
    assert first.groups.shape == first.merged.shape == (8, 12)
    # the same frame through the model directly gives the same groups and token counts
    apply_algm(model, **ALGM)
    with torch.inference_mode():
        model(prepare(model, first.image, None))
    record = algm_state(model).record
    remove_algm(model)
    assert np.array_equal(record.final.groups[0].numpy().reshape(8, 12), first.groups)
    assert first.tokens["global"] == int(record.final.counts[0]) == len(np.unique(first.groups)) < 96
    assert first.baseline_s > 0 and first.algm_s > 0
    changes = stability(results)
    assert len(changes["groups"]) == len(changes["class_algm"]) == 3
    assert all(0.0 <= v <= 1.0 for v in changes["groups"] + changes["class_baseline"])
    assert changes["mean"]["groups"] == pytest.approx(np.mean(changes["groups"]))
    assert stability(results[:1])["mean"]["groups"] is None


def test_output_video_holds_every_frame(model, tmp_path):
    clip = read_clip(write_clip(tmp_path / "clip.avi", frames=3))
    results = analyze_frames(model, clip.frames, ALGM, short_side=64)
    colors = np.random.default_rng(0).integers(0, 256, (5, 3))
    frames = [render_frame(r, colors, 8, i) for i, r in enumerate(results)]
    assert frames[0].shape == (28 + 64, 3 * 96 + 8, 3)
    path = write_video(frames, tmp_path / "out", clip.output_fps)
    assert path.suffix == CODECS[0][1]  # VP8 WebM in this OpenCV build
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    assert count == 3
    with pytest.raises(ValueError):
        write_video([], tmp_path / "none", 5)


def test_without_the_baseline_only_algm_runs(model, tmp_path):
    clip = read_clip(write_clip(tmp_path / "clip.avi", frames=3))
    with_base = analyze_frames(model, clip.frames, ALGM, short_side=64)
    alone = analyze_frames(model, clip.frames, ALGM, short_side=64, baseline=False)
    assert all(r.baseline is None and r.baseline_s is None for r in alone)
    assert all(np.array_equal(a.algm, b.algm) and np.array_equal(a.groups, b.groups) for a, b in zip(alone, with_base))
    changes = stability(alone)
    assert "class_baseline" not in changes and changes["class_algm"] == stability(with_base)["class_algm"]
    assert render_frame(alone[0], np.zeros((5, 3), np.uint8), 8, 0).shape == (28 + 64, 2 * 96 + 4, 3)


@pytest.fixture(scope="module")
def panel():
    gr = pytest.importorskip("gradio")
    from algm_viz.app.session import SessionCache
    from algm_viz.app.ui import Handlers
    from algm_viz.app.video import VideoPanel
    registry = tiny_registry()
    handlers = Handlers(registry, SessionCache(max_side=256), thresholds=(0.6, 1.0), with_gflops=False)
    with gr.Blocks():
        return VideoPanel(handlers)


def test_the_panel_returns_a_clip_a_plot_and_the_stability(panel, tmp_path):
    path = write_clip(tmp_path / "clip.avi", frames=5)
    clip, figure, markdown, summary = panel.analyze("untrained", str(path), 0.6, 0.6, 2, 3, False, 2,
                                                    progress=lambda *a, **k: None)
    assert clip.endswith(".webm") and summary["frames"] == 3 and summary["stride"] == 2
    assert len(summary["stability"]["groups"]) == 2 and "Frame to frame" in markdown
    assert [trace.x for trace in figure.data][0] == (0, 2, 4)  # frames of the video
    capture = cv2.VideoCapture(clip)
    assert capture.read()[0]
    capture.release()
    _, figure, markdown, summary = panel.analyze("untrained", str(path), 0.6, 0.6, 2, 3, False, 2, False,
                                                 progress=lambda *a, **k: None)
    assert summary["latency_ms"]["baseline"] is None and "baseline" not in markdown
    assert [trace.name for trace in figure.data if "latency" in trace.name] == ["ALGM latency (ms)"]


def test_the_panel_refuses_bad_input_clearly(panel, tmp_path):
    import gradio as gr
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"\x00not a video" * 100)
    quiet = lambda *a, **k: None  # noqa: E731
    with pytest.raises(gr.Error, match="clip.mp4"):
        panel.analyze("untrained", str(fake), 0.6, 0.6, 2, 3, False, 1, progress=quiet)
    with pytest.raises(gr.Error, match="stride"):
        panel.analyze("untrained", str(write_clip(tmp_path / "ok.avi")), 0.6, 0.6, 2, 3, False, 0.5, progress=quiet)
    for stride in (float("nan"), True, "2"):
        with pytest.raises(gr.Error, match="stride"):
            panel.analyze("untrained", str(write_clip(tmp_path / "ok.avi")), 0.6, 0.6, 2, 3, False, stride, progress=quiet)
    with pytest.raises(gr.Error, match="layer"):
        panel.analyze("untrained", str(write_clip(tmp_path / "ok.avi")), 0.6, 0.6, 2, 99, False, 1, progress=quiet)
    with pytest.raises(gr.Error, match="upload a video"):
        panel.analyze("untrained", None, 0.6, 0.6, 2, 3, False, 1, progress=quiet)
    long = write_clip(tmp_path / "long.avi", frames=60)
    with pytest.raises(gr.Error, match="stride of at least 2"):
        panel.analyze("untrained", str(long), 0.6, 0.6, 2, 3, False, 1, progress=quiet)


@pytest.mark.slow
def test_video_and_layer_maps_endpoints_through_gradio_client(tmp_path):
    client_module = pytest.importorskip("gradio_client")

    from algm_viz.app.session import SessionCache
    from algm_viz.app.ui import EXAMPLES_DIR, Handlers, build_demo
    registry = tiny_registry()
    handlers = Handlers(registry, SessionCache(max_side=128), thresholds=(0.6, 1.0), with_gflops=False)
    demo = build_demo(handlers, prerun=False).queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = client_module.Client(f"http://127.0.0.1:{port}/", verbose=False)
        clip = client_module.handle_file(str(write_clip(tmp_path / "clip.avi", frames=4)))
        video, figure, markdown, summary = client.predict("untrained", clip, 0.6, 0.6, 2, 3, False, 2, True,
                                                          api_name="/video")
        video = video["video"] if isinstance(video, dict) else video
        assert str(video).endswith(".webm") and summary["frames"] == 2 and "Frame to frame" in markdown
        fake = tmp_path / "fake.mp4"
        fake.write_bytes(b"\x00" * 4096)
        with pytest.raises(Exception, match="fake.mp4"):
            client.predict("untrained", client_module.handle_file(str(fake)), 0.6, 0.6, 2, 3, False, 1, True,
                           api_name="/video")
        image = client_module.handle_file(str(EXAMPLES_DIR / "coffee.png"))
        picture = client.predict("untrained", image, None, ["algm", "tome"], "algm:0.9", "tome:8", 3,
                                 api_name="/layer_maps")
        assert Path(picture).is_file()
    finally:
        demo.close()
