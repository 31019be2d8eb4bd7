"""Automatic threshold τ = μ + σ: known statistics on synthetic tokens, brute force on a tiny model, storage."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algm_viz import algm_state, apply_algm
from algm_viz.evaluation.calibrate import calibrate, pair_sums, store_thresholds
from algm_viz.models import create_segmenter, load_segmenter, save_segmenter

NET = dict(depth=6, embed_dim=64, num_heads=2, image_size=64)


def _model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", num_classes=3, **NET).eval()


def test_pair_sums_known_answer_two_orthogonal_groups():
    n = 5
    e1, e2 = torch.eye(8)[0], torch.eye(8)[1]
    tokens = torch.stack([3 * e1] * n + [0.5 * e2] * n)[None]  # similarity 1 within, 0 across groups
    count, total, squares = pair_sums(tokens)
    assert count == 2 * n * (2 * n - 1)
    assert total == pytest.approx(2 * n * (n - 1)) and squares == pytest.approx(2 * n * (n - 1))


def test_pair_sums_matches_brute_force():
    tokens = torch.randn(2, 13, 7)
    unit = F.normalize(tokens.double(), dim=-1)
    sims = unit @ unit.transpose(1, 2)
    off = ~torch.eye(13, dtype=torch.bool)
    count, total, squares = pair_sums(tokens)
    assert count == 2 * 13 * 12
    assert total == pytest.approx(float(sims[:, off].sum()), abs=1e-9)
    assert squares == pytest.approx(float(sims[:, off].pow(2).sum()), abs=1e-9)


def _captured_tokens(model, images, layer):
    """Tokens after the attention residual of ``layer`` (input of norm2), prefix removed, per image."""
    captured = []
    handle = model.encoder.blocks[layer - 1].norm2.register_forward_pre_hook(lambda m, a: captured.append(a[0][:, 1:]))
    with torch.no_grad():
        for x in images:
            model(x)
    handle.remove()
    return captured


def test_calibrate_equals_brute_force_statistics():
    model = _model()
    images = [torch.randn(1, 3, 48, 64), torch.randn(2, 3, 32, 32)]
    result = calibrate(model, images, layers=(1, 3), window=(2, 2))
    assert result["images"] == 3
    for layer in (1, 3):
        sims = []
        for tokens in _captured_tokens(model, images, layer):
            unit = F.normalize(tokens.double(), dim=-1)
            s = unit @ unit.transpose(1, 2)
            sims.append(s[:, ~torch.eye(s.shape[-1], dtype=torch.bool)].flatten())
        sims = torch.cat(sims).numpy()
        stats = result["layers"][str(layer)]
        assert stats["count"] == sims.size
        assert stats["mean"] == pytest.approx(sims.mean(), abs=1e-9)
        assert stats["std"] == pytest.approx(sims.std(), abs=1e-7)
        assert stats["tau"] == pytest.approx(sims.mean() + sims.std(), abs=1e-7)
    assert result["thresholds"] == {"local": result["layers"]["1"]["tau"], "global": result["layers"]["3"]["tau"]}
    # window statistic: mean pairwise similarity of each 2x2 window on the 3x4 and 2x2 grids
    window_means = []
    for tokens, (h, w) in zip(_captured_tokens(model, images, 1), [(3, 4), (2, 2)]):
        unit = F.normalize(tokens.double(), dim=-1).reshape(tokens.shape[0], h, w, -1)
        for top in range(0, h - 1, 2):
            for left in range(0, w - 1, 2):
                win = unit[:, top : top + 2, left : left + 2].reshape(tokens.shape[0], 4, -1)
                s = win @ win.transpose(1, 2)
                window_means.extend(((s.sum((1, 2)) - 4) / 12).tolist())
    assert result["window"]["count"] == len(window_means)
    assert result["window"]["mean"] == pytest.approx(np.mean(window_means), abs=1e-6)
    assert result["window"]["std"] == pytest.approx(np.std(window_means), abs=1e-6)


def test_calibrate_runs_unmerged_and_leaves_algm_config():
    model = _model()
    images = [torch.randn(1, 3, 64, 64)]
    plain = calibrate(model, images, layers=(1, 5))
    apply_algm(model, local_threshold=-2.0, global_threshold=-2.0)  # would merge everything
    config = algm_state(model).config
    merged = calibrate(model, images, layers=(1, 5))
    assert algm_state(model).config == config
    assert merged["layers"] == plain["layers"]
    uint8 = [np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    assert calibrate(model, uint8, layers=(1, 5), short_side=64)["layers"]["1"]["count"] == 20 * 19  # 64x80 -> 4x5 patches


def test_calibrate_bad_input():
    model = _model()
    with pytest.raises(ValueError):
        calibrate(model, [], layers=(1, 5))
    with pytest.raises(ValueError):
        calibrate(model, [torch.randn(1, 3, 32, 32)], layers=(1, 9))
    with pytest.raises(ValueError):
        calibrate(model, [torch.randn(3, 32, 32)], layers=(1, 5))


def test_store_thresholds_in_official_folder_and_bundled_json(tmp_path):
    model = _model()
    result = calibrate(model, [torch.randn(1, 3, 32, 32)], layers=(1, 5))
    net = {"backbone": "vit_tiny_patch16_384", "d_model": 64, "n_heads": 2, "n_layers": 6, "patch_size": 16,
           "image_size": 64, "n_cls": 3, "normalization": "vit", "d_ff": 256, "layer_norm_eps": 1e-6,
           "decoder": {"name": "mask_transformer", "n_layers": 2}}
    folder = save_segmenter(model, tmp_path / "official", net)
    assert store_thresholds(folder, result).name == "variant.yml"
    loaded = load_segmenter(folder)
    assert loaded.info.thresholds == pytest.approx(result["thresholds"])
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "config.json").write_text(json.dumps({"model": {}, "algm_thresholds": None}))
    store_thresholds(bundled, result)
    assert json.loads((bundled / "config.json").read_text())["algm_thresholds"] == pytest.approx(result["thresholds"])
    with pytest.raises(ValueError, match="neither"):
        store_thresholds(tmp_path, result)
    with pytest.raises(ValueError, match="NaN"):
        store_thresholds(folder, {"thresholds": {"local": math.nan, "global": 0.5}})


def test_cli_calibrate_stores_with_the_model(tmp_path, random_folder_data, tiny_official_model):
    from algm_viz.cli import main

    folder = tiny_official_model
    out = tmp_path / "calibration.json"
    code = main(["calibrate", "--model", str(folder), "--data", str(random_folder_data), "--dataset", "folder",
                 "--classes", "a,b,c", "--global-layer", "4", "--store", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and set(result["layers"]) == {"1", "4"}
    assert load_segmenter(folder).info.thresholds == pytest.approx(result["thresholds"])
