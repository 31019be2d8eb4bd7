"""The app's files on disk: temporary folders that cannot outlive the server, and output pictures
capped in number and total size (oldest removed first).

Folders are named ``algm_viz_<kind>.pid<PID>.<random>``: the process that made one removes it at exit
(also on SIGTERM once :func:`exit_on_sigterm` is installed), and a later start removes those whose
process is gone (:func:`remove_stale`), e.g. after a crash or a kill.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

__all__ = ["PictureFiles", "TempFolders", "make_temp_dir", "remove_stale", "remove_own", "exit_on_sigterm", "upload_root",
           "prune_uploads"]

logger = logging.getLogger(__name__)

PREFIX = "algm_viz_"
_OWNED = re.compile(rf"^{PREFIX}\w+?\.pid(\d+)\.")
#: Folders of the older naming (``algm_viz_pictures_xxxx``, no owner) are removed once this old.
LEGACY_AGE_S = 3600.0

_own_folders: list[Path] = []
_own_lock = threading.Lock()


def upload_root() -> Path:
    """Gradio's upload/cache folder: files the app writes there are served without a second copy."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def make_temp_dir(kind: str, root: str | Path | None = None) -> Path:
    """A new folder ``<root>/algm_viz_<kind>.pid<PID>.<random>`` (root: the system temp folder), removed
    when this process exits."""
    parent = Path(root) if root is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}.pid{os.getpid()}.", dir=parent))
    with _own_lock:
        if not _own_folders:
            atexit.register(remove_own)
        _own_folders.append(folder)
    return folder


def remove_own() -> None:
    """Remove every folder this process made with :func:`make_temp_dir`."""
    with _own_lock:
        folders, _own_folders[:] = list(_own_folders), []
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(roots: Iterable[str | Path] | None = None, legacy_age_s: float = LEGACY_AGE_S) -> list[Path]:
    """Remove ``algm_viz_*`` folders left in ``roots`` (default: the system temp folder and Gradio's upload
    folder) by processes that no longer run, and unowned ones older than ``legacy_age_s``. Returns them."""
    roots = [Path(tempfile.gettempdir()), upload_root()] if roots is None else [Path(r) for r in roots]
    removed = []
    now = time.time()
    for root in roots:
        try:
            candidates = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir() and not p.is_symlink()]
        except OSError:
            continue
        for folder in candidates:
            owner = _OWNED.match(folder.name)
            if owner is not None:
                stale = int(owner.group(1)) != os.getpid() and not _process_alive(int(owner.group(1)))
            else:
                try:
                    stale = now - folder.stat().st_mtime > legacy_age_s
                except OSError:
                    continue
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        logger.info("removed %d stale temporary folders", len(removed))
    return removed


def exit_on_sigterm() -> None:
    """On SIGTERM, remove this process's temporary folders, then exit with status 128 + 15 at once (a
    normal interpreter shutdown could abort while worker threads are inside torch). Call it from the
    main thread of a server process."""

    def handler(signum: int, frame: Any) -> None:
        remove_own()
        logging.shutdown()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class TempFolders:
    """Fresh folders of one ``kind`` (e.g. exports); only the newest ``keep`` stay on disk."""

    def __init__(self, kind: str, keep: int = 16, root: str | Path | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.kind, self.keep, self.root = kind, keep, root
        self._folders: list[Path] = []
        self._lock = threading.Lock()

    def new(self) -> Path:
        folder = make_temp_dir(self.kind, self.root)
        with self._lock:
            self._folders.append(folder)
            old, self._folders = self._folders[:-self.keep], self._folders[-self.keep:]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder


class PictureFiles:
    """Output pictures as quickly compressed PNG files (zlib ``compression`` 1 is ~4× faster than Gradio's
    own PNG encoding) in a folder inside Gradio's upload folder (served without a copy).

    Disk is bounded: once more than ``max_files`` pictures or ``max_bytes`` bytes are stored, or a picture
    is older than ``max_age_s``, the oldest go first. Pictures whose long side is under ``display_side``
    are enlarged by a whole factor (nearest neighbour, so patch edges stay sharp) to fill the panels.
    """

    def __init__(self, compression: int = 1, max_age_s: float = 600.0, display_side: int = 480,
                 max_files: int = 600, max_bytes: int = 256 * 2**20, root: str | Path | None = None) -> None:
        if max_files < 1 or max_bytes < 1:
            raise ValueError("max_files and max_bytes must be positive")
        self.folder = make_temp_dir("pictures", upload_root() if root is None else root)
        self.compression = compression
        self.max_age_s = max_age_s
        self.display_side = display_side
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._files: OrderedDict[Path, tuple[int, float]] = OrderedDict()  # path -> (bytes, written at)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def usage(self) -> tuple[int, int]:
        """``(files, bytes)`` stored now."""
        with self._lock:
            return len(self._files), self._bytes

    def save(self, image: np.ndarray, keep: bool = False) -> str:
        """``[H, W, 3]`` uint8 RGB -> path of a new PNG file; ``keep``: never removed before the folder is
        (nor counted in the bounds), for the pictures a page opens on."""
        factor = max(1, self.display_side // max(image.shape[:2]))
        if factor > 1:
            image = image.repeat(factor, axis=0).repeat(factor, axis=1)
        path = self.folder / f"{uuid.uuid4().hex}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, self.compression]):
            raise OSError(f"could not write a picture to {self.folder}")
        if keep:
            return str(path)
        size = path.stat().st_size
        with self._lock:
            self._files[path] = (size, time.time())
            self._bytes += size
            expired = time.time() - self.max_age_s
            while len(self._files) > 1 and (len(self._files) > self.max_files or self._bytes > self.max_bytes
                                            or next(iter(self._files.values()))[1] < expired):
                old, (old_size, _) = self._files.popitem(last=False)
                self._bytes -= old_size
                old.unlink(missing_ok=True)
        return str(path)



def prune_uploads(blocks: Any, max_files: int, max_bytes: int) -> int:
    """Remove the oldest files Gradio stored for ``blocks`` (uploads, copies of outputs) while there are
    more than ``max_files`` of them or more than ``max_bytes`` bytes; files Gradio keeps for itself
    (examples) stay. Returns how many were removed. Gradio's ``delete_cache`` removes them by age only."""
    keep: set[str] = set()
    for component in getattr(blocks, "blocks", {}).values():
        keep.update(getattr(component, "keep_in_cache", ()))
    entries = []
    for file_set in getattr(blocks, "temp_file_sets", ()):
        for name in list(file_set):
            if name in keep:
                continue
            try:
                status = os.lstat(name)
            except OSError:
                file_set.discard(name)
                continue
            entries.append((status.st_ctime, status.st_size, name, file_set))
    entries.sort(key=lambda entry: entry[0])
    count, total, removed = len(entries), sum(entry[1] for entry in entries), 0
    for _, size, name, file_set in entries:
        if count <= max_files and total <= max_bytes:
            break
        try:
            os.remove(name)
        except OSError:
            pass
        file_set.discard(name)
        count, total, removed = count - 1, total - size, removed + 1
    if removed:
        logger.info("removed %d of the oldest uploads (caps: %d files, %d MB)", removed, max_files, max_bytes // 2**20)
    return removed
