"""Intra-/inter-class similarity (paper Fig. 2): sums against brute force, and the analysis on a tiny model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algm_viz.evaluation.similarity import global_pair_sums, similarity_analysis, window_pair_sums
from algm_viz.models import create_segmenter
from algm_viz.plots import similarity_figure


def _brute(tokens, classes, pairs_of):
    """(intra sum, intra pairs, inter sum, inter pairs) over the ordered pairs ``pairs_of(image)`` yields."""
    unit = F.normalize(tokens.double(), dim=-1)
    out = np.zeros(4)
    for b in range(tokens.shape[0]):
        for i, j in pairs_of(b):
            ci, cj = int(classes[b, i]), int(classes[b, j])
            if i == j or ci < 0 or cj < 0:
                continue
            s = float(unit[b, i] @ unit[b, j])
            out += [s, 1, 0, 0] if ci == cj else [0, 0, s, 1]
    return out


def test_global_pair_sums_match_brute_force():
    tokens, classes = torch.randn(2, 11, 6), torch.randint(-1, 3, (2, 11))
    expected = _brute(tokens, classes, lambda b: [(i, j) for i in range(11) for j in range(11)])
    np.testing.assert_allclose(global_pair_sums(tokens, classes, 3).numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_window_pair_sums_match_brute_force(k):
    h, w = 5, 7
    tokens, classes = torch.randn(2, h * w, 6), torch.randint(-1, 3, (2, h * w))

    def window_pairs(b):
        for top in range(0, h - k + 1, k):
            for left in range(0, w - k + 1, k):
                cells = [(top + r) * w + left + c for r in range(k) for c in range(k)]
                yield from ((i, j) for i in cells for j in cells)

    expected = _brute(tokens, classes, window_pairs)
    np.testing.assert_allclose(window_pair_sums(tokens, classes, (h, w), k).numpy(), expected, atol=1e-9)


def test_identical_tokens_of_one_class_are_perfectly_similar():
    tokens = torch.ones(1, 4, 3)
    result = global_pair_sums(tokens, torch.tensor([[0, 0, 1, 1]]), 2)
    assert result.tolist() == pytest.approx([4.0, 4.0, 8.0, 8.0])


def test_analysis_on_tiny_model_counts_every_pair():
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=4, embed_dim=64, num_heads=2, image_size=64).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 4x6 patches
    label = np.repeat(np.repeat(rng.integers(0, 3, (4, 6)), 16, 0), 16, 1).astype(np.uint8)
    result = similarity_analysis(model, [(image, label)] * 2, 3, window_sizes=(2, 3, 4), layers=[1, 4])
    assert result["images"] == 2 and set(result["global"]) == {"1", "4"}
    for k, windows in ((2, 6), (3, 2), (4, 1)):
        stats = result["local"][str(k)]
        assert stats["intra_pairs"] + stats["inter_pairs"] == 2 * windows * k * k * (k * k - 1)
    total = result["global"]["1"]
    assert total["intra_pairs"] + total["inter_pairs"] == 2 * 24 * 23
    assert -1 <= total["inter"] <= 1 and -1 <= total["intra"] <= 1
    figure = similarity_figure(result)
    assert len(figure.data) == 4 and list(figure.data[0].x) == ["2×2", "3×3", "4×4"]


def test_analysis_needs_labels():
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=2, embed_dim=64, num_heads=2, image_size=64)
    with pytest.raises(ValueError):
        similarity_analysis(model, [(np.zeros((32, 32, 3), np.uint8), None)], 3)
    with pytest.raises(ValueError):
        similarity_analysis(model, [], 3, layers=[5])


def test_cli_analyze_writes_numbers_and_figure(tmp_path):
    import json

    import cv2

    from algm_viz.cli import main
    from algm_viz.models import save_segmenter

    rng = np.random.default_rng(0)
    for folder, array in (("images", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                          ("labels", rng.integers(0, 3, (64, 64), dtype=np.uint8))):
        (tmp_path / "data" / folder).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "data" / folder / "0.png"), array)
    torch.manual_seed(0)
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, depth=2, embed_dim=64, num_heads=2, image_size=64,
                             layer_norm_eps=1e-6)
    net = {"backbone": "vit_tiny_patch16_384", "d_model": 64, "n_heads": 2, "n_layers": 2, "patch_size": 16,
           "image_size": 64, "n_cls": 3, "d_ff": 256, "layer_norm_eps": 1e-6}
    folder = save_segmenter(model, tmp_path / "model", net)
    out = tmp_path / "similarity.json"
    assert main(["analyze", "--model", str(folder), "--data", str(tmp_path / "data"), "--dataset", "folder",
                 "--classes", "a,b,c", "--windows", "2:4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["local"]) == {"2", "3", "4"} and set(result["global"]) == {"1", "2"}
    assert out.with_suffix(".html").stat().st_size > 0
