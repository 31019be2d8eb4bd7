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


def test_gradios_stored_files_are_capped_oldest_first_examples_kept(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"upload{i}.png"
        path.write_bytes(b"x" * 100)
        os.utime(path, (i, i))
        paths.append(str(path))
    uploads, outputs = set(paths[:4]), set(paths[4:])

    class Example:
        keep_in_cache = {paths[0]}

    blocks = type("Blocks", (), {"temp_file_sets": [uploads, outputs], "blocks": {1: Example()}})()
    time.sleep(0.01)
    Path(paths[5]).write_bytes(b"y" * 100)  # the newest (by ctime)
    assert files.prune_uploads(blocks, max_files=3, max_bytes=10**6) == 2
    assert [Path(p).exists() for p in paths].count(True) == 4 and Path(paths[0]).exists() and Path(paths[5]).exists()
    assert files.prune_uploads(blocks, max_files=10, max_bytes=150) >= 2
    assert Path(paths[0]).exists(), "an example's cached file stays"
    assert len(uploads) + len(outputs) <= 2


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


# --- long requests: time budget, disconnects, priority; input validation ------------------------------------

import threading  # noqa: E402

import gradio as gr  # noqa: E402

from algm_viz.app.longjobs import Budget, PriorityGate, WorkStopped  # noqa: E402
from algm_viz.app.ui import Handlers  # noqa: E402
from algm_viz.evaluation.compare import compare, parse_spec  # noqa: E402
from algm_viz.methods import METHODS  # noqa: E402
from test_app_session import scene, tiny_registry, write  # noqa: E402


class FakeClock:
    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_budget_stops_when_spent_or_when_the_client_has_gone():
    budget = Budget(10.0, clock=FakeClock(6.0))  # starts at 6; checks at 12 (6 s spent), 18 (12 s)
    budget.check(0, 5)
    with pytest.raises(WorkStopped, match=r"stopped after 1 of 5 configurations: .*time budget of 10 s"):
        budget.check(1, 5)
    gone = Budget(10.0, gone=lambda: True)
    with pytest.raises(WorkStopped, match="client disconnected"):
        gone.check(0, 5)


def test_compare_stops_between_configurations():
    model = tiny_registry().get("untrained").model
    seen = []

    def step(done, total):
        seen.append((done, total))
        if done == 3:
            raise WorkStopped("stop")
        return threading.Lock()

    with pytest.raises(WorkStopped):
        compare(model, scene(), ["algm", "tome"], taus=[0.8, 0.9], values={"tome": [2, 4]}, repeats=1, step=step)
    assert seen == [(0, 6), (1, 6), (2, 6), (3, 6)], "label forward, baseline, two configurations, then stop"


def test_handler_compare_answers_a_spent_budget_clearly(tmp_path, monkeypatch):
    handlers = Handlers(tiny_registry())
    clock = FakeClock(4.0)  # starts at 4; the third check (at 16) has spent 12 s of 10
    monkeypatch.setattr(handlers, "budget", lambda request=None: Budget(10.0, clock=clock))
    image = write(tmp_path, "scene.png", scene())
    with pytest.raises(gr.Error, match=r"stopped after 2 of \d+ configurations: this request's time budget"):
        handlers.compare("untrained", image, None, ["algm", "tome"], "algm:0.9", "tome:2")


def test_background_steps_wait_for_interactive_requests():
    gate, lock, order = PriorityGate(), threading.Lock(), []
    entered, release = threading.Event(), threading.Event()

    def interactive():
        with gate.interactive():
            entered.set()
            release.wait(5)
            order.append("interactive")

    def background():
        with gate.background(lock, poll_s=0.01):
            order.append("background")

    first = threading.Thread(target=interactive)
    first.start()
    entered.wait(5)
    second = threading.Thread(target=background)
    second.start()
    second.join(0.3)
    assert second.is_alive() and order == [], "a long job's step must wait while an interactive request runs"
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["interactive", "background"]


@pytest.mark.parametrize("spec, message", [
    ("tome:inf", "finite number"), ("tome:2.5", "whole number"), ("grid:2", "ratio in"), ("pool2d:0", "positive"),
    (None, "METHOD:VALUE text"), (7, "METHOD:VALUE text"), ("magic:1", "METHOD:VALUE"),
])
def test_merge_map_specs_are_validated_before_any_work(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_compare_refuses_bad_inputs_before_reading_the_image(tmp_path, monkeypatch):
    handlers = Handlers(tiny_registry())
    monkeypatch.setattr(handlers, "_session", lambda *a: pytest.fail("no work before validation"))
    image = write(tmp_path, "scene.png", scene())
    for methods, spec, message in ((["algm"], "tome:inf", "finite"), (["zzz"], "algm:0.9", "unknown methods"),
                                   ("algm", "algm:0.9", "at least one method")):
        with pytest.raises(gr.Error, match=message):
            handlers.compare("untrained", image, None, methods, spec, "tome:8")


def test_palette_and_gray_label_maps_give_the_same_miou_in_the_app(tmp_path):
    handlers = Handlers(tiny_registry())
    image = write(tmp_path, "scene.png", scene())
    ids = (np.arange(60 * 90).reshape(60, 90) // 700 % 5).astype(np.uint8)
    PIL.Image.fromarray(ids).save(tmp_path / "gray.png")
    palette = PIL.Image.fromarray(ids).convert("P")
    palette.putpalette([v for i in range(256) for v in ((60 * i) % 256, (150 * i) % 256, (90 * i + 30) % 256)])
    palette.save(tmp_path / "palette.png")
    readouts = [handlers.analyze("untrained", image, str(tmp_path / name), 0.8, 0.8, 2, 5)[6] for name in ("gray.png", "palette.png")]
    assert readouts[0]["miou"] == readouts[1]["miou"] and readouts[0]["miou"]["baseline"] is not None
    assert readouts[0]["label_note"] is None


def test_out_of_range_and_16bit_labels_are_reported_in_the_app(tmp_path):
    handlers = Handlers(tiny_registry())
    image = write(tmp_path, "scene.png", scene())
    label = np.full((60, 90), 1, np.uint16)
    label[:, :30] = 4000
    cv2.imwrite(str(tmp_path / "l16.png"), label)
    readout = handlers.analyze("untrained", image, str(tmp_path / "l16.png"), 0.8, 0.8, 2, 5)
    assert "33.3 %" in readout[6]["label_note"] and "16-bit" in readout[6]["label_note"]
    assert "outside the model's classes" in readout[5]
    cv2.imwrite(str(tmp_path / "scaled.png"), (label * 0 + 2) * 257)
    with pytest.raises(gr.Error, match="no pixel with a class id"):
        handlers.analyze("untrained", image, str(tmp_path / "scaled.png"), 0.8, 0.8, 2, 5)


def test_exif_rotated_upload_is_analysed_upright(tmp_path):
    handlers = Handlers(tiny_registry())
    path = tmp_path / "portrait.jpg"
    rotated_jpeg(path)
    width, height = handlers.analyze("untrained", str(path), None, 0.8, 0.8, 2, 5)[6]["image_size"]
    assert height > width, "a portrait photo stays a portrait"


# --- through a real server on 127.0.0.1 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    httpx = pytest.importorskip("httpx")
    import socket

    from algm_viz.app.session import SessionCache
    from algm_viz.app.ui import build_demo

    handlers = Handlers(tiny_registry(), SessionCache(max_side=128), thresholds=(0.7, 1.0), with_gflops=False)
    demo = build_demo(handlers).queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/gradio_api/"
    path = write(tmp_path_factory.mktemp("hostile"), "scene.png", scene())
    with open(path, "rb") as handle:
        uploaded = httpx.post(f"{url}upload", files={"files": handle}).json()[0]
    yield httpx, url, handlers, {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
    demo.close()


def _defaults(url: str, endpoint: str) -> list:
    """The default value of each parameter of ``endpoint`` (a raw call must send them all)."""
    from gradio_client import Client

    info = Client(url.removesuffix("gradio_api/"), verbose=False).view_api(print_info=False, return_format="dict")
    return [parameter.get("parameter_default") for parameter in info["named_endpoints"][endpoint]["parameters"]]


def _raw_call(httpx, url: str, name: str, data: list) -> str:
    event = httpx.post(f"{url}call/{name}", json={"data": data}).json()
    return httpx.get(f"{url}call/{name}/{event['event_id']}", timeout=60).text


@pytest.mark.parametrize("index, value, message", [
    (3, "abc", "τ local (CLAP) must be a number, got 'abc'"), (4, None, "τ global (GBM) must be a number, got None"),
    (6, "abc", "GBM layer must be a number"), (1, 5, "the image must be an uploaded file, got 5"),
    (2, "x", "the label map must be an uploaded file"), (7, "yes", "prop_attn must be true or false"),
])
def test_wrong_api_types_get_a_message_naming_the_input(api_server, index, value, message):
    httpx, url, _, image = api_server
    data = ["untrained", image, None, 0.9, 0.9, 2, 5, False]
    data[index] = value
    data += _defaults(url, "/analyze")[len(data):]
    stream = _raw_call(httpx, url, "analyze", data)
    assert "event: error" in stream and json.dumps(message)[1:-1] in stream, stream[:300]


def test_a_disconnected_compare_stops_within_a_configuration(api_server):
    httpx, url, handlers, image = api_server
    steps, stops, original = [], [], handlers.budget

    def slow_budget(request=None):
        budget = original(request)
        check = budget.check

        def recorded(done, total):
            steps.append(done)
            time.sleep(0.2)  # every configuration takes at least this long
            try:
                check(done, total)
            except WorkStopped as error:
                stops.append(str(error))
                raise

        budget.check = recorded
        return budget

    handlers.budget = slow_budget
    try:
        methods = ["algm", "tome", "pool2d", "grid", "kv_grid", "cts"]
        data = ["untrained", image, None, methods, "algm:0.9", "tome:2"]
        data += _defaults(url, "/compare")[len(data):]
        event = httpx.post(f"{url}call/compare", json={"data": data}).json()
        with httpx.stream("GET", f"{url}call/compare/{event['event_id']}", timeout=60):
            deadline = time.monotonic() + 60
            while len(steps) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            at_close = len(steps)
        deadline = time.monotonic() + 30
        while not stops and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        handlers.budget = original
    assert stops and "client disconnected" in stops[0], (steps, stops)
    total = 2 + sum(len(METHODS[m].values) for m in methods)
    assert len(steps) <= at_close + 2 < total, (at_close, steps)


def test_handler_curve_answers_a_spent_budget_clearly(tmp_path, monkeypatch):
    handlers = Handlers(tiny_registry(), thresholds=(0.7, 0.8, 0.9, 1.0), with_gflops=False)
    clock = FakeClock(4.0)  # starts at 4; the third check (at 16) has spent 12 s of 10
    monkeypatch.setattr(handlers, "budget", lambda request=None: Budget(10.0, clock=clock))
    image = write(tmp_path, "scene.png", scene())
    with pytest.raises(gr.Error, match=r"stopped after 2 of \d+ configurations: this request's time budget"):
        handlers.curve("untrained", image, None, 0.8, 0.8, 2, 5)
    monkeypatch.setattr(handlers, "budget", lambda request=None: Budget(600.0))
    assert handlers.curve("untrained", image, None, 0.8, 0.8, 2, 5)[0] is not None, "the same curve runs within a budget"


def test_temp_folders_are_removed_at_a_normal_exit(tmp_path):
    script = ("import sys\n"
              "from algm_viz.app.files import PictureFiles, make_temp_dir\n"
              "print(make_temp_dir('export', sys.argv[1]), PictureFiles(root=sys.argv[1]).folder)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    made = [Path(p) for p in done.stdout.split()]
    assert len(made) == 2 and all(p.parent == tmp_path and p.name.startswith("algm_viz_") for p in made)
    assert not list(tmp_path.iterdir()), "the process removed its folders when it exited"
