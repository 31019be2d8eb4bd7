"""Data set readers: the shared CamVid / ADE20K samples (skipped when absent) and tiny folders made here."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from algm_viz.datasets import IGNORE_INDEX, ade20k, camvid, folder, open_dataset, read_label

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"shared data set {path} is not on this machine")
    return path


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def test_camvid_val_layout_and_ignore_label():
    root = _require("camvid")
    ds = camvid(root, "val")
    assert len(ds) == len(list((root / "val").glob("*.png")))
    assert ds.num_classes == 11 and len(ds.colors) == 11
    image, label = ds[0]
    raw = read_label(root / "valannot" / ds.files[0].name)
    assert image.shape == (*raw.shape, 3) and image.dtype == np.uint8
    assert np.array_equal(label == IGNORE_INDEX, raw >= 11)
    assert np.array_equal(label[raw < 11], raw[raw < 11])


def test_ade20k_samples_shift_classes_and_ignore_other():
    root = _require("ade20k_samples")
    ds = ade20k(root)
    assert len(ds) == 3 and ds.num_classes == 150
    assert ds.class_names[0].lower() == "wall"
    _, label = ds[0]
    raw = read_label(root / "annotations" / f"{ds.files[0].stem}.png")
    assert np.array_equal(label == IGNORE_INDEX, raw == 0)
    assert np.array_equal(label[raw > 0], raw[raw > 0] - 1)


def test_folder_layout_made_here(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("b", "a"):
        _write(tmp_path / "images" / f"{stem}.png", rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        label = rng.integers(0, 3, (6, 8)).astype(np.uint8)
        label[0, 0], label[0, 1] = 9, 3  # 9 = ignore index, 3 >= K: both ignored
        _write(tmp_path / "labels" / f"{stem}.png", label)
    ds = folder(tmp_path / "images", tmp_path / "labels", ["x", "y", "z"], ignore_index=9)
    assert [p.stem for p in ds.files] == ["a", "b"]
    image, label = ds[0]
    bgr = cv2.imread(str(tmp_path / "images" / "a.png"))
    assert np.array_equal(image, bgr[..., ::-1])
    assert label[0, 0] == IGNORE_INDEX and label[0, 1] == IGNORE_INDEX
    assert set(np.unique(label)) <= {0, 1, 2, IGNORE_INDEX}
    assert open_dataset("folder", tmp_path, class_names=["x", "y", "z"]).num_classes == 3


def test_folder_without_labels_and_bad_input(tmp_path):
    _write(tmp_path / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    ds = open_dataset("folder", tmp_path, class_names=["x"])
    assert ds[0][1] is None
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no label map"):
        open_dataset("folder", tmp_path, class_names=["x"])
    with pytest.raises(ValueError, match="class names"):
        open_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="unknown data set kind"):
        open_dataset("voc", tmp_path)
    with pytest.raises(FileNotFoundError):
        camvid(tmp_path / "missing")
