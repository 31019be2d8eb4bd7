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
    assert (ROOT / meta["app_file"]).is_file()
    assert re.fullmatch(r"3\.\d+", str(meta["python_version"]))
    assert meta["suggested_hardware"] in {"zero-a10g", "t4-small", "t4-medium", "a10g-small", "a10g-large", "l4x1"}
    assert len(meta["short_description"]) <= 60
    for key in ("models", "datasets"):  # Hub repository ids, never local paths
        for name in meta.get(key, []):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", name), name
    requirements = (ROOT / "requirements.txt").read_text().split()
    for index, word in enumerate(requirements[:-1]):
        if word == "-r":
            assert (ROOT / requirements[index + 1]).is_file()


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
