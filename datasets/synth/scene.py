"""Procedural scenes: coloured shapes on cluttered backgrounds, with exact boxes.

Every object is drawn as a binary mask (no anti-aliasing), so its box is the
tight box of the pixels it owns in the final image (after occlusion by later
objects). Occlusion is allowed but bounded: every object keeps at least
``MIN_VISIBLE`` of its pixels, so what the box encloses is recognisably that object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 30),
    "green": (35, 160, 55),
    "cyan": (35, 200, 215),
    "blue": (35, 65, 215),
    "purple": (135, 45, 185),
    "pink": (245, 125, 195),
}
# Side of an object's square footprint, as a fraction of the image side. The classes are
# separated by clear gaps so that "small" means the same thing in every image.
SIZES = {"small": (0.10, 0.135), "medium": (0.18, 0.225), "large": (0.28, 0.33)}
FILLS = ("solid", "outlined")
ATTRIBUTES = ("shape", "color", "size", "fill")
MIN_VISIBLE = 0.7
COLOR_JITTER = 16


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    fill: str
    box: tuple[int, int, int, int]  # xyxy pixel edges: x2, y2 exclusive

    def attr(self, name: str) -> str:
        return getattr(self, name)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "triangle":
        return [(0, -1), (1, 1), (-1, 1)]
    if shape == "diamond":
        return [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)]
    if shape == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.36
        return [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    raise ValueError(f"unknown shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


def shape_mask(shape: str, side: int, fill: str) -> np.ndarray:
    """Binary mask (side x side) of one shape, solid or outlined."""
    img = PILImage.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    r = (side - 1) / 2
    width = max(2, round(side * 0.13))
    if shape == "circle":
        bbox = (0, 0, side - 1, side - 1)
        if fill == "solid":
            draw.ellipse(bbox, fill=255)
        else:
            draw.ellipse(bbox, outline=255, width=width)
    else:
        pts = [(r + x * r, r + y * r) for x, y in _POLYGONS[shape]]
        if fill == "solid":
            draw.polygon(pts, fill=255)
        else:
            draw.polygon(pts, outline=255, width=width)
    return np.asarray(img, dtype=bool)


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Muted gradient + noise + stray lines and rings: low saturation, so colour words stay
    about the objects, but enough clutter that finding the objects is not trivial."""
    g0, g1 = rng.uniform(50, 200, 2)
    c0 = g0 + rng.uniform(-22, 22, 3)
    c1 = g1 + rng.uniform(-22, 22, 3)
    ang = rng.uniform(0, 2 * math.pi)
    # A linear gradient is bilinear, so interpolating its four corner colours is exact
    # up to the edge half-pixel, and much cheaper than evaluating it per pixel.
    corners = np.empty((2, 2, 3))
    for yi, y in enumerate((-0.5, 0.5)):
        for xi, x in enumerate((-0.5, 0.5)):
            r = math.cos(ang) * x + math.sin(ang) * y + 0.5
            corners[yi, xi] = c0 * (1 - r) + c1 * r
    img = PILImage.fromarray(np.clip(corners, 0, 255).astype(np.uint8), "RGB").resize((s, s), PILImage.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        g = rng.uniform(30, 220)
        col = tuple(int(v) for v in np.clip(g + rng.uniform(-25, 25, 3), 0, 255))
        p = rng.uniform(-0.1 * s, 1.1 * s, 4)
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 3))):
        g = rng.uniform(30, 220)
        col = tuple(int(v) for v in np.clip(g + rng.uniform(-25, 25, 3), 0, 255))
        cx, cy, rr = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.05 * s, 0.2 * s)
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), outline=col, width=1)
    return np.asarray(img, dtype=np.int16)


def render_scene(
    rng: np.random.Generator,
    size: int = 128,
    n_objects: tuple[int, int] = (3, 8),
    max_tries: int = 30,
    owner_out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[SceneObject]]:
    """One RGB uint8 image and its objects (boxes tight to the visible pixels).

    `owner_out` (size x size int16), when given, receives which object owns each pixel
    (-1 for background), so tests can check boxes against pixels.
    """
    s = size
    canvas = _background(rng, s)
    owner = np.full((s, s), -1, dtype=np.int16)
    want = int(rng.integers(n_objects[0], n_objects[1] + 1))
    specs: list[tuple[str, str, str, str, int, int, int, int]] = []  # attrs, pixels, x0, y0, side
    visible: list[int] = []  # pixels each object still shows
    color_names = list(COLORS)
    size_names = list(SIZES)
    for _ in range(want):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = color_names[int(rng.integers(len(color_names)))]
        size_name = size_names[int(rng.integers(len(size_names)))]
        fill = FILLS[int(rng.integers(2))]
        lo, hi = SIZES[size_name]
        side = max(5, round(rng.uniform(lo, hi) * s))
        mask = shape_mask(shape, side, fill)
        pixels = int(mask.sum())
        for _ in range(max_tries):
            x0 = int(rng.integers(0, s - side + 1))
            y0 = int(rng.integers(0, s - side + 1))
            region = owner[y0 : y0 + side, x0 : x0 + side]
            covered = region[mask]
            covered = covered[covered >= 0]
            if covered.size:
                ids, hidden = np.unique(covered, return_counts=True)
                if any(visible[i] - n < MIN_VISIBLE * specs[i][4] for i, n in zip(ids, hidden, strict=True)):
                    continue  # would hide too much of an earlier object
                for i, n in zip(ids, hidden, strict=True):
                    visible[i] -= int(n)
            region[mask] = len(specs)
            specs.append((shape, color, size_name, fill, pixels, x0, y0, side))
            visible.append(pixels)
            base = np.asarray(COLORS[color], dtype=np.int16) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
            canvas[y0 : y0 + side, x0 : x0 + side][mask] = base
            break
    canvas += rng.integers(0, 15, canvas.shape, dtype=np.uint8)  # sensor-like noise, centred below
    canvas -= 7
    image = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    objects = []
    for i, (shape, color, size_name, fill, _, x0, y0, side) in enumerate(specs):
        ys, xs = np.nonzero(owner[y0 : y0 + side, x0 : x0 + side] == i)
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        objects.append(SceneObject(shape, color, size_name, fill, box))
    if owner_out is not None:
        owner_out[...] = owner
    return image, objects
