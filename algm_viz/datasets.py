"""Segmentation data sets on disk: image folder + label-map folder, with a class list.

Labels are returned with the data set's ignore pixels set to :data:`IGNORE_INDEX` and classes numbered
``0..num_classes-1``. Layouts: a generic folder pair, CamVid (SegNet split: 11 classes, 11 = ignore),
and ADE20K (``ADEChallengeData2016``: 0 = ignore, 1..150 -> 0..149).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import copy

import cv2
import numpy as np

from . import preprocess

__all__ = ["IGNORE_INDEX", "SegmentationFolder", "camvid", "ade20k", "folder", "open_dataset", "read_image", "read_label",
           "sequence_of", "join_folders", "select_sequences", "parse_sequences", "spread_indices"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist")
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)


def read_image(path: str | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB, upright (EXIF orientation applied); see :func:`algm_viz.preprocess.read_image`."""
    return preprocess.read_image(path)


def read_label(path: str | Path) -> np.ndarray:
    """``[H, W]`` integer label map as stored (a palette PNG gives its indices); see
    :func:`algm_viz.preprocess.read_label`."""
    return preprocess.read_label(path)


def _distinct_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    hues = (np.arange(n) * 180 / max(n, 1)).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 200, np.uint8), np.full(n, 230, np.uint8)], axis=-1)[None]
    return tuple(tuple(int(c) for c in rgb) for rgb in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0])


@dataclass
class SegmentationFolder:
    """Pairs of ``images/<stem>.*`` and ``labels/<stem>.png``.

    ``label_map`` turns a stored label map into ``0..num_classes-1`` with ignore = :data:`IGNORE_INDEX`.
    """

    images: Path
    labels: Path | None
    class_names: Sequence[str]
    label_map: Callable[[np.ndarray], np.ndarray]
    colors: Sequence[tuple[int, int, int]] = field(default=())
    name: str = "folder"

    def __post_init__(self) -> None:
        self.images = Path(self.images)
        if not self.images.is_dir():
            raise FileNotFoundError(f"image folder {self.images} does not exist")
        self.files = sorted(p for p in self.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images in {self.images}")
        if self.labels is not None:
            self.labels = Path(self.labels)
            missing = [p.name for p in self.files if not (self.labels / f"{p.stem}.png").is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} images have no label map in {self.labels}, e.g. {missing[0]}")
        #: label map of each image (None without labels); :func:`join_folders` mixes folders, so kept per file.
        self.label_files: list[Path | None] = [
            self.labels / f"{p.stem}.png" if self.labels is not None else None for p in self.files]
        if not self.colors:
            self.colors = _distinct_colors(len(self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``([H, W, 3]`` uint8 image, ``[H, W]`` uint8 label or None``)``."""
        image = read_image(self.files[index])
        label_file = self.label_files[index]
        if label_file is None:
            return image, None
        return image, self.label_map(read_label(label_file))

    def subset(self, indices: Sequence[int]) -> "SegmentationFolder":
        """The same data set restricted to ``indices`` (in that order)."""
        out = copy.copy(self)
        out.files = [self.files[i] for i in indices]
        out.label_files = [self.label_files[i] for i in indices]
        return out


def sequence_of(path: str | Path) -> str:
    """The sequence (recording) an image belongs to: its file-name prefix before the first ``_``
    (CamVid: ``0016E5_07959.png`` -> ``0016E5``); the whole stem where there is no ``_``."""
    return Path(path).stem.split("_", 1)[0]


def join_folders(folders: Sequence[SegmentationFolder]) -> SegmentationFolder:
    """One data set holding the images of ``folders`` (same classes), in order; a name appearing twice is an error."""
    if not folders:
        raise ValueError("no data set to join")
    first = folders[0]
    if any(tuple(f.class_names) != tuple(first.class_names) for f in folders[1:]):
        raise ValueError("cannot join data sets with different class lists")
    out = copy.copy(first)
    out.files = [p for f in folders for p in f.files]
    out.label_files = [p for f in folders for p in f.label_files]
    names = [p.name for p in out.files]
    if len(set(names)) != len(names):
        raise ValueError("the joined data sets share file names")
    if any(p is None for p in out.label_files) and not all(p is None for p in out.label_files):
        raise ValueError("cannot join labelled and unlabelled data sets")
    out.labels = None if out.label_files[0] is None else first.labels
    return out


def parse_sequences(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"0001TP,0016E5"`` (or a list) -> ``("0001TP", "0016E5")``; None / empty -> None (all sequences)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(p.strip() for p in parts if p.strip())
    return names or None


def spread_indices(dataset: Sequence | SegmentationFolder, count: int | None, seed: int = 0) -> list[int]:
    """Indices of ``count`` items spread over the whole of ``dataset`` (all of them when ``count`` is None or
    not smaller), in data-set order.

    Stratified by sequence (:func:`sequence_of` of ``dataset.files`` where it has files; one stratum
    otherwise): each sequence gets its share of ``count`` (largest remainder, ties broken at random), and
    the images within a sequence are drawn at random without replacement; seeded by ``seed``.
    """
    total = len(dataset)
    if count is None or count >= total:
        return list(range(total))
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    files = getattr(dataset, "files", None)
    keys = [sequence_of(p) for p in files] if files is not None else [""] * total
    strata: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        strata.setdefault(key, []).append(index)
    rng = np.random.default_rng(seed)
    members = list(strata.values())
    quotas = np.array([count * len(m) / total for m in members])
    shares = np.floor(quotas).astype(int)
    tie_break = rng.permutation(len(members))
    order = sorted(range(len(members)), key=lambda i: (-(quotas[i] - shares[i]), tie_break[i]))
    for i in order[: count - int(shares.sum())]:
        shares[i] += 1
    chosen = [int(v) for m, k in zip(members, shares) for v in rng.choice(m, size=int(k), replace=False)]
    return sorted(chosen)


def select_sequences(folder: SegmentationFolder, sequences: Sequence[str] | None) -> SegmentationFolder:
    """The images of ``folder`` whose :func:`sequence_of` is in ``sequences`` (None = all). A sequence with no
    image is an error (a typo must not silently shrink a split)."""
    if sequences is None:
        return folder
    present = {sequence_of(p) for p in folder.files}
    unknown = sorted(set(sequences) - present)
    if unknown:
        raise ValueError(f"no image of sequence(s) {unknown} in {folder.images}; present: {sorted(present)}")
    wanted = set(sequences)
    return folder.subset([i for i, p in enumerate(folder.files) if sequence_of(p) in wanted])


def _camvid_labels(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.uint8, copy=True)
    out[label >= len(CAMVID_CLASSES)] = IGNORE_INDEX
    return out


def _ade20k_labels(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.int32) - 1
    out[(label == 0) | (label > 150)] = IGNORE_INDEX
    return out.astype(np.uint8)


def camvid(root: str | Path, split: str = "val", sequences: Sequence[str] | None = None) -> SegmentationFolder:
    """CamVid, SegNet layout: ``<split>/`` and ``<split>annot/``. ``split`` may join folders with ``+``
    (``"train+val"``); ``sequences`` keeps only the images of these sequences (file-name prefixes, e.g.
    ``("0006R0",)``), so that training and validation can be split by recording instead of by folder."""
    root = Path(root)
    parts = [part.strip() for part in split.split("+") if part.strip()]
    if not parts:
        raise ValueError(f"empty CamVid split {split!r}")
    folders = [SegmentationFolder(root / part, root / f"{part}annot", CAMVID_CLASSES, _camvid_labels, CAMVID_COLORS, "camvid")
               for part in parts]
    return select_sequences(folders[0] if len(folders) == 1 else join_folders(folders), sequences)


def _ade20k_class_names(root: Path) -> tuple[str, ...]:
    info = root / "objectInfo150.txt"
    if info.is_file():
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        return tuple(row[-1].split(";")[0].strip() for row in rows)
    return tuple(f"class {i}" for i in range(1, 151))


def ade20k(root: str | Path, split: str = "validation") -> SegmentationFolder:
    """ADE20K challenge layout: ``images/<split>/`` + ``annotations/<split>/`` (or flat ``images/`` +
    ``annotations/``, as in ``ade20k_samples``)."""
    root = Path(root)
    images, labels = root / "images" / split, root / "annotations" / split
    if not images.is_dir():
        images, labels = root / "images", root / "annotations"
    return SegmentationFolder(images, labels, _ade20k_class_names(root), _ade20k_labels, name="ade20k")


def folder(images: str | Path, labels: str | Path | None, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX) -> SegmentationFolder:
    """Generic layout: labels already ``0..K-1``; ``ignore_index`` (and anything >= K) is ignored."""
    k = len(class_names)

    def label_map(label: np.ndarray) -> np.ndarray:
        out = label.astype(np.int64)
        out[(out == ignore_index) | (out >= k) | (out < 0)] = IGNORE_INDEX
        return out.astype(np.uint8)

    return SegmentationFolder(Path(images), Path(labels) if labels else None, tuple(class_names), label_map)


def open_dataset(kind: str, root: str | Path, split: str | None = None, class_names: Sequence[str] | None = None,
                 sequences: Sequence[str] | None = None) -> SegmentationFolder:
    """``kind`` in ``camvid | ade20k | folder`` (``folder``: ``root/images`` + ``root/labels`` + ``class_names``).
    ``sequences``: keep only images whose file-name prefix (:func:`sequence_of`) is one of these."""
    if kind == "camvid":
        return camvid(root, split or "val", sequences)
    if kind == "ade20k":
        return select_sequences(ade20k(root, split or "validation"), sequences)
    if kind == "folder":
        if not class_names:
            raise ValueError("a folder data set needs its class names")
        root = Path(root)
        labels = root / "labels"
        return select_sequences(folder(root / "images", labels if labels.is_dir() else None, class_names), sequences)
    raise ValueError(f"unknown data set kind {kind!r}: use camvid, ade20k or folder")
