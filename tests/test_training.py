"""The trainer: augmentations, a short run whose loss falls, exact resume, CLI and export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algm_viz.cli import main
from algm_viz.datasets import IGNORE_INDEX
from algm_viz.models import create_segmenter
from algm_viz.models.bundled import load_bundled
from algm_viz.training import Augment, TrainConfig, class_mix, load_init_weights, random_crop, resize_short_side, train
from algm_viz.training.trainer import median_frequency_weights
from algm_viz.training import trainer as trainer_module

CLASSES = ("left", "right", "square")
PALETTE = np.array([[200, 40, 40], [40, 40, 200], [40, 200, 40]], dtype=np.uint8)
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A label map (two halves split at a random column, a random square) and its colour image with noise."""
    label = np.zeros((size, size), np.uint8)
    label[:, int(rng.integers(size // 4, 3 * size // 4)) :] = 1
    top, left = rng.integers(0, size // 2, 2)
    label[top : top + size // 3, left : left + size // 3] = 2
    image = PALETTE[label].astype(np.int16) + rng.integers(-20, 21, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``folder`` layout: ``<split>/images`` + ``<split>/labels``, 8 train and 4 val scenes."""
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            image, label = _scene(rng)
            cv2.imwrite(str(root / split / "images" / f"{i}.png"), image[..., ::-1])
            cv2.imwrite(str(root / split / "labels" / f"{i}.png"), label)
    return root


def _config(data_root: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), dataset="folder", data_root=str(data_root / "train"), val_split=None,
                    class_names=CLASSES, encoder_kwargs=TINY, short_side=64, crop_size=(64, 64), batch_size=4,
                    epochs=3, lr=1e-3, warmup_iters=2, eval_every=1, threads=1, progress=False, log_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_random_crop_pads_with_ignore():
    image = np.full((10, 12, 3), 7, np.uint8)
    label = np.ones((10, 12), np.uint8)
    out_image, out_label = random_crop(image, label, np.random.default_rng(0), (16, 20))
    assert out_image.shape == (16, 20, 3) and out_label.shape == (16, 20)
    assert (out_label[10:] == IGNORE_INDEX).all() and (out_label[:, 12:] == IGNORE_INDEX).all()
    assert (out_label[:10, :12] == 1).all() and (out_image[10:] == 0).all()


def test_augment_keeps_image_and_label_aligned_and_is_seeded():
    image, label = _scene(np.random.default_rng(1))
    image = PALETTE[label]  # colour = class, so alignment is checkable pixel by pixel
    augment = Augment((48, 48), scale_range=(1.0, 1.0), flip_p=0.5, jitter=0.0)
    for seed in range(6):
        out_image, out_label = augment(image, label, np.random.default_rng(seed))
        assert out_image.shape == (48, 48, 3) and out_label.dtype == np.uint8
        np.testing.assert_array_equal(out_image, PALETTE[out_label])
    again = Augment((48, 48))(image, label, np.random.default_rng(3)), Augment((48, 48))(image, label, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0][0], again[1][0])


def test_class_mix_pastes_whole_classes_of_the_partner_with_their_pixels():
    labels = torch.stack([torch.from_numpy(_scene(np.random.default_rng(i))[1]).long() for i in range(4)])
    labels[:, :4] = IGNORE_INDEX  # a void band
    colours = torch.zeros(256, 3, dtype=torch.uint8)
    colours[: len(PALETTE)] = torch.from_numpy(PALETTE)
    colour = lambda lab: colours[lab].permute(0, 3, 1, 2)  # colour = class, so alignment is checkable
    images = colour(labels)
    mixed_images, mixed_labels = class_mix(images, labels, torch.Generator().manual_seed(0), p=1.0,
                                           num_classes=len(PALETTE))
    assert mixed_images.shape == images.shape and mixed_labels.shape == labels.shape
    torch.testing.assert_close(mixed_images, colour(mixed_labels))
    partner, pasted = labels.roll(1, dims=0), mixed_labels != labels
    assert pasted.any(), "p=1 pastes something"
    torch.testing.assert_close(mixed_labels[pasted], partner[pasted])
    for b in range(4):  # each class of the partner is pasted everywhere or nowhere; void never
        for c in partner[b].unique().tolist():
            where = partner[b] == c
            kept = (mixed_labels[b][where] == labels[b][where]).all()
            assert kept if c == IGNORE_INDEX else kept or (mixed_labels[b][where] == c).all()
    again = class_mix(images, labels, torch.Generator().manual_seed(0), p=1.0, num_classes=len(PALETTE))
    torch.testing.assert_close(again[1], mixed_labels)
    assert class_mix(images, labels, torch.Generator(), p=0.0)[1] is labels


def test_resize_short_side():
    image, label = np.zeros((360, 480, 3), np.uint8), np.zeros((360, 480), np.uint8)
    small, small_label = resize_short_side(image, label, 240)
    assert small.shape == (240, 320, 3) and small_label.shape == (240, 320)
    with pytest.raises(ValueError):
        resize_short_side(image, label, 0)


def test_median_frequency_weights():
    weights = median_frequency_weights(np.array([0.6, 0.3, 0.1, 0.0]))
    np.testing.assert_allclose(weights.numpy(), [0.5, 1.0, 3.0, 1.0], rtol=1e-6)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(out=str(tmp_path), epochs=0)
    with pytest.raises(ValueError, match="class_weighting"):
        TrainConfig(out=str(tmp_path), class_weighting="inverse")


def test_loss_falls_and_validation_is_logged(data_root, tmp_path):
    out = tmp_path / "run"
    summary = train(_config(data_root, out, epochs=8, val_split="val", val_root=str(data_root / "val"), eval_every=4, class_weighting="median_freq"))
    epochs = [r for r in _log(out) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"]
    assert {r["epoch"] for r in epochs if "val_miou" in r} == {4, 8}
    assert summary["best_miou"] == max(r["val_miou"] for r in epochs if "val_miou" in r)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] and best["class_names"] == list(CLASSES)


class _Interrupted(Exception):
    pass


def test_resumed_run_continues_exactly(data_root, tmp_path, monkeypatch):
    train(_config(data_root, tmp_path / "straight", class_mix_p=0.5))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]

    save = trainer_module.save_checkpoint

    def save_then_stop(state, path):
        save(state, path)
        if path.name == "last.pt":
            raise _Interrupted

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        train(_config(data_root, tmp_path / "resumed", class_mix_p=0.5))
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    with pytest.raises(ValueError, match="resume"):
        train(_config(data_root, tmp_path / "resumed", class_mix_p=0.5))
    train(_config(data_root, tmp_path / "resumed", class_mix_p=0.5, resume=True))

    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    events = [(r["event"], r["epoch"]) for r in _log(tmp_path / "resumed") if r["event"] in ("start", "resume", "epoch")]
    assert events == [("start", 0), ("epoch", 1), ("resume", 1), ("epoch", 2), ("epoch", 3)]


def test_training_with_algm_runs(data_root, tmp_path):
    summary = train(_config(data_root, tmp_path, epochs=1, algm=True, algm_thresholds={"local": 0.5, "global": 0.5},
                            encoder_kwargs={**TINY, "depth": 5}))
    assert summary["steps"] == 2
    assert np.isfinite([r["loss"] for r in _log(tmp_path) if r["event"] == "epoch"]).all()


def test_cli_trains_and_exports_a_bundled_model(data_root, tmp_path):
    out, bundle = tmp_path / "run", tmp_path / "bundle"
    code = main(["train", "--dataset", "folder", "--data-root", str(data_root / "train"), "--val-split", "none",
                 "--class-names", *CLASSES, "--encoder-kwargs", json.dumps(TINY), "--short-side", "64",
                 "--crop-size", "64", "--epochs", "1", "--batch-size", "4", "--threads", "1", "--no-progress",
                 "--out", str(out), "--export", str(bundle)])
    assert code == 0
    model = load_bundled(bundle)
    assert model.info.class_names == CLASSES and model.info.short_side == 64 and model.num_classes == 3
    trained = torch.load(out / "best.pt", weights_only=True)["model"]
    weight = "encoder.patch_embed.proj.weight"
    torch.testing.assert_close(model.state_dict()[weight], trained[weight].half().float())


def test_init_weights_skip_tensors_that_do_not_fit(tmp_path):
    source = create_segmenter(num_classes=3, image_size=64, **TINY)
    torch.save({"model": source.state_dict()}, tmp_path / "best.pt")
    target = create_segmenter(num_classes=5, image_size=64, **TINY)
    skipped = load_init_weights(target, tmp_path)
    assert "decoder.cls_emb" in skipped and not any(name.startswith("encoder.") for name in skipped)
    torch.testing.assert_close(target.encoder.blocks[0].attn.qkv.weight, source.encoder.blocks[0].attn.qkv.weight)
    with pytest.raises(FileNotFoundError):
        load_init_weights(target, tmp_path / "missing")


def test_init_weights_resample_the_position_embedding_to_another_grid(tmp_path):
    """A 4x6 grid embedding whose value is the row index stays a row ramp on the target's 6x4 grid."""
    source = create_segmenter(num_classes=3, image_size=(64, 96), **TINY)
    prefix = source.encoder.num_prefix_tokens
    with torch.no_grad():
        source.encoder.pos_embed[:, :prefix] = 7.0
        rows = torch.arange(4.0).view(4, 1, 1).expand(4, 6, 64).reshape(1, 24, 64)
        source.encoder.pos_embed[:, prefix:] = rows
    torch.save({"model": source.state_dict(), "model_config": {"image_size": [64, 96]}}, tmp_path / "best.pt")
    target = create_segmenter(num_classes=3, image_size=(96, 64), **TINY)
    assert load_init_weights(target, tmp_path) == []
    embedding = target.encoder.pos_embed.detach()
    torch.testing.assert_close(embedding[:, :prefix], torch.full((1, prefix, 64), 7.0))
    grid = embedding[0, prefix:, 0].view(6, 4)
    torch.testing.assert_close(grid, grid[:, :1].expand(6, 4))  # constant along a row
    assert torch.all(grid[1:, 0] > grid[:-1, 0]) and grid[0, 0] < 0.5 and grid[-1, 0] > 2.5


def test_ema_weights_are_validated_saved_and_resumed(data_root, tmp_path):
    out = tmp_path / "ema"
    config = _config(data_root, out, epochs=2, val_split="val", val_root=str(data_root / "val"), ema_decay=0.9)
    summary = train(config)
    epochs = [r for r in _log(out) if r["event"] == "epoch"]
    assert all("ema_val_miou" in r and "val_miou" in r for r in epochs)
    assert summary["best_ema_epoch"] in (1, 2)
    ema_state = torch.load(out / "best_ema.pt", weights_only=True)["model"]
    raw_state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert ema_state.keys() == raw_state.keys()
    assert not all(torch.equal(ema_state[k], raw_state[k]) for k in raw_state)  # an average, not a copy
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["ema"].keys() == raw_state.keys()
    resumed = train(TrainConfig(**{**config.__dict__, "epochs": 3, "resume": True}))
    assert resumed["steps"] == 3 * 2


def test_sequence_splits_select_images_and_reject_shared_images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "seq"
    for split, names in (("train", ("aa_0", "aa_1", "bb_0")), ("val", ("aa_2", "cc_0"))):
        for name in names:
            image, label = _scene(rng)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / split / "images" / f"{name}.png"), image[..., ::-1])
            cv2.imwrite(str(root / split / "labels" / f"{name}.png"), label)
    out = tmp_path / "run"
    config = _config(root, out, train_sequences=["aa"], val_split="val",
                     val_root=str(root / "val"), val_sequences="cc", epochs=1)
    train(config)
    start = _log(out)[0]
    assert start["train_images"] == 2 and start["val_images"] == 1
    from algm_viz.models.bundled import export_run

    exported = json.loads((export_run(out / "best.pt", tmp_path / "bundle") / "config.json").read_text())
    assert (exported["training"]["train_sequences"], exported["training"]["val_sequences"]) == (["aa"], ["cc"])
    assert exported["training"]["shared_sequences"] == []
    overlapping = tmp_path / "overlap"  # the whole val split: aa_2 is of a sequence it trains on
    train(TrainConfig(**{**config.__dict__, "out": str(overlapping), "val_sequences": None}))
    exported = json.loads((export_run(overlapping / "best.pt", tmp_path / "bundle2") / "config.json").read_text())
    assert exported["training"]["shared_sequences"] == ["aa"]
    with pytest.raises(ValueError, match="also training images"):
        train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "leak"), "val_root": str(root / "train"),
                             "val_sequences": ["bb"], "train_sequences": None}))
    with pytest.raises(ValueError, match="no image of sequence"):
        train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "typo"), "train_sequences": ["zz"]}))


def test_without_validation_the_ema_weights_are_saved_and_exported(data_root, tmp_path):
    """``--val-split none --ema-decay``: best_ema.pt holds the last epoch's EMA and ``--export`` writes it."""
    out, bundle = tmp_path / "run", tmp_path / "bundle"
    code = main(["train", "--dataset", "folder", "--data-root", str(data_root / "train"), "--val-split", "none",
                 "--class-names", *CLASSES, "--encoder-kwargs", json.dumps(TINY), "--short-side", "64",
                 "--crop-size", "64", "--epochs", "2", "--batch-size", "4", "--threads", "1", "--no-progress",
                 "--ema-decay", "0.5", "--out", str(out), "--export", str(bundle)])
    assert code == 0
    last = torch.load(out / "last.pt", weights_only=True)
    best_ema = torch.load(out / "best_ema.pt", weights_only=True)
    assert best_ema["epoch"] == 2 and best_ema["val_miou"] is None
    for name, tensor in last["ema"].items():
        torch.testing.assert_close(best_ema["model"][name], tensor)
    weight = "encoder.patch_embed.proj.weight"
    assert not torch.equal(best_ema["model"][weight], last["model"][weight])  # the average, not the raw weights
    exported = load_bundled(bundle).state_dict()[weight]
    torch.testing.assert_close(exported, best_ema["model"][weight].half().float())
