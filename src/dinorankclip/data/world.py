"""The demo world: seeded scenes of 1-4 coloured shapes, rendered small, with captions from a small grammar.

Captions under-describe their scenes the way alt-text does (a relation caption names two of the objects, a
count-only caption names none), so a model has to learn colour, shape, count and layout from many noisy pairs.
Every draw comes from a `random.Random` seeded by the caller: the same seed gives the same world, byte for byte.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.13, "large": 0.20}  # half-extent as a fraction of the image side
COUNT_WORDS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
# Colour-shape pairs never shown in training: the OOD suite asks for the shape of exactly these.
HELD_OUT = {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"),
            ("purple", "diamond"), ("orange", "circle")}
GRID = 2  # objects sit in the cells of a GRID x GRID layout, so relations are unambiguous
# Scenes with few objects are common, as in web photos; their captions name every object, which is what
# teaches shape words (with many objects, colour and count alone already tell captions apart).
COUNT_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    dx: float  # jitter of the centre inside its cell, as a fraction of the cell
    dy: float

    def phrase(self, with_size: bool = True) -> str:
        size = f"{self.size} " if with_size else ""
        return f"a {size}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: int  # grey level

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}


def relation(a: Shape, b: Shape) -> str | None:
    """Where `a` is relative to `b`, when they share a row or a column of the grid."""
    if a.row == b.row and a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def sample_object(rng: random.Random, row: int, col: int, colour: str | None = None, shape: str | None = None,
                  allow_held_out: bool = False) -> Shape:
    while True:
        c = colour or rng.choice(list(COLOURS))
        s = shape or rng.choice(SHAPES)
        if allow_held_out or (c, s) not in HELD_OUT:
            break
        if colour and shape:
            raise ValueError(f"({c}, {s}) is a held-out combination")
    return Shape(c, s, rng.choice(list(SIZES)), row, col, rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08))


def sample_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    n = n_objects or rng.choices(range(1, GRID * GRID + 1), weights=COUNT_WEIGHTS)[0]
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return Scene(tuple(sample_object(rng, r, c) for r, c in cells), rng.randint(15, 75))


def render(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for o in scene.objects:
        cx, cy = (o.col + 0.5 + o.dx) * cell, (o.row + 0.5 + o.dy) * cell
        h = SIZES[o.size] * size
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - h * 0.9, cy - h * 0.9, cx + h * 0.9, cy + h * 0.9], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.85), (cx + h, cy + h * 0.85)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
        elif o.shape == "cross":
            t = h * 0.38
            draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img


def count_phrase(n: int) -> str:
    return f"{COUNT_WORDS[n - 1]} shape" + ("s" if n > 1 else "")


def join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def full_description(scene: Scene) -> str:
    """The complete, deterministic caption: count, then every object in reading order."""
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return f"{count_phrase(len(ordered))}: " + join_phrases([o.phrase() for o in ordered])


def alt_text(scene: Scene, rng: random.Random) -> str:
    """A noisy caption: one of four grammar forms, sizes sometimes dropped, objects in random order."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    with_size = rng.random() > 0.3
    pairs = [(a, b) for a in objs for b in objs if a is not b and relation(a, b)]
    form = rng.choices(["list", "count_list", "count", "relation"], weights=[0.3, 0.25, 0.1, 0.35])[0]
    if form == "relation" and pairs:
        a, b = rng.choice(pairs)
        return f"{a.phrase(with_size)} {relation(a, b)} {b.phrase(with_size)}"
    if form == "count":
        return count_phrase(len(objs))
    listed = join_phrases([o.phrase(with_size) for o in objs])
    return f"{count_phrase(len(objs))}: {listed}" if form == "count_list" else listed
