"""Pictures of token merging and segmentation, as pure numpy/cv2 functions on RGB uint8 arrays.

Patch-level maps (``[gh, gw]``, one value per ViT patch) reach pixels with one nearest-neighbour
upsample (:func:`upsample_grid`); outlines come from comparing a label map with its shifted copies
(:func:`label_edges`). No function loops over groups, classes or pixels in Python.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = [
    "upsample_grid",
    "label_edges",
    "group_colors",
    "merged_mask",
    "window_overlay",
    "group_overlay",
    "mean_color_view",
    "colorize",
    "segmentation_overlay",
    "disagreement_map",
    "legend",
    "inspector_overlay",
    "purity_overlay",
]

RGB = tuple[int, int, int]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")
    return image


def upsample_grid(grid_map: np.ndarray, patch_size: int, shape: tuple[int, int]) -> np.ndarray:
    """``[gh, gw]`` patch map -> ``[H, W]`` pixel map (nearest neighbour, cropped to ``shape``).

    The grid covers the image padded to a multiple of ``patch_size`` (as the model pads it).
    """
    grid_map = np.asarray(grid_map)
    height, width = shape
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if grid_map.ndim != 2 or grid_map.shape[0] * patch_size < height or grid_map.shape[1] * patch_size < width:
        raise ValueError(f"a {grid_map.shape} grid of {patch_size}px patches does not cover a {height}×{width} image")
    return grid_map.repeat(patch_size, axis=0).repeat(patch_size, axis=1)[:height, :width]


def label_edges(labels: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: True where a pixel's label differs from its right or lower neighbour (or the
    pixel itself is the right/lower one of such a pair), i.e. a 2-pixel-wide outline of every region."""
    labels = np.asarray(labels)
    edges = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    return edges


def _hue_table(saturation: int, value: int) -> np.ndarray:
    """``[180, 3]`` uint8 RGB for every OpenCV hue at the given saturation and value."""
    hsv = np.stack([np.arange(180, dtype=np.uint8), np.full(180, saturation, np.uint8), np.full(180, value, np.uint8)], -1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def group_colors(ids: np.ndarray, saturation: int = 200, value: int = 235) -> np.ndarray:
    """``[...]`` integer ids -> ``[..., 3]`` uint8 RGB: a hue from a multiplicative hash of each id,
    so neighbouring ids get unrelated colours and an id always gets the same one."""
    ids = np.asarray(ids).astype(np.uint64)
    hue = (ids * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(180)
    return _hue_table(saturation, value)[hue.astype(np.intp)]


def _blend(image: np.ndarray, layer: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """``image`` with ``layer`` alpha-blended where ``mask`` (``[H, W]`` bool) is True."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = cv2.addWeighted(image, 1.0 - alpha, np.ascontiguousarray(layer, np.uint8), alpha, 0.0)  # rounded, saturated
    if mask.all():
        return mixed
    out = image.copy()
    np.copyto(out, mixed, where=mask[..., None])
    return out


def merged_mask(groups: np.ndarray) -> np.ndarray:
    """``[gh, gw]`` group ids -> ``[gh, gw]`` bool, True where the group has more than one member."""
    sizes = np.bincount(groups.ravel())
    return sizes[groups] > 1


def window_overlay(
    image: np.ndarray,
    groups: np.ndarray,
    patch_size: int,
    color: RGB = (255, 196, 0),
    alpha: float = 0.45,
    edge_color: RGB = (255, 255, 255),
) -> np.ndarray:
    """CLAP: tint the merged k×k windows and outline each one.

    Args:
        image: ``[H, W, 3]`` uint8, the model input.
        groups: ``[gh, gw]`` the local merge's output slot of each patch (``Merge.groups`` reshaped).
        patch_size: pixels per patch side.
    Returns:
        ``[H, W, 3]`` uint8; patches that were not merged are left as they are.
    """
    image = _check_image(image)
    groups = np.asarray(groups)
    pixel_groups = upsample_grid(groups, patch_size, image.shape[:2])
    merged = upsample_grid(merged_mask(groups), patch_size, image.shape[:2])
    out = _blend(image, np.broadcast_to(np.array(color, np.uint8), image.shape), merged, alpha)
    out[label_edges(pixel_groups) & merged] = edge_color
    return out


def group_overlay(
    image: np.ndarray,
    groups: np.ndarray,
    merged: np.ndarray,
    patch_size: int,
    alpha: float = 0.55,
    edge_color: RGB = (0, 0, 0),
) -> np.ndarray:
    """GBM: paint each merged group one colour across the image; leave unmerged tokens clear.

    Args:
        image: ``[H, W, 3]`` uint8, the model input.
        groups: ``[gh, gw]`` final token of each patch (``MergeRecord.final.groups`` reshaped).
        merged: ``[gh, gw]`` bool, True for patches whose final token is a global merge of several tokens.
        patch_size: pixels per patch side.
    Returns:
        ``[H, W, 3]`` uint8 with group colours from :func:`group_colors` and dark group outlines.
    """
    image = _check_image(image)
    groups = np.asarray(groups)
    if np.asarray(merged).shape != groups.shape:
        raise ValueError(f"merged {np.asarray(merged).shape} and groups {groups.shape} differ in shape")
    pixel_groups = upsample_grid(groups, patch_size, image.shape[:2])
    pixel_merged = upsample_grid(np.asarray(merged, dtype=bool), patch_size, image.shape[:2])
    out = _blend(image, group_colors(pixel_groups), pixel_merged, alpha)
    out[label_edges(pixel_groups) & pixel_merged] = edge_color
    return out


def mean_color_view(
    image: np.ndarray, groups: np.ndarray, patch_size: int, edge_color: RGB | None = (255, 255, 255)
) -> np.ndarray:
    """Tokens as superpixels: every pixel painted with the mean colour of all pixels of its token.

    Args:
        image: ``[H, W, 3]`` uint8, the model input.
        groups: ``[gh, gw]`` token of each patch (e.g. the final groups); a token's patches need not touch,
            so a GBM token that joined distant patches shows the same colour in each place.
        patch_size: pixels per patch side.
        edge_color: outline of the tokens (None: no outlines).
    Returns:
        ``[H, W, 3]`` uint8.
    """
    image = _check_image(image)
    pixel_groups = upsample_grid(np.asarray(groups), patch_size, image.shape[:2])
    _, index = np.unique(pixel_groups, return_inverse=True)
    index = index.reshape(-1)
    counts = np.bincount(index)
    sums = np.stack([np.bincount(index, weights=image[..., c].reshape(-1), minlength=counts.size) for c in range(3)], -1)
    out = (sums / counts[:, None]).round().astype(np.uint8)[index].reshape(image.shape)
    if edge_color is not None:
        out[label_edges(pixel_groups)] = edge_color
    return out


def colorize(labels: np.ndarray, colors: Sequence[RGB] | np.ndarray, ignore_color: RGB = (0, 0, 0)) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8 with ``colors[id]``; ids outside the palette get ``ignore_color``."""
    labels = np.asarray(labels).astype(np.int64)
    palette = np.concatenate([np.asarray(colors, dtype=np.uint8).reshape(-1, 3), np.array([ignore_color], np.uint8)])
    outside = (labels < 0) | (labels >= len(palette) - 1)
    return palette[np.where(outside, len(palette) - 1, labels)]


def segmentation_overlay(
    image: np.ndarray, labels: np.ndarray, colors: Sequence[RGB] | np.ndarray, alpha: float = 0.6
) -> np.ndarray:
    """``[H, W, 3]`` image blended with the class colours of ``labels`` ``[H, W]``, class borders in white."""
    image = _check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape[:2]}")
    out = _blend(image, colorize(labels, colors), np.ones(labels.shape, bool), alpha)
    out[label_edges(labels)] = (255, 255, 255)
    return out


def disagreement_map(
    image: np.ndarray, first: np.ndarray, second: np.ndarray, color: RGB = (255, 0, 40), dim: float = 0.35
) -> tuple[np.ndarray, float]:
    """Where two ``[H, W]`` label maps differ: those pixels in ``color``, the rest of the image dimmed
    to ``dim`` brightness. Returns ``([H, W, 3]`` uint8, fraction of pixels that differ``)``."""
    image = _check_image(image)
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.shape != image.shape[:2]:
        raise ValueError(f"label maps {first.shape}, {second.shape} and image {image.shape[:2]} differ in size")
    differ = first != second
    out = (image.astype(np.float32) * dim).round().astype(np.uint8)
    out[differ] = color
    return out, float(differ.mean()) if differ.size else 0.0


def legend(
    class_names: Sequence[str],
    colors: Sequence[RGB] | np.ndarray,
    classes: Sequence[int] | np.ndarray | None = None,
    width: int = 640,
    row_height: int = 22,
    column_width: int = 160,
) -> np.ndarray:
    """A class legend: a swatch and a name for each of ``classes`` (default: all), in columns.

    Returns ``[rows * row_height, width, 3]`` uint8 on white.
    """
    classes = np.arange(len(class_names)) if classes is None else np.asarray(classes, dtype=np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= len(class_names)):
        raise ValueError(f"class ids must be in 0..{len(class_names) - 1}")
    palette = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    columns = max(1, width // column_width)
    rows = max(1, -(-len(classes) // columns))
    out = np.full((rows * row_height, width, 3), 255, np.uint8)
    swatch = row_height - 8
    for slot, class_id in enumerate(classes.tolist()):  # one label per class: text drawing has no vector form
        y, x = (slot // columns) * row_height + 4, (slot % columns) * column_width + 4
        out[y : y + swatch, x : x + swatch] = palette[class_id]
        cv2.putText(out, str(class_names[class_id])[:18], (x + swatch + 6, y + swatch - 3),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.42, (20, 20, 20), 1, cv2.LINE_AA)
    return out


def inspector_overlay(
    image: np.ndarray,
    window: np.ndarray,
    group: np.ndarray,
    patch: tuple[int, int],
    patch_size: int,
    group_color: RGB = (0, 200, 255),
    window_color: RGB = (255, 210, 0),
    patch_color: RGB = (255, 0, 40),
    dim: float = 0.6,
) -> np.ndarray:
    """The token inspector's picture: the image dimmed outside the merge ``group`` (``[gh, gw]`` bool),
    the group outlined in ``group_color``, the CLAP ``window`` (``[gh, gw]`` bool) in ``window_color``
    and the clicked ``patch`` ``(row, col)`` in ``patch_color``. Returns ``[H, W, 3]`` uint8."""
    image = _check_image(image)
    shape = image.shape[:2]
    in_group = upsample_grid(np.asarray(group, dtype=bool), patch_size, shape)
    out = _blend(image, np.zeros_like(image), ~in_group, 1.0 - dim)
    clicked = np.zeros(np.asarray(group).shape, dtype=bool)
    clicked[patch] = True
    for mask, color in ((in_group, group_color), (upsample_grid(np.asarray(window, dtype=bool), patch_size, shape), window_color),
                        (upsample_grid(clicked, patch_size, shape), patch_color)):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, color, 2)
    return out


def purity_overlay(
    image: np.ndarray,
    merged: np.ndarray,
    mixed: np.ndarray,
    groups: np.ndarray,
    patch_size: int,
    pure_color: RGB = (40, 200, 90),
    mixed_color: RGB = (255, 0, 40),
    alpha: float = 0.5,
) -> np.ndarray:
    """Merge purity: merged groups that keep one class tinted ``pure_color``, groups that mix classes
    ``mixed_color``, unmerged patches clear, group outlines dark. ``merged``, ``mixed``: ``[gh, gw]`` bool
    per patch; ``groups``: ``[gh, gw]`` group ids. Returns ``[H, W, 3]`` uint8."""
    image = _check_image(image)
    shape = image.shape[:2]
    pixel_mixed = upsample_grid(np.asarray(mixed, dtype=bool), patch_size, shape)
    pixel_merged = upsample_grid(np.asarray(merged, dtype=bool), patch_size, shape)
    layer = np.where(pixel_mixed[..., None], np.array(mixed_color, np.uint8), np.array(pure_color, np.uint8))
    out = _blend(image, layer, pixel_merged, alpha)
    out[label_edges(upsample_grid(np.asarray(groups), patch_size, shape)) & pixel_merged] = (0, 0, 0)
    return out
