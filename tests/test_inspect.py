"""The token inspector: groups equal the merge record's, similarity and attention maps equal direct computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import algm_viz
from algm_viz.app import inspector as app_inspector
from algm_viz.app.session import ImageSession, Settings
from algm_viz.inspector import capture_tokens, class_shares, inspect_patch, mean_pairwise_similarity
from algm_viz.models import create_segmenter
from algm_viz.patch import find_vit

from conftest import APP_TINY as TINY, scene, tiny_registry


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_segmenter("vit_tiny_patch16_384", **TINY).eval()


@pytest.fixture(scope="module")
def images():
    return (torch.from_numpy(scene(64, 96)).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25  # [1, 3, 64, 96]


def forward(model, images, local, global_, layers=(1, 3), global_layer=3, prop_attn=False):
    """(baseline capture, merged capture, merge record) of one image."""
    algm_viz.remove_algm(model)
    with torch.inference_mode(), capture_tokens(model, (), attention_layer=6) as baseline:
        model(images)
    algm_viz.apply_algm(model, 1, global_layer, (2, 2), local, global_, prop_attn=prop_attn)
    with torch.inference_mode(), capture_tokens(model, layers, attention_layer=6) as merged:
        model(images)
    record = algm_viz.algm_state(model).record
    algm_viz.remove_algm(model)
    return baseline, merged, record


def tokens_before_mlp(model, images, layer):
    """``[N, C]`` patch tokens after the attention residual of ``layer`` (the MLP's input, read by a hook on
    ``norm2``) of the model as it is configured now."""
    vit = find_vit(model)
    seen = {}
    handle = vit.blocks[layer - 1].norm2.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.inference_mode():
        model(images)
    handle.remove()
    return seen["x"][0, vit.num_prefix_tokens:]


def test_groups_and_windows_equal_the_record_for_every_patch(model, images):
    baseline, merged, record = forward(model, images, 0.6, 0.6)
    assert int(record.token_counts()["global"][0]) < int(record.token_counts()["local"][0]) < 96, "both stages merge"
    final, local = record.final.groups[0], record.stage("local").groups[0]
    grid = record.grid
    merged_windows = 0
    for patch in range(grid[0] * grid[1]):
        row, col = divmod(patch, grid[1])
        seen = inspect_patch(model, merged, baseline, row, col)
        np.testing.assert_array_equal(seen.group.ravel(), (final == final[patch]).numpy())
        window = np.zeros(grid, bool)
        window[row // 2 * 2 : row // 2 * 2 + 2, col // 2 * 2 : col // 2 * 2 + 2] = True
        np.testing.assert_array_equal(seen.window, window)
        assert seen.window_merged == bool((local[window.ravel()] == local[patch]).all())
        merged_windows += seen.window_merged
        assert seen.group_inputs == int(torch.unique(local[final == final[patch]]).numel())
    assert merged_windows > 0
    assert seen.thresholds == pytest.approx({"local": 0.6, "global": 0.6})


def test_similarity_maps_equal_a_direct_computation(model, images):
    baseline, merged, record = forward(model, images, 0.6, 0.6)
    row, col, patch = 5, 7, 5 * 12 + 7
    seen = inspect_patch(model, merged, baseline, row, col)
    # CLAP layer: the unmerged model's tokens after layer 1's attention residual.
    first = F.normalize(tokens_before_mlp(model, images, 1), dim=-1)
    np.testing.assert_allclose(seen.similarity["local"].ravel(), (first @ first[patch]).numpy(), atol=1e-5)
    # GBM layer: the model with CLAP alone, tokens after layer 3's attention residual, back on the patches.
    algm_viz.apply_algm(model, 1, None, (2, 2), 0.6)
    third = tokens_before_mlp(model, images, 3)
    local = algm_viz.algm_state(model).record.stage("local")
    algm_viz.remove_algm(model)
    per_patch = F.normalize(local.unmerge(third[None])[0], dim=-1)
    np.testing.assert_allclose(seen.similarity["global"].ravel(), (per_patch @ per_patch[patch]).numpy(), atol=1e-5)
    window = seen.window.ravel()
    expected = (first[window].sum(0).pow(2).sum() - 4) / 12  # mean over the 12 ordered pairs of unit vectors
    assert seen.window_similarity == pytest.approx(float(expected), abs=1e-5)


def test_stages_in_one_layer_compare_the_tokens_the_model_compares(model, images):
    """GBM in CLAP's layer compares CLAP's outputs (merged in that same block)."""
    baseline, merged, _ = forward(model, images, 0.6, 0.6, layers=(1,), global_layer=1)
    seen = inspect_patch(model, merged, baseline, 0, 0)
    first = tokens_before_mlp(model, images, 1)
    algm_viz.apply_algm(model, 1, None, (2, 2), 0.6)
    with torch.inference_mode():
        model(images)
    local = algm_viz.algm_state(model).record.stage("local")
    algm_viz.remove_algm(model)
    pooled, _ = local.merge(first[None])
    unit = F.normalize(local.unmerge(pooled)[0], dim=-1)
    np.testing.assert_allclose(seen.similarity["global"].ravel(), (unit @ unit[0]).numpy(), atol=1e-5)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_attention_maps_equal_timm_attention_weights(model, images, prop_attn):
    baseline, merged, record = forward(model, images, 0.6, 0.6, prop_attn=prop_attn)
    row, col, patch = 2, 3, 2 * 12 + 3
    seen = inspect_patch(model, merged, baseline, row, col)
    attn = find_vit(model).blocks[5].attn
    captured = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with torch.inference_mode():
            model(images)
            algm_viz.apply_algm(model, 1, 3, (2, 2), 0.6, 0.6, prop_attn=prop_attn)
            model(images)
    finally:
        handle.remove()
        attn.fused_attn = True
        algm_viz.remove_algm(model)
    base_row = captured[0][0].mean(0)[1 + patch]  # [1 + N], query = the patch
    np.testing.assert_allclose(seen.attention["baseline"].ravel(), base_row[1:].numpy(), atol=1e-6)
    assert seen.attention_prefix["baseline"] == pytest.approx(float(base_row[0]), abs=1e-6)
    final = record.final.groups[0]
    sizes = torch.bincount(final)
    algm_row = captured[1][0].mean(0)[1 + final[patch]]  # query = the patch's merged token
    np.testing.assert_allclose(seen.attention["merged"].ravel(), (algm_row[1:][final] / sizes[final]).numpy(), atol=1e-6)
    assert seen.attention["merged"].sum() + seen.attention_prefix["merged"] == pytest.approx(1.0, abs=1e-5)


def test_bad_patches_and_unmerged_captures_are_refused(model, images):
    baseline, merged, _ = forward(model, images, 0.6, 0.6)
    with pytest.raises(ValueError, match="outside the 8×12 patch grid"):
        inspect_patch(model, merged, baseline, 8, 0)
    with pytest.raises(ValueError, match="merged nothing"):
        inspect_patch(model, baseline, None, 0, 0)


def test_helpers_on_hand_built_cases():
    assert mean_pairwise_similarity(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])) == pytest.approx(1 / 3)
    assert mean_pairwise_similarity(torch.ones(1, 4)) is None
    classes = np.array([[0, 0, 1], [2, 255, 1]])
    region = np.array([[1, 1, 1], [0, 1, 1]], bool)
    assert class_shares(classes, region, 3, 255) == {0: 0.5, 1: 0.5}
    assert class_shares(classes, np.zeros_like(region), 3, 255) == {}


@pytest.fixture(scope="module")
def entry():
    registry = tiny_registry()
    return registry.get(registry.default_key())


def test_app_inspection_reads_the_cached_forwards_and_the_label_map(entry, monkeypatch):
    image = scene()
    label = np.zeros((60, 90), np.int64)
    label[:, 45:] = 2
    label[:4] = 255  # ignored
    session = ImageSession(entry, image, label)
    settings = Settings(0.6, 0.6, 2, 3)
    session.baseline(), session.algm(settings)
    calls = []
    monkeypatch.setattr(entry.model, "forward", lambda *a, **k: calls.append(1))
    view = app_inspector.inspect(session, settings, 10.5, 5)
    assert not calls, "a click runs no forward when the session has the setting's run"
    readout = view.readout
    assert readout["patch"] == {"row": 0, "col": 1, "index": 1}
    group = np.zeros(readout["grid"], bool)
    group[tuple(np.array(readout["group"]["cells"]).T)] = True
    record_groups = session.algm(settings).maps.final_groups
    np.testing.assert_array_equal(group, record_groups == record_groups[0, 1])
    pixels = np.kron(group, np.ones((8, 8), bool))[: session.image.shape[0], : session.image.shape[1]]
    values = session.label[pixels]
    values = values[values != 255]
    expected = {c: float((values == c).mean()) for c in np.unique(values)}
    assert {c["class"]: c["share"] for c in readout["group_classes"]} == pytest.approx(expected)
    assert readout["classes_from"] == "label map"
    assert view.picture.shape == session.image.shape
    assert (view.picture != session.image).any(), "the outlines are drawn"
    markdown = app_inspector.readout_markdown(readout)
    assert "Merge group" in markdown and f"{readout['group']['patches']} patch" in markdown
    assert len(view.similarity.data) >= 4 and view.similarity.layout.coloraxis.colorbar.ticktext[-1].startswith("<b>τ")
    with pytest.raises(ValueError, match="outside the 96×64 model input"):
        app_inspector.inspect(session, settings, 96, 3)
    with pytest.raises(ValueError, match="two numbers"):
        app_inspector.inspect(session, settings, "left", 3)


def test_points_map_from_a_shown_picture_to_the_model_input():
    assert app_inspector.to_model_frame(100, 50, (120, 200), (60, 100)) == (50, 25)
    assert app_inspector.patch_at(15.9, 8.0, (64, 96), 8) == (1, 1)
