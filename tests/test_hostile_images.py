"""Hostile and awkward inputs (issues 13 and 18): decompression bombs, palette and 16-bit label maps,
EXIF orientation, bounded picture disk, wrong API types and per-request time budgets. Fast, no network."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest

from algm_viz.app.inputs import read_image_file, read_label_file
from algm_viz.datasets import read_image, read_label
from algm_viz.preprocess import MAX_PIXELS, ImageError, check_label

REPO = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int, channels: int = 3) -> Path:
    """A valid all-zero PNG of ``width × height`` (a few hundred KB on disk, ``width·height·channels``
    bytes decoded), written row by row so that the test itself stays small."""
    color_type = {1: 0, 3: 2}[channels]
    packer, row = zlib.compressobj(9), b"\0" * (1 + width * channels)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _peak_rss_delta_mb(path: Path) -> dict:
    """Read ``path`` as a label map and as an image in a fresh interpreter: the refusal messages and the
    peak RSS growth during the two reads, in MB."""
    script = (
        "import json, resource, sys\n"
        "from algm_viz.preprocess import read_image, read_label\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "messages = []\n"
        "for reader in (read_label, read_image):\n"
        "    try:\n"
        "        reader(sys.argv[1])\n"
        "        messages.append(None)\n"
        "    except ValueError as error:\n"
        "        messages.append(str(error))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'delta_mb': (after - before) / 1024, 'messages': messages}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_10000x10000_png_is_refused_from_its_header(tmp_path):
    """Decoded, this PNG is 300 MB (2.4 GB as int64 class ids); label map or image, it must be refused
    before decoding, in the library and in the app."""
    path = bomb_png(tmp_path / "bomb.png", 10_000, 10_000)
    assert path.stat().st_size < 1_000_000
    result = _peak_rss_delta_mb(path)
    for message in result["messages"]:
        assert message and "10000×10000" in message and "megapixels" in message
    assert result["delta_mb"] < 300, result
    for reader in (read_label_file, read_image_file):
        with pytest.raises(ImageError, match="10000×10000 pixels"):
            reader(path)


def test_pil_bomb_limit_matches_the_readers():
    assert PIL.Image.MAX_IMAGE_PIXELS == MAX_PIXELS


def test_a_bomb_beyond_pils_own_limit_gets_the_same_clear_message(tmp_path):
    path = bomb_png(tmp_path / "huge.png", 20_000, 10_000, channels=1)  # over 2× PIL's limit: PIL refuses at open
    for reader in (read_label_file, read_image_file, read_label, read_image):
        with pytest.raises(ImageError, match="megapixels"):
            reader(path)


def test_palette_label_map_reads_as_its_indices(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (30, 40)).astype(np.uint8)
    palette = PIL.Image.fromarray(ids, mode="L").convert("P")
    palette.putpalette([v for i in range(256) for v in ((37 * i) % 256, (91 * i) % 256, (53 * i + 20) % 256)])
    palette.save(tmp_path / "palette.png")
    PIL.Image.fromarray(ids).save(tmp_path / "gray.png")
    assert PIL.Image.open(tmp_path / "palette.png").mode == "P"
    for reader in (read_label, read_label_file):
        assert np.array_equal(reader(tmp_path / "palette.png"), ids)
        assert np.array_equal(reader(tmp_path / "palette.png"), reader(tmp_path / "gray.png"))


def test_colour_coded_label_map_is_refused(tmp_path):
    colours = np.zeros((10, 10, 3), np.uint8)
    colours[:5] = (128, 64, 128)
    cv2.imwrite(str(tmp_path / "colours.png"), colours)
    with pytest.raises(ImageError, match="colour image"):
        read_label(tmp_path / "colours.png")
    gray_as_rgb = np.repeat(np.arange(100, dtype=np.uint8).reshape(10, 10, 1) % 3, 3, axis=2)
    cv2.imwrite(str(tmp_path / "gray_rgb.png"), gray_as_rgb)
    assert np.array_equal(read_label(tmp_path / "gray_rgb.png"), gray_as_rgb[..., 0])


def rotated_jpeg(path: Path, orientation: int = 6) -> np.ndarray:
    """A 90×60 (w×h) JPEG tagged with EXIF ``orientation`` (6: shown rotated 90° clockwise); returns its pixels."""
    pixels = np.zeros((60, 90, 3), np.uint8)
    pixels[:, :30] = (250, 10, 10)  # left third red: after a clockwise turn it is the top third
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    PIL.Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return pixels


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    path = tmp_path / "portrait.jpg"
    rotated_jpeg(path)
    for reader in (read_image, read_image_file):
        upright = reader(path)
        assert upright.shape == (90, 60, 3)
        assert upright[:25, :, 0].mean() > 200 and upright[35:, :, 0].mean() < 50, "red must be on top"


def test_16bit_label_map_keeps_its_values_and_out_of_range_is_reported(tmp_path):
    label = np.zeros((20, 30), np.uint16)
    label[:10] = 2
    label[10:, :5] = 1000  # a 16-bit value outside 5 classes
    label[10:, 5:8] = 255  # the ignore value: not worth a note
    cv2.imwrite(str(tmp_path / "l16.png"), label)
    stored = read_label(tmp_path / "l16.png")
    assert stored.dtype == np.uint16 and np.array_equal(stored, label)
    cleaned, note = check_label(stored, 5, 255)
    assert (cleaned[10:, :5] == 255).all() and (cleaned[:10] == 2).all()
    assert note and "16-bit" in note and "1000" in note and "0..4" in note and f"{100 * 50 / 600:.1f} %" in note
    assert check_label(np.where(label == 1000, 3, label), 5, 255)[1] is None
    with pytest.raises(ImageError, match="no pixel with a class id in 0..4"):
        check_label((label.astype(np.int64) + 1) * 257, 5, 255)


# --- bounded disk -------------------------------------------------------------------------------------------

from algm_viz.app import files  # noqa: E402


def test_pictures_are_capped_in_number_and_size_oldest_first(tmp_path):
    pictures = files.PictureFiles(max_files=3, root=tmp_path, display_side=1)
    rng = np.random.default_rng(0)
    paths = [pictures.save(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    assert [Path(p).is_file() for p in paths] == [False, False, True, True, True]
    assert pictures.usage[0] == 3 and len(list(pictures.folder.iterdir())) == 3
    one = Path(paths[-1]).stat().st_size
    by_size = files.PictureFiles(max_bytes=int(2.5 * one), root=tmp_path, display_side=1)
    paths = [by_size.save(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    assert [Path(p).is_file() for p in paths] == [False, False, True, True]
    assert by_size.usage[1] <= 2.5 * one * 1.1


def test_export_folders_keep_only_the_newest(tmp_path):
    folders = files.TempFolders("export", keep=2, root=tmp_path)
    made = [folders.new() for _ in range(3)]
    assert [f.is_dir() for f in made] == [False, True, True]
    assert all(f".pid{os.getpid()}." in f.name for f in made)


def test_stale_folders_of_dead_processes_are_removed_at_start(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"algm_viz_pictures.pid{finished.stdout.strip()}.abc"
    alive = tmp_path / f"algm_viz_pictures.pid{os.getppid()}.abc"
    legacy_old, legacy_new = tmp_path / "algm_viz_export_oldone", tmp_path / "algm_viz_export_newone"
    other = tmp_path / "someone_else.pid1.x"
    for folder in (dead, alive, legacy_old, legacy_new, other):
        folder.mkdir()
        (folder / "f.png").write_bytes(b"x")
    os.utime(legacy_old, (0, 0))
    removed = files.remove_stale([tmp_path])
    assert set(removed) == {dead, legacy_old}
    assert not dead.exists() and not legacy_old.exists()
    assert alive.is_dir() and legacy_new.is_dir() and other.is_dir()


def test_sigterm_removes_the_servers_temp_folders(tmp_path):
    """A real server process (tiny model) killed with SIGTERM exits and leaves no folder behind."""
    script = (
        "import sys\n"
        "from algm_viz.app.files import exit_on_sigterm\n"
        "from algm_viz.app.models import ModelRegistry\n"
        "from algm_viz.app.ui import Handlers, build_demo\n"
        "exit_on_sigterm()\n"
        "tiny = dict(num_classes=3, depth=2, embed_dim=32, num_heads=2, decoder='linear', patch_size=8, image_size=32)\n"
        "handlers = Handlers(ModelRegistry(device='cpu', default_short_side=32, untrained=tiny, include_bundled=False))\n"
        "handlers.exports.new()\n"
        "demo = build_demo(handlers).queue()\n"
        "demo.launch(server_name='127.0.0.1', quiet=True, prevent_thread_lock=True)\n"
        "print(handlers.pictures.folder, flush=True)\n"
        "demo.block_thread()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "TMPDIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env)
    try:
        pictures = Path(server.stdout.readline().strip())
        assert pictures.is_dir() and list((tmp_path / "gradio").glob("algm_viz_export.pid*")), server.stderr.read()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
    left = [p.name for p in [*tmp_path.glob("algm_viz_*"), *(tmp_path / "gradio").glob("algm_viz_*")]]
    assert not left, left
