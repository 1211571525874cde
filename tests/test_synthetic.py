"""The procedural world: determinism, class balance, captions that match what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from promptalign.data import load_dataset
from promptalign.data.synthetic import (
    COLOURS,
    SHAPES,
    TASKS,
    Scene,
    caption,
    caption_pairs,
    render,
    sample_scene,
    scene_rng,
)


def test_generation_is_deterministic():
    a_img, a_cap = caption_pairs(3, 100, 20)
    b_img, b_cap = caption_pairs(3, 100, 20)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, _ = caption_pairs(4, 100, 20)
    assert not np.array_equal(a_img, c_img)


def test_captions_name_the_sampled_attributes():
    for i in range(200):
        rng = scene_rng(0, i)
        s = sample_scene(rng)
        c = caption(s)
        assert s.colour in c and s.size in c and f"{s.background} background" in c
        assert s.shape in c or (s.shape == "cross" and "crosses" in c)
        assert ("sketch" in c) == (s.style == "sketch") and ("outline" in c) == (s.style == "outline")
        assert c.startswith(("a ", "an ", "two ", "three "))
        assert (s.count == 1) == (not any(w in c.split() for w in ("two", "three")))


def _foreground(img: np.ndarray) -> np.ndarray:
    bg = np.median(img.reshape(-1, 3), axis=0)
    return np.abs(img.astype(int) - bg).sum(-1) > 120


@pytest.mark.parametrize("colour", list(COLOURS))
def test_drawn_colour_matches_the_caption(colour):
    rng = scene_rng(1, hash(colour) % 1000)
    img = np.asarray(render(Scene("square", colour, "large", 1, "plain", "filled"), rng))
    fg = _foreground(img)
    assert fg.sum() > 100
    mean = img[fg].mean(0)
    dists = {c: np.linalg.norm(mean - np.array(v)) for c, v in COLOURS.items()}
    assert min(dists, key=dists.get) == colour


def test_size_and_count_change_the_drawn_area():
    def area(size, count, seed):
        return _foreground(np.asarray(render(Scene("circle", "blue", size, count, "plain", "filled"),
                                             scene_rng(seed, 0)))).sum()

    small = np.mean([area("small", 1, s) for s in range(10)])
    large = np.mean([area("large", 1, s) for s in range(10)])
    three = np.mean([area("small", 3, s) for s in range(10)])
    assert large > 2.5 * small and three > 2 * small


def test_tasks_are_balanced_and_registered(tmp_path):
    ds = load_dataset("synthetic_colour_shapes", tmp_path, shots=4, seed=1)
    task = TASKS["colour_shapes"]
    assert ds.num_classes == len(COLOURS) * len(SHAPES) == 48
    counts = np.bincount([r.label for r in ds.test], minlength=48)
    assert (counts == task.test).all()
    assert len(ds.train) == 48 * 4
    base = load_dataset("synthetic_colour_shapes", tmp_path, shots=4, seed=1, subsample="base")
    new = load_dataset("synthetic_colour_shapes", tmp_path, shots=4, seed=1, subsample="new")
    assert base.num_classes == new.num_classes == 24
    # the shuffled class order lets base and new both cover every colour and shape
    for part in (base, new):
        words = [c.split() for c in part.classnames]
        assert {w[0] for w in words} == set(COLOURS) and len({w[1] for w in words}) >= 6
    sketch = load_dataset("synthetic_colour_shapes_sketch", tmp_path)
    assert sketch.classnames == ds.classnames and not sketch.train
    shapes = load_dataset("synthetic_shapes", tmp_path)
    assert shapes.classnames == list(SHAPES) and ds.template == "a {}"
    # generated once: a second load reads the same files
    again = load_dataset("synthetic_colour_shapes", tmp_path, shots=4, seed=1)
    assert again.train == ds.train
