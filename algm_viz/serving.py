"""The app as a measured subject: a free loopback port, ``app.py`` served by a child process, and the
headless Chromium that opens it (the browser tests and the page-load benchmark)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Debian's Chromium and the flags it runs headless with here (no sandbox, GPU or background network).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: A page expression: the view's pictures (merge maps, superpixels, both sides of the segmentation) are on screen.
VIEW_PICTURES_SHOWN = ("['#local-overlay img', '#global-overlay img', '#mean-colors img', '#segmentation img']"
                       ".every(s => [...document.querySelectorAll(s)].some(i => i.complete && i.naturalWidth > 0))")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """``app.py`` on 127.0.0.1 in a child process with its own temp folders under ``root`` (its log in
    ``root/server.log``); the constructor returns once the port accepts connections."""

    def __init__(self, root: Path, threads: int, startup_s: float = 300.0) -> None:
        self.root, self.port = root, free_port()
        env = {**os.environ, "TMPDIR": str(root), "GRADIO_TEMP_DIR": str(root / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
        self.process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(self.port),
                                         "--threads", str(threads)], env=env, cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: see {root / 'server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start in time")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=60)
