"""Synthetic street scenes: reproducible, exact labels, the shipped examples are what the function draws,
and the bundled model reads them as streets."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from algm_viz.scenes import CAMVID_CLASSES, street_scene

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
SHIPPED = sorted(EXAMPLES.glob("street_*.png"))


def test_scene_is_reproducible_with_labels_of_every_main_class():
    first, again, other = street_scene(1), street_scene(1), street_scene(2)
    assert first.image.shape == (360, 480, 3) and first.image.dtype == np.uint8 and first.label.shape == (360, 480)
    assert (first.image == again.image).all() and (first.label == again.label).all()
    assert (first.image != other.image).any()
    present = {CAMVID_CLASSES[c] for c in np.unique(first.label)}
    assert {"Sky", "Building", "Road", "Pavement", "Car"} <= present
    assert first.label.max() < len(CAMVID_CLASSES)
    top, bottom = first.label[:20], first.label[-20:]
    assert (top != CAMVID_CLASSES.index("Road")).all() and (bottom != CAMVID_CLASSES.index("Sky")).all()


def test_scene_size_is_checked():
    assert street_scene(0, height=120, width=200).label.shape == (120, 200)
    with pytest.raises(ValueError, match="at least 32"):
        street_scene(0, height=16)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_examples_are_what_street_scene_draws(path):
    seed = int(path.stem.split("_")[1])
    scene = street_scene(seed)
    assert (cv2.imread(str(path))[:, :, ::-1] == scene.image).all()
    assert (cv2.imread(str(EXAMPLES / "labels" / path.name), cv2.IMREAD_UNCHANGED) == scene.label).all()


def test_bundled_model_reads_the_shipped_scenes_as_streets():
    import torch

    from algm_viz.evaluation.inference import predict_logits
    from algm_viz.models.bundled import load_bundled

    if not SHIPPED:
        pytest.skip("no shipped street examples")
    model = load_bundled()
    for path in SHIPPED:
        scene = street_scene(int(path.stem.split("_")[1]))
        with torch.inference_mode():
            prediction = predict_logits(model, scene.image, short_side=360).argmax(0).numpy()
        accuracy = (prediction == scene.label).mean()
        assert accuracy > 0.5, f"{path.name}: only {accuracy:.0%} of pixels labelled as drawn"
