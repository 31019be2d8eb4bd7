"""Video: frames read within bounds from clips and zips of frames written here, bad and hostile files refused
(zip bombs, zip-slip names, corrupt and encrypted archives), per-frame analysis, the stability metrics on
hand-built cases, and the output clip read back."""

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz import algm_state, apply_algm, remove_algm
from algm_viz.evaluation.inference import prepare
from algm_viz.frame_zip import ZIP_FPS, ZipFramesError, ZipLimits, natural_key, read_capped
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


def png(value: int, size: tuple[int, int] = (48, 32)) -> bytes:
    """A PNG of one gray ``value`` (its frame's id when read back), ``size`` = (width, height)."""
    ok, data = cv2.imencode(".png", np.full((size[1], size[0], 3), value, np.uint8))
    assert ok
    return data.tobytes()


def write_zip(path, members: dict, compression: int = zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def patch_headers(path, name: str, *, flags: int | None = None, size: int | None = None) -> None:
    """Rewrite one member's flag bits and/or declared uncompressed size in its local and its central header."""
    data = bytearray(Path(path).read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
    central = data.find(b"PK\x01\x02")
    while data[central + 46: central + 46 + len(name)] != name.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    for offset, flag_at, size_at in ((local, 6, 22), (central, 8, 24)):
        if flags is not None:
            struct.pack_into("<H", data, offset + flag_at, flags)
        if size is not None:
            struct.pack_into("<I", data, offset + size_at, size)
    Path(path).write_bytes(bytes(data))


def frame_ids(clip) -> list[int]:
    return [int(frame[0, 0, 0]) for frame in clip.frames]


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


def test_natural_order_compares_digit_runs_as_numbers():
    names = ["frame10.png", "Frame2.png", "frame1.png", "a/frame3.png", "frame02b.png"]
    assert sorted(names, key=natural_key) == ["a/frame3.png", "frame1.png", "Frame2.png", "frame02b.png", "frame10.png"]


def test_a_zip_of_frames_reads_in_natural_order_skipping_the_rest(tmp_path):
    ok, jpeg = cv2.imencode(".jpg", np.full((64, 96, 3), 40, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    path = write_zip(tmp_path / "frames.zip", {
        "seq/frame10.png": png(100), "seq/frame2.png": png(20), "seq/frame1.png": png(10),
        "seq/frame3.JPG": jpeg.tobytes(),  # twice the first frame's size: resized
        "seq/": b"", "__MACOSX/seq/._frame1.png": b"resource fork", "seq/.DS_Store": b"\x00\x01",
        "seq/notes.txt": b"shot on a phone"})
    clip = read_clip(path)
    assert frame_ids(clip)[:2] + frame_ids(clip)[3:] == [10, 20, 100] and abs(frame_ids(clip)[2] - 40) <= 2
    assert all(frame.shape == (32, 48, 3) and frame.dtype == np.uint8 for frame in clip.frames)
    assert clip.fps == ZIP_FPS and (clip.info.frames, clip.info.width, clip.info.height) == (4, 48, 32)
    assert clip.notes == ["1 file that is no image frame skipped: seq/notes.txt",
                          "1 frame of another size resized to 48×32 (the first frame's)"]
    assert (probe(path).frames, probe(path).fps) == (4, ZIP_FPS)
    strided = read_clip(path, VideoLimits(stride=2), fps=4)
    assert frame_ids(strided)[0] == 10 and abs(frame_ids(strided)[1] - 40) <= 2  # frames 1 and 3 of 1, 2, 3, 10
    assert strided.fps == 4 and strided.output_fps == 2 and len(strided.frames) == 2
    for bad in (0, float("nan"), "10", True):
        with pytest.raises(VideoError, match="frame rate"):
            read_clip(path, fps=bad)


def test_zip_frames_go_through_the_safe_image_reader_exif_included(tmp_path):
    import PIL.Image
    picture = np.zeros((32, 48, 3), np.uint8)
    picture[:, :8] = 255  # a white left edge, stored sideways with EXIF orientation 6 (rotate 90° clockwise)
    buffer, exif = io.BytesIO(), PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(picture).save(buffer, "JPEG", quality=95, exif=exif)
    clip = read_clip(write_zip(tmp_path / "phone.zip", {"img_0001.jpg": buffer.getvalue()}))
    frame = clip.frames[0]
    assert frame.shape == (48, 32, 3) and frame[:8].mean() > 200 and frame[16:].mean() < 30  # upright: edge on top


def test_zip_slip_names_are_read_in_memory_and_nothing_is_written(tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    path = write_zip(folder / "slip.zip", {"../x.png": png(1), "/tmp/y.png": png(2), "a/../../z.png": png(3)})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    clip = read_clip(path)
    assert sorted(frame_ids(clip)) == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and not Path("/tmp/y.png").exists()


def test_a_zip_bomb_is_stopped_by_the_cap_in_bounded_memory(tmp_path):
    """A 64 MiB member of zeros (64 KiB deflated) whose headers claim 1000 bytes: reading stops at the cap."""
    bomb = 64 * 2**20
    path = write_zip(tmp_path / "bomb.zip", {"frame1.png": png(1), "frame2.png": b"\x00" * bomb},
                     zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < bomb // 200
    patch_headers(path, "frame2.png", size=1000)
    tracemalloc.start()
    try:
        with pytest.raises(VideoError, match="bomb.zip: frame2.png (is corrupt|inflates beyond)"):
            read_clip(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # the cap, not the 64 MiB, decides what is read


def test_the_cap_reads_one_byte_past_it_and_no_more():
    class Counting(io.BytesIO):
        asked = 0

        def read(self, size=-1):
            Counting.asked = size
            return super().read(size)

    stream = Counting(b"\x00" * 10_000)
    with pytest.raises(ZipFramesError, match="x.zip: a.png inflates beyond the 1000 bytes its header declares"):
        read_capped(stream, 1000, "x.zip: a.png")
    assert Counting.asked == 1001 and stream.tell() == 1001
    assert read_capped(io.BytesIO(b"\x01" * 1000), 1000, "a") == b"\x01" * 1000


def test_zip_bounds_are_checked_before_anything_is_read(tmp_path, monkeypatch):
    big = write_zip(tmp_path / "big.zip", {"frame1.png": png(1), "frame2.png": b"\x00" * 2**23}, zipfile.ZIP_DEFLATED)
    many = write_zip(tmp_path / "many.zip", {f"frame{i}.png": png(i) for i in range(31)})
    heavy = write_zip(tmp_path / "heavy.zip", {f"frame{i}.png": b"\x00" * 600 * 2**10 for i in range(3)},
                      zipfile.ZIP_DEFLATED)
    small = ZipLimits(max_members=20, max_member_bytes=2**20, max_total_bytes=2**20)

    def no_reading(*args, **kwargs):
        raise AssertionError("a member was read")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    with pytest.raises(VideoError, match=r"big.zip: frame2.png declares 8.0 MiB uncompressed; at most 1 MiB"):
        read_clip(big, VideoLimits(archive=small))
    with pytest.raises(VideoError, match=r"heavy.zip: the 3 frames to read declare 1.8 MiB uncompressed"):
        read_clip(heavy, VideoLimits(archive=small))
    with pytest.raises(VideoError, match="use a stride of at least 16"):
        read_clip(many, VideoLimits(max_frames=2))
    monkeypatch.setattr(zipfile, "ZipFile", no_reading)  # the member count comes from the end record first
    with pytest.raises(VideoError, match="many.zip holds 31 files .*; at most 20 files are accepted"):
        read_clip(many, VideoLimits(archive=small))
    with pytest.raises(VideoError, match="many.zip holds 31 files"):
        probe(many, VideoLimits(archive=small))


def test_bad_zips_get_a_clear_error_naming_the_file(tmp_path):
    cases = {}
    (tmp_path / "empty.zip").write_bytes(b"")
    cases["empty.zip"] = "empty.zip is an empty file"
    write_zip(tmp_path / "nothing.zip", {})
    cases["nothing.zip"] = "nothing.zip is an empty zip"
    write_zip(tmp_path / "text.zip", {"readme.txt": b"hello", "data/labels.csv": b"1,2"})
    cases["text.zip"] = r"text.zip holds no image frames \(.png/.*; found readme.txt, data/labels.csv"
    (tmp_path / "noise.zip").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cases["noise.zip"] = "noise.zip is not a zip archive"
    whole = write_zip(tmp_path / "whole.zip", {"frame1.png": png(1), "frame2.png": png(2)}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) // 2])
    cases["cut.zip"] = "cut.zip is not a zip archive"
    damaged = bytearray(whole)
    damaged[len(whole) // 4: len(whole) // 4 + 40] = b"\xff" * 40  # inside the first member's stored data
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    cases["damaged.zip"] = r"damaged.zip: frame1.png is corrupt: its data does not match its header \(Bad CRC-32"
    write_zip(tmp_path / "fake.zip", {"frame1.png": png(1), "frame2.png": b"not a png at all"})
    cases["fake.zip"] = "fake.zip: frame2.png is not an image this app can read"
    write_zip(tmp_path / "locked.zip", {"frame1.png": png(1)})
    patch_headers(tmp_path / "locked.zip", "frame1.png", flags=0x1)
    cases["locked.zip"] = "locked.zip: frame1.png is encrypted"
    write_zip(tmp_path / "bz.zip", {"frame1.png": png(1)}, zipfile.ZIP_BZIP2)
    cases["bz.zip"] = "bz.zip: frame1.png uses compression method 12; only stored and deflated"
    write_zip(tmp_path / "huge.zip", {"frame1.png": png(1, (4000, 3000))})
    cases["huge.zip"] = "huge.zip: frame1.png is 4000×3000 pixels; at most 2 megapixels"
    for name, message in cases.items():
        with pytest.raises(VideoError, match=message):
            read_clip(tmp_path / name)
    with pytest.raises(VideoError, match="gone.zip: no such file"):
        read_clip(tmp_path / "gone.zip")


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
    assert path.suffix == CODECS[0].suffix == ".mp4"  # H.264 in PyAV's FFmpeg
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
    assert clip.endswith(".mp4") and summary["frames"] == 3 and summary["stride"] == 2
    assert len(summary["stability"]["groups"]) == 2 and "Frame to frame" in markdown
    assert [trace.x for trace in figure.data][0] == (0, 2, 4)  # frames of the video
    capture = cv2.VideoCapture(clip)
    assert capture.read()[0]
    capture.release()
    _, figure, markdown, summary = panel.analyze("untrained", str(path), 0.6, 0.6, 2, 3, False, 2, False,
                                                 progress=lambda *a, **k: None)
    assert summary["latency_ms"]["baseline"] is None and "baseline" not in markdown
    assert [trace.name for trace in figure.data if "latency" in trace.name] == ["ALGM latency (ms)"]


def test_the_panel_reads_a_zip_of_frames_at_its_frame_rate(panel, tmp_path):
    import gradio as gr
    frames = {f"shot/f{i}.png": png(20 * i, (48 + 16 * (i == 3), 32)) for i in (1, 2, 3, 10)}
    path = write_zip(tmp_path / "frames.zip", {**frames, "__MACOSX/shot/._f1.png": b"x", "shot/notes.txt": b"x"})
    clip, _, markdown, summary = panel.analyze("untrained", str(path), 0.6, 0.6, 2, 3, False, 1, False, 4.0,
                                               progress=lambda *a, **k: None)
    assert summary["frames"] == 4 and summary["fps"] == 4.0 and len(summary["stability"]["groups"]) == 3
    assert "notes.txt" in markdown and "resized to 48×32" in markdown and len(summary["notes"]) == 2
    capture = cv2.VideoCapture(clip)
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(4.0)
    capture.release()
    with pytest.raises(gr.Error, match="frame rate"):
        panel.analyze("untrained", str(path), 0.6, 0.6, 2, 3, False, 1, False, -1, progress=lambda *a, **k: None)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 and then nothing")
    with pytest.raises(gr.Error, match="bad.zip is not a zip archive"):
        panel.analyze("untrained", str(bad), 0.6, 0.6, 2, 3, False, 1, progress=lambda *a, **k: None)


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
        assert str(video).endswith(".mp4") and summary["frames"] == 2 and "Frame to frame" in markdown
        frames = client_module.handle_file(str(write_zip(tmp_path / "frames.zip", {f"f{i}.png": png(i) for i in range(3)})))
        _, _, _, summary = client.predict("untrained", frames, 0.6, 0.6, 2, 3, False, 1, True, api_name="/video")
        assert summary["frames"] == 3 and summary["fps"] == ZIP_FPS
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
