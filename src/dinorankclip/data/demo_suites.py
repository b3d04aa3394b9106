"""Evaluation suites of the demo world, mirroring the paper's benchmark kinds at toy scale.

Classification suites put each class at equal frequency; prompt templates only use words of the caption grammar
(`world.alt_text`), ensembled over the attributes a suite does not ask about, so a zero-shot prompt is in the
language the model was trained on. Chance level is 1 / number of classes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from dinorankclip.data import world as w


@dataclass
class Suite:
    """One benchmark: `items` are (scene, label) for classification or (scene, [captions]) for retrieval."""

    name: str
    task: str  # zeroshot_classification | zeroshot_retrieval
    items: list
    classnames: list[str] | None = None
    templates: list[str] | None = None


def _balanced(rng: random.Random, size: int, classes: list, make: Callable[[random.Random, int], w.Scene]) -> list:
    items = [(make(rng, label), label) for label in range(len(classes)) for _ in range(size // len(classes))]
    rng.shuffle(items)
    return items


def _single(rng: random.Random, colour: str | None = None, shape: str | None = None, held_out: bool = False):
    row, col = rng.randrange(w.GRID), rng.randrange(w.GRID)
    obj = w.sample_object(rng, row, col, colour, shape, allow_held_out=held_out)
    return w.Scene((obj,), rng.randint(15, 75))


def colour_suite(rng: random.Random, size: int) -> Suite:
    colours = list(w.COLOURS)
    items = _balanced(rng, size, colours, lambda r, y: _single(r, colour=colours[y]))
    return Suite("demo-colour", "zeroshot_classification", items, colours, [f"a {{c}} {s}" for s in w.SHAPES])


def shape_suite(rng: random.Random, size: int) -> Suite:
    shapes = list(w.SHAPES)
    items = _balanced(rng, size, shapes, lambda r, y: _single(r, shape=shapes[y]))
    return Suite("demo-shape", "zeroshot_classification", items, shapes, [f"a {c} {{c}}" for c in w.COLOURS])


def ood_suite(rng: random.Random, size: int) -> Suite:
    """Shape classification on colour-shape pairs held out of training: compositional generalisation."""
    shapes = list(w.SHAPES)
    held = sorted(w.HELD_OUT)

    def make(r: random.Random, y: int) -> w.Scene:
        colour = r.choice([c for c, s in held if s == shapes[y]])
        return _single(r, colour=colour, shape=shapes[y], held_out=True)

    items = _balanced(rng, size, shapes, make)
    return Suite("demo-ood", "zeroshot_classification", items, shapes, [f"a {c} {{c}}" for c in w.COLOURS])


def count_suite(rng: random.Random, size: int) -> Suite:
    names = [w.count_phrase(n) for n in range(1, w.GRID * w.GRID + 1)]
    items = _balanced(rng, size, names, lambda r, y: w.sample_scene(r, n_objects=y + 1))
    return Suite("demo-count", "zeroshot_classification", items, names, ["{c}"])


def spatial_suite(rng: random.Random, size: int) -> Suite:
    """Where the red shape is relative to the blue one; the two always share a row or a column."""
    relations = list(w.RELATIONS)

    def make(r: random.Random, y: int) -> w.Scene:
        while True:
            (ra, ca), (rb, cb) = r.sample([(i, j) for i in range(w.GRID) for j in range(w.GRID)], 2)
            red = w.sample_object(r, ra, ca, colour="red")
            blue = w.sample_object(r, rb, cb, colour="blue")
            if w.relation(red, blue) == relations[y]:
                return w.Scene((red, blue), r.randint(15, 75))

    items = _balanced(rng, size, relations, make)
    templates = [f"a red {a} {{c}} a blue {b}" for a in w.SHAPES for b in w.SHAPES
                 if ("red", a) not in w.HELD_OUT and ("blue", b) not in w.HELD_OUT]
    return Suite("demo-spatial", "zeroshot_classification", items, relations, templates)


def retrieval_suite(rng: random.Random, size: int) -> Suite:
    items = [(scene, [w.full_description(scene)]) for scene in (w.sample_scene(rng) for _ in range(size))]
    return Suite("demo-retrieval", "zeroshot_retrieval", items)


# Suites that also get a `train` split (from their own generator, so the test splits stay as they are): the demo's
# linear-probe suites, mirroring the paper's fine-grained probe (shape is the demo's fine-grained attribute).
PROBE_SUITES = ("demo-shape",)

SUITES: dict[str, Callable[[random.Random, int], Suite]] = {
    "demo-colour": colour_suite,
    "demo-shape": shape_suite,
    "demo-count": count_suite,
    "demo-spatial": spatial_suite,
    "demo-retrieval": retrieval_suite,
    "demo-ood": ood_suite,
}
