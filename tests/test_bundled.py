"""Bundled models: save/load round trip, and the shipped CamVid model (weights, τ, checksum, model card)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from algm_viz.datasets import read_image
from algm_viz.models import create_segmenter
from algm_viz.models.bundled import (
    DEFAULT_MODEL,
    bundled_dir,
    load_bundled,
    prediction_digest,
    read_bundled_config,
    save_bundled,
)
from algm_viz.models.description import ModelInfo, describe
from algm_viz.models.loading import load_model
from algm_viz.patch import algm_state, apply_algm

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_CONFIG = {"backbone": "vit_tiny_patch16_384", "decoder": "mask_transformer", "num_classes": 3,
               "image_size": [64, 64], **TINY}
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "models" / DEFAULT_MODEL


def _tiny(tmp_path: Path, **kwargs) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_segmenter(num_classes=3, image_size=(64, 64), **TINY).eval()
    folder = save_bundled(model, tmp_path / "tiny", config=TINY_CONFIG, class_names=["a", "b", "c"],
                          colors=[(255, 0, 0), (0, 255, 0), (0, 0, 255)], input_size=64, **kwargs)
    return model, folder


def test_round_trip_keeps_predictions_and_metadata(tmp_path):
    model, folder = _tiny(tmp_path, thresholds={"local": 0.8, "global": 0.85}, training={"epochs": 1})
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_bundled(folder)
    info = loaded.info
    assert info.class_names == ("a", "b", "c") and info.colors[2] == (0, 0, 255) and info.name == "tiny"
    assert info.short_side == 64 and info.thresholds == {"local": 0.8, "global": 0.85} and info.trained
    assert read_bundled_config(folder)["training"] == info.card["training"] == {"epochs": 1}
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=2e-2, rtol=2e-2)
    assert algm_state(apply_algm(loaded, global_layer=2)).config.global_threshold == 0.85


def test_save_rejects_mismatched_metadata(tmp_path):
    model = create_segmenter(num_classes=3, image_size=64, **TINY)
    with pytest.raises(ValueError, match="class names"):
        save_bundled(model, tmp_path, config=TINY_CONFIG, class_names=["a"], colors=[(0, 0, 0)], input_size=64)
    with pytest.raises(ValueError, match="local"):
        save_bundled(model, tmp_path, config=TINY_CONFIG, class_names="abc", colors=[(0, 0, 0)] * 3,
                     thresholds={"global": 0.9}, input_size=64)


def test_unknown_or_broken_bundles_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no bundled model"):
        bundled_dir("no-such-model")
    _, folder = _tiny(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model": {**TINY_CONFIG, "num_classes": 4}}))
    with pytest.raises(ValueError, match="does not hold"):
        load_bundled(folder)


# --- the shipped model -------------------------------------------------------------------------


def test_shipped_model_loads_offline_with_calibrated_thresholds():
    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size <= 15 * 2**20
    model = load_bundled()  # DEFAULT_MODEL, from the repository: no network involved
    assert model.num_classes == len(model.info.class_names) == len(model.info.colors) == 11
    assert model.info.class_names[3] == "Road" and model.info.short_side > 0
    tau = model.info.thresholds
    assert set(tau) == {"local", "global"} and all(0 < v < 1 for v in tau.values())


def test_shipped_model_reproduces_its_stored_prediction():
    stored = json.loads((SHIPPED / "prediction_checksum.json").read_text())
    model = load_bundled()
    image = read_image(SHIPPED / stored["image"])
    digest = prediction_digest(model, image)
    assert digest["class_pixels"] == stored["baseline"]["class_pixels"]
    assert digest["sha256"] == stored["baseline"]["sha256"]
    apply_algm(model)  # the calibrated τ
    assert prediction_digest(model, image)["sha256"] == stored["algm"]["sha256"]


def _card_rows() -> list[dict[str, str]]:
    """Rows of MODEL_CARD.md's result tables: ``| file | [weights |] method | τ local | τ global | mIoU | GFLOPs |
    images/s | ...``, each naming the sweep file it comes from."""
    rows, keys = [], None
    for line in (SHIPPED / "MODEL_CARD.md").read_text().splitlines():
        if not line.startswith("|"):
            keys = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if keys is None:
            keys = cells if {"file", "mIoU", "GFLOPs"} <= set(cells) else []
        elif keys and not set(cells[0]) <= {"-", ":"}:
            rows.append(dict(zip(keys, cells)))
    return rows


def _tau(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def test_model_card_numbers_come_from_the_sweep_files():
    card = _card_rows()
    assert "sweep.json" in {row["file"] for row in card}
    tau = read_bundled_config(SHIPPED)["algm_thresholds"]
    assert any(row["file"] == "sweep.json" and row["method"] == "algm" and row["τ local"] == _tau(tau["local"])
               and row["τ global"] == _tau(tau["global"]) for row in card), "the card reports ALGM at the calibrated τ"
    for row in card:
        sweep_rows = json.loads((SHIPPED / row["file"]).read_text())["rows"]
        match = [r for r in sweep_rows if r["method"] == row["method"] and _tau(r["local_threshold"]) == row["τ local"]
                 and _tau(r["global_threshold"]) == row["τ global"] and r.get("weights") == row.get("weights")]
        assert len(match) == 1, f"card row {row} is not one row of {row['file']}"
        assert row["mIoU"] == f"{match[0]['miou']:.2f}"
        assert row["GFLOPs"] == f"{match[0]['gflops']:.2f}"
        assert row["images/s"] == f"{match[0]['images_per_s']:.2f}"
    assert re.search(r"\b\d+ epochs\b", (SHIPPED / "MODEL_CARD.md").read_text())


def test_one_resolver_reads_the_app_keys_and_plain_names():
    assert load_model(f"bundled:{DEFAULT_MODEL}").info == load_model(DEFAULT_MODEL).info
    small = dict(depth=2, embed_dim=32, num_heads=2, image_size=32)
    state = torch.random.get_rng_state()
    first = load_model("untrained:vit_tiny_patch16_384", num_classes=3, untrained=small)
    assert torch.equal(torch.random.get_rng_state(), state), "the global random state is left as it was"
    again = load_model("untrained:vit_tiny_patch16_384", num_classes=3, untrained=small)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    other = load_model("untrained:vit_tiny_patch16_384", num_classes=3, untrained=small, seed=1)
    assert not torch.equal(other.encoder.patch_embed.proj.weight, first.encoder.patch_embed.proj.weight)
    assert not first.info.trained and first.info.class_names == ("class 0", "class 1", "class 2")
    with pytest.raises(ValueError, match="unknown official model"):
        load_model("official:nope")
    with pytest.raises(FileNotFoundError, match="is not a bundled model"):
        load_model("no-such-model")


def test_a_description_is_checked_and_every_module_has_one():
    with pytest.raises(ValueError, match="1 colours for 2 classes"):
        ModelInfo("m", ("a", "b"), colors=((0, 0, 0),))
    with pytest.raises(ValueError, match="short side must be positive"):
        ModelInfo("m", ("a",), short_side=0)
    with pytest.raises(ValueError, match="'local' and 'global'"):
        ModelInfo("m", ("a",), thresholds={"lokal": 0.9})
    assert describe(torch.nn.Linear(2, 2)) == ModelInfo.untrained(0), "a module without a description gets a placeholder"
    assert describe(create_segmenter(num_classes=3, depth=1, embed_dim=32, num_heads=2)).class_names == ("class 0", "class 1", "class 2")


def test_the_app_registry_takes_the_clis_plain_bundled_name():
    from algm_viz.app.models import ModelRegistry

    registry = ModelRegistry(device="cpu")
    assert registry.get(DEFAULT_MODEL) is registry.get(f"bundled:{DEFAULT_MODEL}")
    with pytest.raises(ValueError, match="unknown model"):
        registry.get("no-such-model")
