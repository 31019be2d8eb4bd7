"""The repository deploys as a Hugging Face Space: front matter, requirements, large files, a Space-like run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import gradio
import numpy as np
import PIL.Image
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: The Hub refuses files over this size outside Git LFS / Xet.
HUB_PLAIN_FILE_LIMIT = 10 * 1024 * 1024
#: torch releases the ZeroGPU documentation lists as supported.
ZERO_GPU_TORCH = {"2.1.0", "2.1.1", "2.1.2", "2.2.0", "2.2.2", "2.4.0", "2.5.1", "2.6.0", "2.7.1", "2.8.0"}
#: torch -> the torchvision built for it.
TORCHVISION_FOR = {"2.4.0": "0.19.0", "2.5.1": "0.20.1", "2.6.0": "0.21.0", "2.7.1": "0.22.1", "2.8.0": "0.23.0"}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with the Space's YAML front matter"
    return yaml.safe_load(match.group(1))


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def test_front_matter_names_the_tested_gradio_and_existing_files():
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert str(meta["sdk_version"]) == gradio.__version__, "sdk_version must be the Gradio the suite runs on"
    tracked = set(tracked_files())  # a Space holds what the repository holds, not what lies around here
    assert (ROOT / meta["app_file"]).is_file() and meta["app_file"] in tracked
    assert re.fullmatch(r"3\.\d+", str(meta["python_version"]))
    assert meta["suggested_hardware"] in {"zero-a10g", "t4-small", "t4-medium", "a10g-small", "a10g-large", "l4x1"}
    assert len(meta["short_description"]) <= 60
    for key in ("models", "datasets"):  # Hub repository ids, never local paths
        for name in meta.get(key, []):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", name), name
    requirements = (ROOT / "requirements.txt").read_text().split()
    for index, word in enumerate(requirements[:-1]):
        if word == "-r":
            assert requirements[index + 1] in tracked
    assert "requirements.txt" in tracked


def test_gpu_requirements_pin_a_zero_gpu_torch_pair_and_the_sdk_gradio():
    pins = requirement_pins(ROOT / "requirements-gpu.txt")
    assert pins["torch"] in ZERO_GPU_TORCH
    assert pins["torchvision"] == TORCHVISION_FOR[pins["torch"]]
    assert pins["gradio"] == str(front_matter()["sdk_version"])
    assert requirement_pins(ROOT / "requirements-cpu.txt")["gradio"] == pins["gradio"]


def test_large_and_binary_files_are_lfs_tracked_yet_real_in_the_checkout():
    files = [f for f in tracked_files() if (ROOT / f).is_file()]
    attributes = subprocess.run(["git", "check-attr", "filter", "--", *files], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.splitlines()
    lfs = {line.split(": ")[0] for line in attributes if line.endswith(": lfs")}
    for name in files:
        head = (ROOT / name).read_bytes()[:8192]
        assert not head.startswith(b"version https://git-lfs"), f"{name} is an LFS pointer, not the file"
        if (ROOT / name).stat().st_size > HUB_PLAIN_FILE_LIMIT or b"\0" in head:
            assert name in lfs, f"{name} is large or binary: .gitattributes must send it through LFS"
    assert "assets/models/camvid-vit-tiny/model.safetensors" in lfs


def test_zero_gpu_durations_follow_the_request(monkeypatch, tmp_path):
    """With ``spaces`` installed, every endpoint asks for a duration computed from its own arguments."""
    calls: dict[str, object] = {}

    def fake_gpu(duration):
        def wrap(fn):
            calls[fn.__name__] = duration
            return fn
        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    from algm_viz.app.gpu import MAX_CALL_S
    from algm_viz.app.ui import Handlers, build_demo
    from algm_viz.app.models import ModelRegistry

    handlers = Handlers(ModelRegistry(), thresholds=(0.9, 0.95), with_gflops=False)
    build_demo(handlers)
    assert {"analyze", "curve", "balance", "export", "compare"} <= set(calls)
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    PIL.Image.fromarray(np.zeros((360, 480, 3), np.uint8)).save(small)
    PIL.Image.fromarray(np.zeros((1080, 1920, 3), np.uint8)).save(large)
    settings = (None, 0.9, 0.9, 2, 5, False)
    for name in ("analyze", "curve", "balance", "export"):
        assert 1 <= calls[name]("m", str(small), *settings) <= calls[name]("m", str(large), *settings) <= MAX_CALL_S
    few = calls["compare"]("m", str(large), None, ["algm"], "algm:0.9", "tome:8")
    many = calls["compare"]("m", str(large), None, ["algm", "tome", "pool2d", "cts"], "algm:0.9", "tome:8")
    assert few < many <= MAX_CALL_S
    assert calls["curve"]("m", str(large), *settings) < calls["export"]("m", str(large), *settings)
    assert calls["analyze"]("m", "not-a-file", *settings) >= 1  # unreadable upload: a default, never a crash


@pytest.mark.slow
def test_space_like_run_serves_on_all_interfaces_with_mcp_tools(tmp_path):
    """``python app.py`` as a Space starts it: SPACE_ID set, host 0.0.0.0, the Space's port; MCP tools listed."""
    from conftest import free_port

    port = free_port()
    env = {**os.environ, "SPACE_ID": "someone/algm-viz", "GRADIO_SERVER_NAME": "0.0.0.0",
           "GRADIO_SERVER_PORT": str(port), "ALGM_VIZ_MCP": "1", "ALGM_VIZ_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the app did not start within 90 s"
                time.sleep(0.5)
        assert "ALGM" in page
        tools = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/mcp/schema", timeout=10))
        by_name = {tool["name"]: tool for tool in tools}
        assert {"analyze", "curve", "balance", "compare", "export", "select_model"} <= set(by_name)
        analyze = by_name["analyze"]
        assert "tau" in json.dumps(analyze["inputSchema"]) and analyze["description"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _app_py_startup(env: dict[str, str]) -> dict:
    """What ``python app.py`` hands to the app, with ``build_demo`` stubbed out (nothing is built or served)."""
    script = """
import json, runpy, sys
import algm_viz.app

seen = {}

class Demo:
    def queue(self, **options):
        return self

    def launch(self, **options):
        seen["launch"] = sorted(options)

def build_demo(handlers, **options):
    seen.update(budget=handlers.long_budget_s, prerun=options.get("prerun", True))
    return Demo()

algm_viz.app.build_demo = build_demo
sys.argv = ["app.py"]
runpy.run_path("app.py", run_name="__main__")
print(json.dumps(seen))
"""
    base = {k: v for k, v in os.environ.items() if k not in ("SPACES_ZERO_GPU", "SPACE_ID")}
    env = {**base, "ALGM_VIZ_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_on_zero_gpu_the_app_runs_no_cuda_work_at_start_and_long_requests_fit_one_gpu_call():
    """On ZeroGPU, CUDA work outside ``spaces.GPU`` calls fails ("CUDA must not be initialized in the main
    process"): the page's pre-run is skipped there, and a long request's wall budget stays within the longest
    reservation a call asks for (it stops between configurations instead of being killed)."""
    from algm_viz.app.gpu import MAX_CALL_S

    plain = _app_py_startup({})
    assert plain["prerun"] is True and plain["budget"] > MAX_CALL_S, plain
    zero = _app_py_startup({"SPACES_ZERO_GPU": "true", "SPACE_ID": "someone/algm-viz"})
    assert zero["prerun"] is False, "a pre-run in the main process would initialise CUDA on ZeroGPU"
    assert 0 < zero["budget"] < MAX_CALL_S
    assert "mcp_server" in zero["launch"]


def test_importing_the_app_builds_no_model_and_starts_no_thread():
    """No work at import time: ``app.py`` and the app package only define things (the bundled model loads when
    the demo is built, the pre-run starts there too)."""
    script = """
import gc, threading
before = threading.active_count()
import app, algm_viz.app, algm_viz.app.ui
from algm_viz.models import Segmenter
assert not any(isinstance(o, Segmenter) for o in gc.get_objects()), "a model was built at import"
assert not [t.name for t in threading.enumerate() if t.name.startswith("algm-viz")], "a thread was started at import"
print("ok")
"""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_model_list_offers_every_official_checkpoint_with_the_bundled_model_first():
    """Online (a Space) the official Segmenter ADE20K checkpoints are in the list, downloaded on first use;
    the bundled model, which needs no network, stays the default."""
    from algm_viz.app.models import ModelRegistry
    from algm_viz.models import KNOWN_MODELS
    from algm_viz.models.loading import DEFAULT_MODEL

    registry = ModelRegistry(device="cpu")
    keys = [key for _, key in registry.choices()]
    assert registry.default_key() == keys[0] == f"bundled:{DEFAULT_MODEL}"
    assert {f"official:{name}" for name in KNOWN_MODELS} <= set(keys)
    assert not registry._entries, "listing the models loads none of them"
