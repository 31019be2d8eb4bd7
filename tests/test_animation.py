"""τ animations: captioned frames, GIF and MP4 written and read back, bounds and bad frames refused."""

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from algm_viz import render
from algm_viz.animation import CODECS, MAX_FRAMES, caption_frame, write_clip, write_gif, write_mp4
from algm_viz.video import write_video
from algm_viz.app.animation import tau_animation, tau_frames
from algm_viz.app.session import ImageSession, Settings

from conftest import scene, tiny_registry


@pytest.fixture(scope="module")
def session():
    registry = tiny_registry()
    return ImageSession(registry.get(registry.default_key()), scene())


def test_frames_follow_tau_from_high_to_low_with_their_token_counts(session):
    settings = Settings(0.9, 0.9, 2, 3)
    frames = tau_frames(session, settings, [0.5, 1.0, 0.8])
    assert len(frames) == 3 and len({f.shape for f in frames}) == 1
    height, width = session.image.shape[:2]
    assert frames[0].shape[0] > height and frames[0].shape[1] > 2 * width, "caption band above two panels"
    kept = [session.algm(Settings(t, t, 2, 3)).maps.tokens["global"] for t in (1.0, 0.8, 0.5)]
    assert kept[0] == session.num_patches and kept[0] >= kept[1] >= kept[2]
    first = session.algm(Settings(1.0, 1.0, 2, 3))
    expected = render.group_overlay(session.image, first.maps.final_groups, first.maps.global_merged, 8)
    np.testing.assert_array_equal(frames[0][-height:, :width], expected)  # highest τ first, its merge map unscaled
    assert not np.array_equal(frames[0][:20], frames[2][:20]), "each frame has its own caption"
    with pytest.raises(ValueError, match="1..64"):
        tau_frames(session, settings, [])


def test_gif_and_mp4_hold_every_frame(session, tmp_path):
    paths = tau_animation(session, Settings(0.9, 0.9, 2, 3), [1.0, 0.7, 0.5], tmp_path)
    with Image.open(paths[0]) as gif:
        assert gif.n_frames == 3 and gif.info["loop"] == 0
    if len(paths) == 2:
        video = cv2.VideoCapture(str(paths[1]))
        assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
        ok, frame = video.read()
        assert ok and frame.shape[0] % 2 == 0 and frame.shape[1] % 2 == 0
        video.release()


def test_bad_frames_are_refused(tmp_path):
    frame = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="1..64"):
        write_gif([frame] * (MAX_FRAMES + 1), tmp_path / "a.gif")
    with pytest.raises(ValueError, match="same shape"):
        write_gif([frame, frame[:5]], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="one height"):
        caption_frame([frame, np.zeros((11, 12, 3), np.uint8)], "x")


def _decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("codec", CODECS, ids=[c.encoder for c in CODECS])
def test_each_codec_writes_every_frame_faithfully_with_odd_sides_padded(tmp_path, codec):
    rng = np.random.default_rng(0)
    blocks = [np.kron(rng.integers(0, 256, (5, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8)[:37, :53] for _ in range(4)]
    path = write_clip(blocks, tmp_path / f"clip{codec.suffix}", 7.5, codec)
    frames = _decoded(path)
    assert len(frames) == 4 and frames[0].shape == (38, 54, 3)
    error = np.mean([np.abs(f[:37, :53].astype(int) - b).mean() for f, b in zip(frames, blocks)])
    assert error < 6, f"{codec.encoder}: mean error {error:.1f} of 255"
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(15, 2)


def test_mp4_is_h264_and_video_falls_back_to_vp8_without_it(tmp_path, monkeypatch):
    frames = [np.full((9, 13, 3), 40 * i, np.uint8) for i in range(3)]
    with av.open(str(write_mp4(frames, tmp_path / "odd.mp4"))) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    assert write_mp4(frames, tmp_path / "none.mp4") is None and not (tmp_path / "none.mp4").exists()
    assert write_video(frames, tmp_path / "clip", 5).suffix == ".webm"
    monkeypatch.setattr(av, "codecs_available", set())
    with pytest.raises(OSError, match="no video written"):
        write_video(frames, tmp_path / "clip", 5)
