"""Data set readers: the shared CamVid / ADE20K samples (skipped when absent) and tiny folders made here."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from algm_viz.datasets import (IGNORE_INDEX, ade20k, camvid, folder, join_folders, open_dataset, parse_sequences,
                               read_label, select_sequences, sequence_of, spread_indices)

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


def test_camvid_sequence_splits_across_train_and_val():
    root = _require("camvid")
    train = camvid(root, "train+val", ("0001TP", "0016E5"))
    val = open_dataset("camvid", root, "train+val", sequences=["0006R0"])
    assert {sequence_of(p) for p in train.files} == {"0001TP", "0016E5"}
    assert {sequence_of(p) for p in val.files} == {"0006R0"}
    everything = camvid(root, "train+val")
    assert len(train) + len(val) == len(everything) == len(camvid(root, "train")) + len(camvid(root, "val"))
    assert not {p.name for p in train.files} & {p.name for p in val.files}
    from_val = [i for i, p in enumerate(train.files) if p.parent.name == "val"]
    assert from_val and train.label_files[from_val[0]].parent.name == "valannot"
    _, label = train[from_val[0]]
    assert np.array_equal(label, camvid(root, "val")[camvid(root, "val").files.index(train.files[from_val[0]])][1])


def test_sequence_selection_join_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for part, stems in (("one", ("s1_a", "s2_a")), ("two", ("s1_b", "s3_a"))):
        for stem in stems:
            _write(tmp_path / part / "images" / f"{stem}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            _write(tmp_path / part / "labels" / f"{stem}.png", np.full((4, 4), int(stem[1]) - 1, np.uint8))
    one, two = (folder(tmp_path / p / "images", tmp_path / p / "labels", ["x", "y", "z"]) for p in ("one", "two"))
    joined = join_folders([one, two])
    assert [p.stem for p in joined.files] == ["s1_a", "s2_a", "s1_b", "s3_a"]
    assert [int(joined[i][1][0, 0]) for i in range(4)] == [0, 1, 0, 2]  # each label read from its own folder
    s1 = select_sequences(joined, parse_sequences("s1, "))
    assert [p.stem for p in s1.files] == ["s1_a", "s1_b"] and len(joined) == 4
    assert select_sequences(joined, None) is joined and parse_sequences("") is None
    assert sequence_of("0016E5_07959.png") == "0016E5" and sequence_of("plain.png") == "plain"
    with pytest.raises(ValueError, match="no image of sequence"):
        select_sequences(joined, ["s9"])
    with pytest.raises(ValueError, match="share file names"):
        join_folders([one, one])


def test_spread_indices_stratify_by_sequence_and_are_seeded(tmp_path):
    counts = {"aa": 6, "bb": 3, "cc": 1}
    for stem in (f"{seq}_{i}" for seq, n in counts.items() for i in range(n)):
        _write(tmp_path / "images" / f"{stem}.png", np.zeros((2, 2, 3), np.uint8))
    ds = folder(tmp_path / "images", None, ["x"])
    chosen = spread_indices(ds, 5, seed=0)
    assert chosen == sorted(set(chosen)) and len(chosen) == 5
    picked = [sequence_of(ds.files[i]) for i in chosen]
    assert picked.count("aa") == 3 and picked.count("bb") in (1, 2) and picked.count("cc") in (0, 1)  # 3, 1.5, 0.5
    assert spread_indices(ds, 5, seed=0) == chosen
    assert {tuple(spread_indices(ds, 5, seed=s)) for s in range(8)} != {tuple(chosen)}
    assert spread_indices(ds, None) == spread_indices(ds, 99) == list(range(10))
    assert [sequence_of(ds.files[i]) for i in spread_indices(ds, 3, seed=1)].count("aa") >= 1
    assert len(spread_indices(list(range(7)), 4, seed=2)) == 4  # no files: one stratum
    with pytest.raises(ValueError):
        spread_indices(ds, 0)
