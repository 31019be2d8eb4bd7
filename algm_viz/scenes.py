"""Synthetic street scenes with exact label maps, drawn with OpenCV: example inputs the project may ship.

A scene is a driver's-eye street in CamVid's look (a pale overcast sky, grey facades in perspective, a
dark road to a vanishing point, pavements, trees, poles with signs, cars and pedestrians), painted in
the mean colours of CamVid's classes with a little noise and blur. Every shape is drawn twice: in its
colour on the image and as its class id on the label map, so the map is exact (no void pixels).
Class ids follow the 11-class CamVid order of :data:`CAMVID_CLASSES` (the bundled model's classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["CAMVID_CLASSES", "Scene", "street_scene"]

#: The 11 CamVid classes (SegNet version), in label-id order.
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
_ID = {name: i for i, name in enumerate(CAMVID_CLASSES)}

#: Base RGB of each class: its mean over CamVid's training images (measured on every 6th image), except Tree,
#: whose mean mixes leaves with the sky behind them (a foliage green is used instead).
_BASE_RGB = {"Sky": (225, 236, 238), "Building": (88, 89, 88), "Pole": (77, 79, 83), "Road": (78, 81, 85),
             "Pavement": (66, 67, 69), "Tree": (78, 92, 60), "SignSymbol": (76, 74, 80), "Fence": (63, 62, 60),
             "Car": (63, 66, 72), "Pedestrian": (37, 36, 39)}


@dataclass(frozen=True)
class Scene:
    """``image`` ``[H, W, 3]`` uint8 RGB and ``label`` ``[H, W]`` uint8 class ids (:data:`CAMVID_CLASSES`)."""

    image: np.ndarray
    label: np.ndarray


class _Canvas:
    """An image and its label map painted together."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.image = np.zeros((height, width, 3), np.uint8)
        self.label = np.zeros((height, width), np.uint8)
        self.rng = rng

    def color(self, name: str, jitter: float = 12.0, scale: float = 1.0) -> tuple[int, int, int]:
        """The class's base colour times ``scale``, its brightness varied by ``jitter`` grey levels (and a
        fifth of that per channel)."""
        base = (np.asarray(_BASE_RGB[name], np.float64) * scale + self.rng.normal(0.0, jitter)
                + self.rng.normal(0.0, jitter / 5, 3))
        return tuple(int(v) for v in np.clip(base, 0, 255))

    def polygon(self, points: np.ndarray, name: str, color: tuple[int, int, int] | None = None) -> None:
        pts = np.round(np.asarray(points)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.image, [pts], color or self.color(name), lineType=cv2.LINE_AA)
        cv2.fillPoly(self.label, [pts], _ID[name])

    def rect(self, x0: float, y0: float, x1: float, y1: float, name: str, color: tuple[int, int, int] | None = None) -> None:
        self.polygon(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), name, color)

    def ellipse(self, center: tuple[float, float], axes: tuple[float, float], name: str,
                color: tuple[int, int, int] | None = None) -> None:
        c, a = tuple(int(round(v)) for v in center), tuple(max(1, int(round(v))) for v in axes)
        cv2.ellipse(self.image, c, a, 0, 0, 360, color or self.color(name), -1, lineType=cv2.LINE_AA)
        cv2.ellipse(self.label, c, a, 0, 0, 360, _ID[name], -1)

    def paint(self, points: np.ndarray, color: tuple[int, int, int]) -> None:
        """Detail on the image only (windows, wheels, lane marks): the label keeps the object's class."""
        pts = np.round(np.asarray(points)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.image, [pts], color, lineType=cv2.LINE_AA)


def _facade(canvas: _Canvas, near_x: float, far_x: float, near_top: float, far_top: float, near_base: float,
            far_base: float) -> None:
    """A building wall in perspective between image columns ``near_x`` and ``far_x``, with rows of windows."""
    canvas.polygon(np.array([[near_x, near_top], [far_x, far_top], [far_x, far_base], [near_x, near_base]]), "Building")
    rng = canvas.rng
    columns, floors = int(rng.integers(3, 6)), int(rng.integers(4, 8))
    glass = canvas.color("Building", jitter=6.0, scale=0.55)

    def at(u: float, v: float) -> tuple[float, float]:  # u along the wall (0 near), v up the wall (0 base)
        x = near_x + (far_x - near_x) * u
        top, base = near_top + (far_top - near_top) * u, near_base + (far_base - near_base) * u
        return x, base + (top - base) * v

    for i in range(columns):
        for j in range(floors):
            u0, u1 = (i + 0.25) / columns, (i + 0.7) / columns
            v0, v1 = (j + 0.35) / (floors + 0.5), (j + 0.8) / (floors + 0.5)
            canvas.paint(np.array([at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)]), glass)


def _car(canvas: _Canvas, x: float, base: float, width: float) -> None:
    """A car seen from behind, its bottom centre at ``(x, base)``."""
    height = 0.8 * width
    body = canvas.color("Car", jitter=18.0)
    canvas.rect(x - width / 2, base - 0.62 * height, x + width / 2, base - 0.1 * height, "Car", body)
    canvas.polygon(np.array([[x - 0.38 * width, base - 0.62 * height], [x - 0.3 * width, base - height],
                             [x + 0.3 * width, base - height], [x + 0.38 * width, base - 0.62 * height]]), "Car", body)
    canvas.paint(np.array([[x - 0.3 * width, base - 0.65 * height], [x - 0.25 * width, base - 0.93 * height],
                           [x + 0.25 * width, base - 0.93 * height], [x + 0.3 * width, base - 0.65 * height]]),
                 (150, 160, 170))
    for side in (-1, 1):
        canvas.rect(x + side * 0.42 * width - 0.07 * width, base - 0.14 * height, x + side * 0.42 * width + 0.07 * width,
                    base, "Car", (25, 25, 28))
        canvas.paint(np.array([[x + side * 0.4 * width - 0.05 * width, base - 0.45 * height],
                               [x + side * 0.4 * width + 0.05 * width, base - 0.45 * height],
                               [x + side * 0.4 * width + 0.05 * width, base - 0.38 * height],
                               [x + side * 0.4 * width - 0.05 * width, base - 0.38 * height]]), (150, 40, 40))


def _pedestrian(canvas: _Canvas, x: float, base: float, height: float) -> None:
    width = 0.28 * height
    coat = canvas.color("Pedestrian", jitter=10.0)
    canvas.rect(x - width / 2, base - 0.8 * height, x + width / 2, base - 0.42 * height, "Pedestrian", coat)
    canvas.rect(x - width / 2.6, base - 0.42 * height, x + width / 2.6, base, "Pedestrian", coat)
    canvas.ellipse((x, base - 0.89 * height), (0.11 * height, 0.11 * height), "Pedestrian",
                   canvas.color("Pedestrian", jitter=8.0, scale=2.6))


def _tree(canvas: _Canvas, x: float, base: float, height: float) -> None:
    canvas.rect(x - 0.03 * height, base - 0.55 * height, x + 0.03 * height, base, "Tree",
                canvas.color("Tree", jitter=6.0, scale=0.5))
    leaves = canvas.color("Tree", jitter=8.0, scale=0.85)
    rng = canvas.rng
    for _ in range(4):
        dx, dy = rng.normal(0.0, 0.12 * height), rng.normal(0.0, 0.08 * height)
        radius = rng.uniform(0.2, 0.3) * height
        canvas.ellipse((x + dx, base - 0.7 * height + dy), (radius, radius * 0.9), "Tree", leaves)


def _pole(canvas: _Canvas, x: float, base: float, height: float, sign: bool) -> None:
    canvas.rect(x - 0.012 * height - 1, base - height, x + 0.012 * height + 1, base, "Pole")
    if sign:
        size = 0.12 * height
        color = tuple(int(v) for v in canvas.rng.choice([(160, 40, 40), (40, 70, 150), (200, 200, 200)]))
        canvas.rect(x - size, base - height - 0.2 * size, x + size, base - height + 1.4 * size, "SignSymbol", color)


def street_scene(seed: int = 0, height: int = 360, width: int = 480, noise: float = 4.0) -> Scene:
    """A random street scene (the same for the same ``seed``) of ``height × width`` pixels (CamVid: 360 × 480).

    ``noise``: standard deviation of the Gaussian pixel noise (grey levels) added after a light blur."""
    if height < 32 or width < 32:
        raise ValueError(f"a street scene needs at least 32×32 pixels, got {width}×{height}")
    rng = np.random.default_rng(seed)
    canvas = _Canvas(height, width, rng)
    horizon = height * rng.uniform(0.42, 0.52)
    vanish = width * rng.uniform(0.4, 0.6)

    sky_top, sky_bottom = np.array(canvas.color("Sky", jitter=6.0, scale=0.9)), np.array(canvas.color("Sky", jitter=4.0))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    canvas.image[:] = np.round(sky_top * (1 - ramp) + sky_bottom * ramp).astype(np.uint8)

    # Distant frontal buildings on the horizon, then the side walls in perspective.
    x = 0.0
    while x < width:
        w = width * rng.uniform(0.08, 0.16)
        canvas.rect(x, horizon - height * rng.uniform(0.08, 0.22), x + w, horizon + 2, "Building")
        x += w
    road_near = width * rng.uniform(-0.1, 0.06)  # road edge at the bottom row, from each side (beyond it: < 0)
    walk = width * rng.uniform(0.12, 0.22)  # pavement width at the bottom row
    left_kerb, right_kerb = road_near + walk, width - road_near - walk
    far_left, far_right = vanish - width * 0.03, vanish + width * 0.03
    for side, far_x, near_x, kerb_x, far_kerb in ((-1, vanish - width * 0.06, 0.0, left_kerb, far_left),
                                                 (1, vanish + width * 0.06, float(width), right_kerb, far_right)):
        far_top = horizon - height * rng.uniform(0.1, 0.2)
        near_top = height * rng.uniform(-0.2, 0.15)
        near_base = height * rng.uniform(0.68, 0.8)
        _facade(canvas, near_x, far_x, near_top, far_top, near_base, horizon + 3)
        canvas.polygon(np.array([[near_x, height], [near_x, near_base], [far_x, horizon + 3], [far_kerb, horizon + 3],
                                 [kerb_x, height]]), "Pavement")
    canvas.polygon(np.array([[left_kerb, height], [far_left, horizon + 2], [far_right, horizon + 2], [right_kerb, height]]),
                   "Road")
    for t0 in np.arange(0.1, 1.0, 0.2):  # dashed centre line, on the road's label
        t1 = t0 + 0.1
        xs = [vanish + ((left_kerb + right_kerb) / 2 - vanish) * t for t in (t0, t1)]
        ys = [horizon + (height - horizon) * t for t in (t0, t1)]
        half = [1 + 4 * t for t in (t0, t1)]
        canvas.paint(np.array([[xs[0] - half[0], ys[0]], [xs[0] + half[0], ys[0]], [xs[1] + half[1], ys[1]],
                               [xs[1] - half[1], ys[1]]]), (200, 200, 195))

    def depth(t: float) -> float:  # image row of a point a fraction t of the way from the horizon to the bottom
        return horizon + (height - horizon) * t

    def kerb(side: int, t: float, inset: float) -> float:
        edge = left_kerb if side < 0 else right_kerb
        far = far_left if side < 0 else far_right
        return far + (edge - far) * t - side * inset * t * walk

    # Street furniture, far to near so that near objects occlude far ones.
    things = []
    for side in (-1, 1):
        for t in rng.uniform(0.15, 0.7, int(rng.integers(1, 4))):
            things.append((t, "tree" if rng.uniform() < 0.5 else "pole", side))
        for t in rng.uniform(0.2, 0.6, int(rng.integers(0, 3))):
            things.append((t, "pedestrian", side))
    for t in rng.uniform(0.15, 0.6, int(rng.integers(1, 4))):
        things.append((t, "car", int(rng.choice([-1, 1]))))
    for t, kind, side in sorted(things):
        base = depth(t)
        scale = height * t
        if kind == "car":
            lane = (left_kerb + right_kerb) / 2 + side * (right_kerb - left_kerb) * 0.22
            _car(canvas, vanish + (lane - vanish) * t, base, 0.75 * scale)
        elif kind == "tree":
            _tree(canvas, kerb(side, t, 0.5), base, 1.0 * scale)
        elif kind == "pole":
            _pole(canvas, kerb(side, t, 0.2), base, 0.9 * scale, sign=rng.uniform() < 0.6)
        else:
            _pedestrian(canvas, kerb(side, t, 0.6), base, 0.45 * scale)

    image = cv2.GaussianBlur(canvas.image, (3, 3), 0).astype(np.float32)
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), canvas.label)
