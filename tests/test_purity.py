"""Merge purity and error attribution on hand-built merges with known answers, and on a real model."""

import json
import math

import numpy as np
import pytest
import torch

import algm_viz
from algm_viz.evaluation.purity import (add_counts, attribution_counts, mixed_groups, purity_analysis, purity_counts,
                                        stage_merges, summarize)
from algm_viz.evaluation.tokens import patch_class_counts, token_classes
from algm_viz.merging import Merge
from algm_viz.models import create_segmenter

# A 2×4 grid of 2×2-pixel patches: classes 0 0 1 1 / 0 2 2 unlabelled (255).
PATCH_CLASSES = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
LOCAL = Merge(torch.tensor([[0, 0, 1, 1, 2, 3, 4, 4]]), torch.tensor([5]), 5)  # {p0 p1}, {p2 p3}, p4, p5, {p6 p7}
GLOBAL = Merge(torch.tensor([[0, 1, 1, 0, 2]]), torch.tensor([3]), 3)  # {p0 p1 p5}, {p2 p3 p4}, {p6 p7}


def patch_counts() -> torch.Tensor:
    labels = torch.from_numpy(np.kron(PATCH_CLASSES, np.ones((2, 2), np.int64)))[None]  # [1, 4, 8]
    return patch_class_counts(labels, 2, 3, 255)


def test_counts_per_stage_on_a_hand_built_merge():
    merges = {"local": LOCAL, "global": LOCAL.then(GLOBAL)}
    counts = purity_counts(patch_counts(), merges)
    # CLAP: three merged groups, all pure (the unlabelled patch takes part in no class).
    assert counts["local"] == {"merged_groups": 3, "mixed_groups": 0, "patches_merged": 5, "patches_mixed": 0,
                               "class_merged": [2, 2, 1], "class_mixed": [0, 0, 0]}
    # GBM: {p0 p1 p5} = classes 0, 0, 2 and {p2 p3 p4} = 1, 1, 0 mix; {p6 p7} = 2 is pure.
    assert counts["global"] == {"merged_groups": 3, "mixed_groups": 2, "patches_merged": 7, "patches_mixed": 6,
                                "class_merged": [3, 2, 2], "class_mixed": [3, 2, 1]}
    summary = summarize(counts, class_names=["a", "b", "c"])["stages"]
    assert summary["local"]["mixed_group_share"] == 0.0
    assert summary["global"]["mixed_group_share"] == pytest.approx(2 / 3)
    assert summary["global"]["mixed_patch_share"] == pytest.approx(6 / 7)
    assert summary["global"]["class_mixed_share"] == pytest.approx([1.0, 1.0, 0.5])
    no_merge = purity_counts(patch_counts(), {"local": Merge.identity(1, 8)})
    assert summarize(no_merge)["stages"]["local"]["class_mixed_share"] == [None, None, None]
    assert math.isnan(summarize(no_merge)["stages"]["local"]["mixed_group_share"])


def test_mixed_map_and_attribution_on_known_pixels():
    classes = token_classes(patch_counts())
    mixed = mixed_groups(classes, LOCAL.then(GLOBAL), 3)
    assert mixed[0].tolist() == [True, True, True, True, True, True, False, False]
    changed = torch.zeros(1, 4, 8, dtype=torch.bool)
    changed[0, 0, 0] = True  # patch 0: in a mixed group
    changed[0, 3, 7] = True  # patch 7: in the pure group
    changed[0, 2, 2:4] = True  # patch 5: mixed
    counts = attribution_counts(changed, mixed, (2, 4), 2)
    assert counts == {"changed": 4, "changed_in_mixed": 3, "pixels": 32, "pixels_in_mixed": 24}
    summary = summarize({}, counts)["attribution"]
    assert summary["changed_in_mixed_share"] == 0.75 and summary["pixels_in_mixed_share"] == 0.75
    cropped = attribution_counts(changed[:, :3, :7], mixed, (2, 4), 2)  # the grid covers the padded image
    assert cropped["pixels"] == 21 and cropped["changed"] == 3 and cropped["changed_in_mixed"] == 3


def test_counts_add_over_images():
    merges = {"local": LOCAL}
    once = purity_counts(patch_counts(), merges)
    twice = add_counts(add_counts(None, once), once)
    assert twice["local"]["merged_groups"] == 6 and twice["local"]["class_merged"] == [4, 4, 2]


def test_stage_merges_compose_the_record():
    record = algm_viz.patch.MergeRecord(grid=(2, 4), stages=[("local", 1, LOCAL), ("global", 5, GLOBAL)])
    merges = stage_merges(record)
    assert merges["local"] is LOCAL
    assert merges["global"].groups.tolist() == LOCAL.then(GLOBAL).groups.tolist() == [[0, 0, 1, 1, 1, 0, 2, 2]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=6, embed_dim=64, num_heads=2, patch_size=8,
                            image_size=64, decoder="linear").eval()


def samples(count: int = 2):
    rng = np.random.default_rng(0)
    for _ in range(count):
        image = np.zeros((40, 56, 3), np.uint8)
        image[:20] = (200, 60, 40)
        image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
        label = np.zeros((40, 56), np.uint8)
        label[20:] = 1
        label[:, 40:] = 2
        yield image, label


def test_purity_analysis_on_a_model_merging_nothing_and_everything(model):
    result = purity_analysis(model, samples(), 3, [1.0, -2.0], global_layer=3, class_names=["a", "b", "c"])
    assert result["images"] == 2 and algm_viz.algm_state(model) is None, "the model is left unmerged"
    nothing, everything = result["rows"]
    assert nothing["stages"]["local"]["merged_groups"] == 0 and nothing["attribution"]["changed"] == 0
    assert nothing["tokens"]["global"] == 5 * 7
    windows = (5 // 2) * (7 // 2)
    assert everything["stages"]["local"]["merged_groups"] == 2 * windows, "τ < -1 merges every full window"
    assert everything["tokens"]["local"] == 5 * 7 - 3 * windows
    # Windows on the class-1/class-2 border (column 40 = patch column 5, inside window columns 4-5) mix classes.
    assert everything["stages"]["local"]["mixed_groups"] >= 2
    assert 0 < everything["attribution"]["pixels_in_mixed"] <= everything["attribution"]["pixels"]
    json.dumps(result)  # JSON-ready (NaN allowed)


def test_analyze_command_writes_purity_rows(tmp_path, random_folder_data, tiny_official_model):
    from algm_viz.cli import main

    out = tmp_path / "similarity.json"
    assert main(["analyze", "--model", str(tiny_official_model), "--data", str(random_folder_data), "--dataset", "folder",
                 "--classes", "a,b,c", "--windows", "2", "--purity-taus", "0.5,1.0", "--global-layer", "3",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["tau"] for row in result["purity"]["rows"]] == [0.5, 1.0]
    assert result["purity"]["rows"][1]["stages"]["global"]["merged_groups"] == 0
    assert main(["analyze", "--model", str(tiny_official_model), "--data", str(random_folder_data), "--dataset", "folder",
                 "--classes", "a,b,c", "--purity-taus", "auto", "--out", str(out)]) == 2


def test_app_purity_readout_from_the_cached_forwards():
    from algm_viz.app.models import ModelRegistry
    from algm_viz.app.purity import purity, purity_markdown
    from algm_viz.app.session import ImageSession, Settings

    tiny = dict(num_classes=3, depth=6, embed_dim=64, num_heads=2, decoder="linear", patch_size=8, image_size=64)
    registry = ModelRegistry(device="cpu", default_short_side=40, untrained=tiny, include_bundled=False)
    entry = registry.get(registry.default_key())
    image, label = next(samples(1))
    settings = Settings(0.6, 0.6, 2, 3)
    for session, source in ((ImageSession(entry, image), "baseline prediction"), (ImageSession(entry, image, label), "label map")):
        picture, summary = purity(session, settings)
        assert summary["classes_from"].startswith(source)
        result, base = session.algm(settings), session.baseline()
        groups = result.maps.final_groups
        assert summary["stages"]["global"]["merged_groups"] == int((np.bincount(groups.ravel()) > 1).sum())
        assert summary["attribution"]["changed"] == int((base.prediction != result.prediction).sum())
        assert picture.shape == session.image.shape
        text = purity_markdown(summary)
        assert "Merge purity" in text and source in text and "Error attribution" in text
