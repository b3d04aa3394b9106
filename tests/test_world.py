"""The demo world: seeded, grammatical, and its suites label what the images show."""

import random
import tarfile

import numpy as np
import pytest

from dinorankclip.data import world as w
from dinorankclip.data.demo_suites import SUITES


def scenes(seed: int, n: int = 300) -> list[w.Scene]:
    rng = random.Random(seed)
    return [w.sample_scene(rng) for _ in range(n)]


def test_same_seed_same_world_different_seed_different_world():
    assert scenes(3) == scenes(3)
    assert scenes(3) != scenes(4)
    a, b = w.render(scenes(3)[0], 64), w.render(scenes(3)[0], 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_training_scenes_avoid_held_out_pairs_and_fill_distinct_cells():
    for scene in scenes(0, 2000):
        assert 1 <= len(scene.objects) <= 4
        assert not {(o.colour, o.shape) for o in scene.objects} & w.HELD_OUT
        assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)


def test_relation_is_read_off_the_grid():
    def at(row, col):
        return w.Shape("red", "circle", "small", row, col, 0.0, 0.0)

    assert w.relation(at(0, 0), at(0, 1)) == "left of"
    assert w.relation(at(0, 1), at(0, 0)) == "right of"
    assert w.relation(at(0, 1), at(1, 1)) == "above"
    assert w.relation(at(1, 0), at(0, 0)) == "below"
    assert w.relation(at(0, 0), at(1, 1)) is None


def test_captions_only_say_true_things():
    rng = random.Random(1)
    for scene in scenes(1, 500):
        caption = w.alt_text(scene, rng)
        words = set(caption.replace(",", " ").replace(":", " ").split())
        named_colours, named_shapes = words & set(w.COLOURS), words & set(w.SHAPES)
        assert named_colours <= {o.colour for o in scene.objects}
        assert named_shapes <= {o.shape for o in scene.objects}
        for n, word in enumerate(w.COUNT_WORDS, start=1):
            if caption.startswith(f"{word} shape"):
                assert n == len(scene.objects)
        for rel in w.RELATIONS:
            if f" {rel} " in caption:
                left, right = caption.split(f" {rel} ")
                assert any(w.relation(a, b) == rel for a in scene.objects for b in scene.objects
                           if left.endswith(f"{a.colour} {a.shape}") and right.endswith(f"{b.colour} {b.shape}"))


def test_full_description_names_every_object_and_the_count():
    scene = w.Scene((w.Shape("blue", "square", "large", 1, 1, 0, 0), w.Shape("red", "circle", "small", 0, 1, 0, 0)), 30)
    assert w.full_description(scene) == "two shapes: a small red circle and a large blue square"


def test_render_paints_the_object_colour_at_its_centre():
    scene = w.Scene((w.Shape("green", "square", "large", 0, 1, 0.0, 0.0),), 40)
    img = np.asarray(w.render(scene, 64))
    assert tuple(img[16, 48]) == w.COLOURS["green"]  # centre of cell (row 0, col 1)
    assert tuple(img[48, 16]) == (40, 40, 40)  # an empty cell shows the background


@pytest.mark.parametrize("name", ["demo-colour", "demo-shape", "demo-ood", "demo-count", "demo-spatial"])
def test_classification_suites_are_balanced_and_correctly_labelled(name):
    suite = SUITES[name](random.Random(0), 60)
    labels = [label for _, label in suite.items]
    assert np.bincount(labels).tolist() == [60 // len(suite.classnames)] * len(suite.classnames)
    assert all("{c}" in t for t in suite.templates)
    for scene, label in suite.items:
        truth = suite.classnames[label]
        if name == "demo-colour":
            assert scene.objects[0].colour == truth
        elif name in ("demo-shape", "demo-ood"):
            assert scene.objects[0].shape == truth
            assert ((scene.objects[0].colour, truth) in w.HELD_OUT) == (name == "demo-ood")
        elif name == "demo-count":
            assert w.count_phrase(len(scene.objects)) == truth
        else:
            red, blue = scene.objects
            assert (red.colour, blue.colour) == ("red", "blue") and w.relation(red, blue) == truth


def test_retrieval_suite_pairs_each_image_with_its_description():
    suite = SUITES["demo-retrieval"](random.Random(0), 20)
    assert all(captions == [w.full_description(scene)] for scene, captions in suite.items)


def test_probe_train_split_leaves_every_test_split_as_it_was(tmp_path):
    """The probe suite's train split comes from its own generator: adding it changes no test split (so zero-shot
    numbers stay comparable), and it is written in clip-benchmark's layout."""
    from dinorankclip.data.demo_world import write_demo_world

    spec = {"image_size": 32, "port": 1, "train_scenes": 3, "dead_links": 0, "corrupt_files": 0, "malformed_rows": 0,
            "eval_size": 25, "retrieval_size": 10}
    write_demo_world(tmp_path / "without", {**spec, "probe_train_size": 0}, seed=0)
    write_demo_world(tmp_path / "with", {**spec, "probe_train_size": 15}, seed=0)
    tests = sorted(p.relative_to(tmp_path / "with") for p in (tmp_path / "with" / "eval").rglob("test/0.tar"))
    assert len(tests) == 6
    for rel in tests:
        assert (tmp_path / "with" / rel).read_bytes() == (tmp_path / "without" / rel).read_bytes(), rel
    train = sorted(p.parent.parent.name for p in (tmp_path / "with" / "eval").rglob("train/0.tar"))
    assert train == ["wds_demo-shape"] and not list((tmp_path / "without" / "eval").rglob("train"))
    assert (tmp_path / "with" / "eval" / "wds_demo-shape" / "train" / "nshards.txt").read_text() == "1\n"
    with tarfile.open(tmp_path / "with" / "eval" / "wds_demo-shape" / "train" / "0.tar") as tar:
        assert sum(name.endswith(".cls") for name in tar.getnames()) == 15
