"""The synthetic world: scenes of shapes on textured backgrounds, drawn deterministically.

Every scene is drawn from (seed, index) with PIL: a shape kind, a colour, a size, a count (1-3), a
background texture and a rendering style (filled, outline, noisy sketch); in the rich world
(:func:`sample_scene_rich`) part of the scenes hold a second object in a spatial relation that the
renderer draws. Captions describing scenes are in :mod:`.captions` (the pretraining stream of the
shipped tiny CLIP); the few-shot tasks rendered from this world are the ``synthetic_*`` datasets
(:mod:`.readers.synthetic`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 55, 185),
    "orange": (240, 130, 25),
}
SIZES = {"small": 0.13, "large": 0.24}  # radius as a fraction of the image side
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
STYLES = ("filled", "outline", "sketch")
RELATIONS = ("above", "below", "left of", "right of")
IMAGE_SIZE = 48


@dataclass(frozen=True)
class Scene:
    """What one image shows. ``extra`` (rich world only) is a second, different object:
    ``(shape, colour, relation)``, where ``relation`` places the main group relative to it
    (one of :data:`RELATIONS`: "above" means the main shapes are drawn above the extra one)."""

    shape: str
    colour: str
    size: str
    count: int
    background: str
    style: str
    extra: tuple[str, str, str] | None = None


def sample_scene(
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    styles: Sequence[str] = STYLES,
    sizes: Sequence[str] = tuple(SIZES),
) -> Scene:
    return Scene(
        shape=str(rng.choice(shapes)),
        colour=str(rng.choice(colours)),
        size=str(rng.choice(sizes)),
        count=int(rng.integers(1, 4)),
        background=str(rng.choice(BACKGROUNDS)),
        style=str(rng.choice(styles)),
    )


def sample_scene_rich(rng: np.random.Generator, *, extra_prob: float = 0.35) -> Scene:
    """A scene of the rich world: :func:`sample_scene`, plus with probability ``extra_prob`` a
    second object of another shape and colour in a spatial relation (see :class:`Scene`)."""
    scene = sample_scene(rng)
    if rng.uniform() >= extra_prob:
        return scene
    shape = str(rng.choice([s for s in SHAPES if s != scene.shape]))
    colour = str(rng.choice([c for c in COLOURS if c != scene.colour]))
    return Scene(
        scene.shape,
        scene.colour,
        scene.size,
        scene.count,
        scene.background,
        scene.style,
        (shape, colour, str(rng.choice(RELATIONS))),
    )


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n, radius, offset=0.0):
        return [
            (
                cx + radius * math.cos(rot + offset + 2 * math.pi * i / n),
                cy + radius * math.sin(rot + offset + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if shape == "circle":
        return ring(20, r)
    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a = 0.35 * r
        pts = [
            (-a, -r),
            (a, -r),
            (a, -a),
            (r, -a),
            (r, a),
            (a, a),
            (a, r),
            (-a, r),
            (-a, a),
            (-r, a),
            (-r, -a),
            (-a, -a),
        ]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    if shape == "heart":
        pts = []
        for i in range(24):
            t = 2 * math.pi * i / 24
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + r * x / 17, cy + r * y / 17))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    style: str,
    colour: tuple[int, ...],
    cx: float,
    cy: float,
    r: float,
    rng: np.random.Generator,
) -> None:
    pts = _polygon(
        shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)) if shape not in ("heart",) else 0.0
    )
    if style == "filled":
        draw.polygon(pts, fill=colour)
    elif style == "outline":
        draw.polygon(pts, outline=colour, width=2)
    else:  # sketch: jittered strokes in the shape's colour
        for _ in range(2):
            jit = [(x + float(rng.normal(0, 0.9)), y + float(rng.normal(0, 0.9))) for x, y in pts]
            draw.line(jit + [jit[0]], fill=colour, width=1)


_RELATION_SCALE = 0.75  # shapes of two-object scenes are drawn smaller so each group fits its half
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _relation_boxes(relation: str, size: int) -> tuple[Box, Box]:
    """(main box, extra box): the halves of the image that ``relation`` puts the two groups in."""
    h = size / 2
    top, bottom, left, right = (
        (0, 0, size, h),
        (0, h, size, size),
        (0, 0, h, size),
        (h, 0, size, size),
    )
    boxes = {
        "above": (top, bottom),
        "below": (bottom, top),
        "left of": (left, right),
        "right of": (right, left),
    }
    if relation not in boxes:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    return boxes[relation]


def _position(rng: np.random.Generator, box: Box, r: float) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    lo, hi = (
        np.array([x0 + r + 1, y0 + r + 1]),
        np.array([max(x0 + r + 1, x1 - r - 1), max(y0 + r + 1, y1 - r - 1)]),
    )
    cx, cy = (float(v) for v in lo + (hi - lo) * rng.uniform(0, 1, 2))
    return cx, cy


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene``; ``rng`` supplies positions, jitter and noise."""
    base = int(rng.integers(200, 245))
    tint = tuple(int(base + d) for d in rng.integers(-12, 12, 3))
    img = Image.new("RGB", (size, size), tint)
    draw = ImageDraw.Draw(img)
    pattern = tuple(max(0, c - int(rng.integers(25, 50))) for c in tint)
    step = int(rng.integers(5, 9))
    if scene.background == "striped":
        for x in range(int(rng.integers(0, step)), size * 2, step):
            draw.line([(x, 0), (x - size, size)], fill=pattern, width=2)
    elif scene.background == "dotted":
        for y in range(2, size, step):
            for x in range(2 + (y // step % 2) * step // 2, size, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=pattern)
    elif scene.background == "checkered":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=pattern)
    colour = tuple(
        int(np.clip(c + d, 0, 255)) for c, d in zip(COLOURS[scene.colour], rng.integers(-18, 18, 3))
    )
    r = SIZES[scene.size] * size * float(rng.uniform(0.85, 1.15))
    if scene.extra is None:
        for _ in range(scene.count):
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            _draw_shape(draw, scene.shape, scene.style, colour, cx, cy, r, rng)
    else:  # two groups in the two halves the relation names, drawn a quarter smaller to fit
        main_box, extra_box = _relation_boxes(scene.extra[2], size)
        for _ in range(scene.count):
            cx, cy = _position(rng, main_box, _RELATION_SCALE * r)
            _draw_shape(draw, scene.shape, scene.style, colour, cx, cy, _RELATION_SCALE * r, rng)
        extra_colour = tuple(
            int(np.clip(c + d, 0, 255))
            for c, d in zip(COLOURS[scene.extra[1]], rng.integers(-18, 18, 3))
        )
        r2 = _RELATION_SCALE * SIZES["small"] * size * float(rng.uniform(0.85, 1.15))
        cx, cy = _position(rng, extra_box, r2)
        _draw_shape(draw, scene.extra[0], scene.style, extra_colour, cx, cy, r2, rng)
    if scene.style == "sketch":
        arr = np.asarray(img).astype(np.int16)
        arr = arr + rng.normal(0, 14, arr.shape).astype(np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])
