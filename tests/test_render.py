"""The pictures: overlays follow the merge groups exactly, unmerged tokens stay clear."""

import numpy as np
import pytest

from algm_viz import render

P = 4  # pixels per patch


def _image(height: int = 8, width: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_upsample_grid_repeats_each_patch_and_crops():
    grid = np.arange(6).reshape(2, 3)
    pixels = render.upsample_grid(grid, P, (7, 10))
    assert pixels.shape == (7, 10)
    assert (pixels[:4, :4] == 0).all() and (pixels[4:, 8:] == 5).all()
    with pytest.raises(ValueError, match="does not cover"):
        render.upsample_grid(grid, P, (9, 12))


def test_label_edges_mark_only_region_borders():
    labels = np.zeros((6, 6), int)
    labels[:, 3:] = 1
    edges = render.label_edges(labels)
    assert edges[:, 2:4].all()
    assert not edges[:, :2].any() and not edges[:, 4:].any()


def test_window_overlay_tints_exactly_the_merged_window():
    image = _image()
    groups = np.array([[0, 0, 1], [0, 0, 2]])  # patches (0,0),(0,1),(1,0),(1,1) merged; two singletons
    out = render.window_overlay(image, groups, P, color=(255, 0, 0), alpha=1.0)
    assert (out[:, 8:] == image[:, 8:]).all(), "unmerged patches must stay untouched"
    inner = out[1:7, 1:7]
    assert (inner == (255, 0, 0)).all(), "the merged window is tinted"


def test_group_overlay_colours_groups_and_leaves_singletons_clear():
    image = _image()
    groups = np.array([[0, 1, 0], [2, 3, 4]])  # group 0 spans two separate patches
    merged = np.array([[True, False, True], [False, False, False]])
    out = render.group_overlay(image, groups, merged, P, alpha=1.0)
    assert (out[4:] == image[4:]).all() and (out[:4, 4:8] == image[:4, 4:8]).all()
    colour = render.group_colors(np.array([0]))[0]
    assert (out[1:3, 1:3] == colour).all() and (out[1:3, 9:11] == colour).all(), "one colour across the image"
    with pytest.raises(ValueError, match="differ in shape"):
        render.group_overlay(image, groups, merged[:1], P)


def test_group_colors_are_stable_and_distinct_for_neighbouring_ids():
    colours = render.group_colors(np.arange(50))
    assert colours.shape == (50, 3) and colours.dtype == np.uint8
    assert (render.group_colors(np.arange(50)) == colours).all()
    assert (np.abs(colours[1:].astype(int) - colours[:-1]).sum(1) > 0).all()


def test_colorize_and_segmentation_overlay():
    labels = np.array([[0, 1], [2, 255]])
    colours = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    out = render.colorize(labels, colours, ignore_color=(1, 2, 3))
    assert out[0, 1].tolist() == [40, 50, 60] and out[1, 1].tolist() == [1, 2, 3]
    overlay = render.segmentation_overlay(_image(2, 2), labels, colours)
    assert overlay.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="do not match"):
        render.segmentation_overlay(_image(), labels, colours)


def test_disagreement_map_marks_differences_and_reports_their_share():
    image = _image()
    first = np.zeros((8, 12), int)
    second = first.copy()
    second[:2, :3] = 1
    out, share = render.disagreement_map(image, first, second, color=(255, 0, 0))
    assert share == pytest.approx(6 / 96)
    assert (out[:2, :3] == (255, 0, 0)).all()
    assert (out[4:] <= image[4:]).all()


def test_legend_has_a_swatch_per_class():
    names = ["sky", "road", "car"]
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    strip = render.legend(names, colours, classes=[0, 2], width=400)
    flat = strip.reshape(-1, 3).tolist()
    assert [250, 0, 0] in flat and [0, 0, 250] in flat and [0, 250, 0] not in flat
    with pytest.raises(ValueError, match="class ids"):
        render.legend(names, colours, classes=[3])


def test_mean_color_view_paints_each_token_its_mean_colour_even_apart():
    image = _image()
    groups = np.array([[0, 1, 0], [2, 3, 4]])  # token 0 holds two patches that do not touch
    out = render.mean_color_view(image, groups, P, edge_color=None)
    token0 = np.concatenate([image[:4, :4].reshape(-1, 3), image[:4, 8:].reshape(-1, 3)]).mean(0).round()
    assert (out[:4, :4] == token0).all() and (out[:4, 8:] == token0).all()
    assert (out[4:, :4] == image[4:, :4].reshape(-1, 3).mean(0).round()).all()
    outlined = render.mean_color_view(image, groups, P, edge_color=(255, 0, 255))
    assert (outlined[:, 3] == (255, 0, 255)).all() and (outlined[1:3, 1:3] == out[1:3, 1:3]).all()
