"""A zip of frames (an image sequence) read in memory within bounds: the video input for those who have frames.

Nothing is extracted to disk, so member names (``../x.png``, ``/etc/x.png``) only sort and label frames. Before
any member is decoded, the archive's directory is checked: the number of entries and the directory's size (from
the end record, before Python parses the directory), each frame's declared uncompressed size and their total;
each member is then read with its declared size as the cap (a header that lies about the size — a zip bomb —
fails its check instead of filling memory), and decoded by :func:`algm_viz.preprocess.read_image` (pixel limit
from the image header, EXIF orientation, plain raster formats only).

Frames are the members with an image suffix (:data:`IMAGE_SUFFIXES`) in natural order (``frame2`` before
``frame10``); directories and hidden entries (``__MACOSX/``, ``.DS_Store``, ``._frame1.png``) are skipped
silently, other members (``notes.txt``) are skipped and named in a note; frames whose size differs from the
first frame's are resized to it (and noted).
"""

from __future__ import annotations

import math
import re
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from .preprocess import ImageError, read_image

__all__ = ["ZipFramesError", "ZipLimits", "ZipFrames", "IMAGE_SUFFIXES", "ZIP_FPS", "is_zip", "natural_key",
           "list_frames", "read_capped", "read_frames"]

#: Suffixes of the members read as frames (formats :func:`~algm_viz.preprocess.read_image` opens).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Frame rate given to a zip of frames (which has none) unless the caller gives one.
ZIP_FPS = 10.0
#: Directory bytes allowed per allowed entry (46 fixed bytes, the name, extra fields and comment).
DIRECTORY_BYTES_PER_ENTRY = 1024
_MEBI = 2**20


class ZipFramesError(ValueError):
    """A zip of frames that cannot be read or lies outside the bounds; the message names the file and why."""


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on one archive: entries in its directory (all of them, skipped ones too), declared uncompressed
    bytes of one frame and of all frames read."""

    max_members: int = 2000
    max_member_bytes: int = 32 * _MEBI
    max_total_bytes: int = 256 * _MEBI

    def __post_init__(self) -> None:
        if min(self.max_members, self.max_member_bytes, self.max_total_bytes) < 1:
            raise ValueError(f"zip limits must be positive, got {self}")

    def describe(self) -> str:
        """The bounds in words (shown in the app)."""
        return (f"at most {self.max_members} files, {self.max_member_bytes / _MEBI:g} MiB per frame and "
                f"{self.max_total_bytes / _MEBI:g} MiB of frames read")


@dataclass
class ZipFrames:
    """Frames read from a zip: ``frames`` ``[H, W, 3]`` uint8 RGB of one size (every ``stride``-th image, natural
    order), their member ``names``, ``images`` (all image members), ``notes`` (skipped members, resized frames)."""

    frames: list[np.ndarray]
    names: list[str]
    images: int
    notes: list[str] = field(default_factory=list)


def is_zip(path: str | Path) -> bool:
    """Whether ``path`` is taken as a zip of frames (its suffix is ``.zip``, any case)."""
    return Path(path).suffix.lower() == ".zip"


def natural_key(name: str) -> tuple[str | int, ...]:
    """Sort key putting ``frame2`` before ``frame10`` (digit runs compare as numbers; case ignored)."""
    parts = re.split(r"(\d+)", name.casefold())
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts))


def _shown(name: str) -> str:
    """A member name fit for a message: control characters replaced, at most 80 characters."""
    clean = "".join("?" if unicodedata.category(c)[0] == "C" else c for c in name)
    return clean if len(clean) <= 80 else clean[:77] + "..."


def _listed(names: list[str]) -> str:
    """The first three ``names`` fit for a message, ``...`` after them when there are more."""
    return ", ".join(_shown(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")


def _hidden(name: str) -> bool:
    parts = [part for part in name.replace("\\", "/").split("/") if part]
    return any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX" for part in parts)


def _directory(handle: BinaryIO, zip_name: str, limits: ZipLimits) -> None:
    """Refuse an archive whose end record announces more entries, or a larger directory, than ``limits`` allow
    (checked before :class:`zipfile.ZipFile` parses the whole directory into memory)."""
    try:
        end = zipfile._EndRecData(handle)  # the one reader of the end record (zip64 too); private but stable
    except (OSError, struct.error, ValueError):
        end = None
    if end is None:
        raise ZipFramesError(f"{zip_name} is not a zip archive (corrupt file or another format)")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > limits.max_members or size > limits.max_members * DIRECTORY_BYTES_PER_ENTRY:
        raise ZipFramesError(f"{zip_name} holds {entries} files ({size / _MEBI:.1f} MiB of directory); at most "
                             f"{limits.max_members} files are accepted: refused")


def _members(archive: zipfile.ZipFile, zip_name: str, limits: ZipLimits) -> tuple[list[zipfile.ZipInfo], list[str]]:
    """(image members in natural order, names of the other members skipped) of an opened archive."""
    entries = archive.infolist()
    if len(entries) > limits.max_members:
        raise ZipFramesError(f"{zip_name} holds {len(entries)} files; at most {limits.max_members} are accepted: "
                             "refused")
    if not entries:
        raise ZipFramesError(f"{zip_name} is an empty zip: it holds no frames")
    files = [e for e in entries if not e.is_dir() and not _hidden(e.filename)]
    images = [e for e in files if Path(e.filename).suffix.lower() in IMAGE_SUFFIXES]
    skipped = [e.filename for e in files if e not in images]
    if not images:
        raise ZipFramesError(f"{zip_name} holds no image frames ({'/'.join(IMAGE_SUFFIXES)})"
                             + (f"; found {_listed(skipped)}" if skipped else ""))
    return sorted(images, key=lambda e: natural_key(e.filename)), skipped


def _open(path: str | Path, limits: ZipLimits) -> tuple[zipfile.ZipFile, str]:
    zip_name = Path(path).name
    if not Path(path).is_file():
        raise ZipFramesError(f"{zip_name}: no such file")
    if Path(path).stat().st_size == 0:
        raise ZipFramesError(f"{zip_name} is an empty file (0 bytes), not a zip of frames")
    handle = open(path, "rb")
    try:
        _directory(handle, zip_name, limits)
        return zipfile.ZipFile(handle), zip_name
    except ZipFramesError:
        handle.close()
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError) as error:
        handle.close()
        raise ZipFramesError(f"{zip_name} is a corrupt zip archive ({error})") from None


def list_frames(path: str | Path, limits: ZipLimits = ZipLimits()) -> tuple[list[str], list[str]]:
    """(image member names in natural order, other members skipped) of the zip at ``path``; nothing decoded.
    Raises :class:`ZipFramesError` for a file that is no zip, an empty one, one over ``limits.max_members`` or
    one with no image."""
    archive, zip_name = _open(path, limits)
    with archive:
        images, skipped = _members(archive, zip_name, limits)
    return [e.filename for e in images], skipped


def _check_member(entry: zipfile.ZipInfo, label: str, limits: ZipLimits) -> None:
    if entry.flag_bits & 0x1:
        raise ZipFramesError(f"{label} is encrypted: frames must be stored without a password")
    if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ZipFramesError(f"{label} uses compression method {entry.compress_type}; only stored and deflated "
                             "members are read")
    if entry.file_size > limits.max_member_bytes:
        raise ZipFramesError(f"{label} declares {entry.file_size / _MEBI:.1f} MiB uncompressed; at most "
                             f"{limits.max_member_bytes / _MEBI:g} MiB per frame are accepted: refused")


def read_capped(stream: BinaryIO, cap: int, label: str) -> bytes:
    """At most ``cap`` bytes of ``stream``: one more byte read means the member inflates beyond what its header
    declares (a zip bomb), refused. Memory: ``cap + 1`` bytes at most, whatever the stream holds."""
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise ZipFramesError(f"{label} inflates beyond the {cap} bytes its header declares: refused (a zip bomb?)")
    return data


def read_frames(path: str | Path, *, stride: int = 1, max_frames: int = 48, max_pixels: int = 1920 * 1080,
                limits: ZipLimits = ZipLimits()) -> ZipFrames:
    """Every ``stride``-th image of the zip at ``path`` (natural order) as ``[H, W, 3]`` uint8 RGB, resized to
    the first frame's size where they differ.

    Raises :class:`ZipFramesError`, naming the file (and the member), for a file that is no zip or a corrupt one,
    an empty zip or one with no image, more than ``max_frames`` frames at this stride, a member that is
    encrypted, compressed otherwise than stored/deflated, declared or found larger than ``limits`` allow, or no
    image :func:`~algm_viz.preprocess.read_image` reads within ``max_pixels``. All bounds but the real bytes
    and the pixels are checked before any member is read.
    """
    archive, zip_name = _open(path, limits)
    with archive:
        images, skipped = _members(archive, zip_name, limits)
        chosen = images[::stride]
        if len(chosen) > max_frames:
            raise ZipFramesError(f"{zip_name} has {len(images)} frames: with stride {stride} that is {len(chosen)} "
                                 f"to analyse, over the {max_frames} accepted; use a stride of at least "
                                 f"{math.ceil(len(images) / max_frames)} or fewer frames")
        labels = [f"{zip_name}: {_shown(e.filename)}" for e in chosen]
        for entry, label in zip(chosen, labels):
            _check_member(entry, label, limits)
        total = sum(e.file_size for e in chosen)
        if total > limits.max_total_bytes:
            raise ZipFramesError(f"{zip_name}: the {len(chosen)} frames to read declare {total / _MEBI:.1f} MiB "
                                 f"uncompressed; at most {limits.max_total_bytes / _MEBI:g} MiB are accepted: use a "
                                 "larger stride or fewer frames")
        frames: list[np.ndarray] = []
        for entry, label in zip(chosen, labels):
            try:
                with archive.open(entry) as stream:
                    data = read_capped(stream, entry.file_size, label)
            except ZipFramesError:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
                raise ZipFramesError(f"{label} is corrupt: its data does not match its header ({error})") from None
            try:
                frames.append(read_image(data, max_pixels, label))
            except ImageError as error:
                raise ZipFramesError(str(error)) from None
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} file{'s' * (len(skipped) > 1)} that {'are' if len(skipped) > 1 else 'is'} "
                     f"no image frame skipped: {_listed(skipped)}")
    height, width = frames[0].shape[:2]
    resized = [i for i, frame in enumerate(frames) if frame.shape[:2] != (height, width)]
    for i in resized:
        frames[i] = cv2.resize(frames[i], (width, height), interpolation=cv2.INTER_AREA)
    if resized:
        notes.append(f"{len(resized)} frame{'s' * (len(resized) > 1)} of another size resized to {width}×{height} "
                     "(the first frame's)")
    return ZipFrames(frames, [e.filename for e in chosen], len(images), notes)
