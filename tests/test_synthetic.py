"""The procedural world: determinism, class balance, captions that match what is drawn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from promptalign.data import load_dataset
from promptalign.data.captions import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    caption,
    caption_pairs,
    caption_rich,
)
from promptalign.data.readers.synthetic import TASKS, Task, generate_task
from promptalign.data.world import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    render,
    sample_scene,
    sample_scene_rich,
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
        assert ("sketch" in c) == (s.style == "sketch") and ("outline" in c) == (
            s.style == "outline"
        )
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
        return _foreground(
            np.asarray(
                render(Scene("circle", "blue", size, count, "plain", "filled"), scene_rng(seed, 0))
            )
        ).sum()

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


# ------------------------------------------------------------------------ the rich caption mode
def test_rich_mode_is_deterministic_and_leaves_the_plain_stream_alone():
    a_img, a_cap = caption_pairs(3, 100, 30, mode="rich")
    b_img, b_cap = caption_pairs(3, 100, 30, mode="rich")
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, c_cap = caption_pairs(4, 100, 30, mode="rich")
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    # pair i depends on (seed, start + i) only, as in the plain stream
    d_img, d_cap = caption_pairs(3, 110, 5, mode="rich")
    assert np.array_equal(a_img[10:15], d_img) and a_cap[10:15] == d_cap
    # the default stream is the plain one, and the rich one is a different distribution
    p_img, p_cap = caption_pairs(3, 100, 30)
    q_img, q_cap = caption_pairs(3, 100, 30, mode="plain")
    assert np.array_equal(p_img, q_img) and p_cap == q_cap and p_cap != a_cap
    assert all(c == caption(sample_scene(scene_rng(3, 100 + i))) for i, c in enumerate(p_cap))
    with pytest.raises(ValueError, match="'fancy'"):
        caption_pairs(3, 0, 1, mode="fancy")


def test_single_object_scenes_render_as_in_the_plain_world():
    s = Scene("star", "green", "large", 2, "dotted", "outline")
    assert s.extra is None
    a = np.asarray(render(s, scene_rng(5, 0)))
    b = np.asarray(
        render(Scene("star", "green", "large", 2, "dotted", "outline", None), scene_rng(5, 0))
    )
    assert np.array_equal(a, b)


def _words(options: dict) -> dict[str, str]:
    return {w: k for k, ws in options.items() for w in ws}


def _shape_forms() -> dict[str, str]:
    """Every singular and plural word of each shape ("plus sign" written "plus_sign")."""
    forms = {}
    for shape, words in SHAPE_WORDS.items():
        for w in words:
            w = w.replace(" ", "_")
            forms[w] = forms[w + ("es" if w.endswith(("s", "x")) else "s")] = shape
    return forms


def test_rich_captions_name_what_is_drawn_and_nothing_else():
    colour_of, shape_of = _words(COLOUR_WORDS), _shape_forms()
    seen_extra = seen_synonym = seen_order = seen_digit = 0
    for i in range(400):
        rng = scene_rng(0, i)
        s = sample_scene_rich(rng)
        c = caption_rich(s, np.random.default_rng([0, i, 1]))
        words = c.replace("plus sign", "plus_sign").split()
        colours = [colour_of[w] for w in words if w in colour_of]
        shapes = [shape_of[w] for w in words if w in shape_of]
        drawn_colours = [s.colour] + ([s.extra[1]] if s.extra else [])
        drawn_shapes = [s.shape] + ([s.extra[0]] if s.extra else [])
        assert colours == drawn_colours, (c, s)  # every drawn colour, in order, and no other
        assert shapes == drawn_shapes, (c, s)
        assert ("sketch" in c or "noisy drawing" in c) == (s.style == "sketch"), c
        assert ("outline" in c or "line drawing" in c) == (s.style == "outline"), c
        count_words = {1: {"a", "an", "one", "single"}, 2: {"two", "2", "pair"}, 3: {"three", "3"}}
        assert count_words[s.count] & set(words), c
        for other in set(count_words) - {s.count}:
            assert not (count_words[other] - {"a", "an"}) & set(words), c
        size_words = _words(SIZE_WORDS)
        assert all(size_words[w] == s.size for w in words if w in size_words), c
        bg_words = _words(BACKGROUND_WORDS)
        assert all(bg_words[w] == s.background for w in words if w in bg_words), c
        if s.extra:
            seen_extra += 1
            assert any(f" {w} " in c for w in RELATION_WORDS[s.extra[2]]), c
        seen_synonym += any(w in colour_of and w not in COLOURS for w in words)
        seen_order += " that " in c or " in " + s.colour in c
        seen_digit += any(w in ("2", "3") for w in words)
    # the distribution really varies: relations, synonyms, word order and digits all occur
    assert 80 < seen_extra < 220 and seen_synonym > 40 and seen_order > 40 and seen_digit > 20


def _centre(img: np.ndarray, rgb) -> tuple[float, float]:
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    mask = np.abs(img.astype(int) - np.array(rgb)).sum(-1) < 90
    assert mask.sum() > 15
    return xs[mask].mean(), ys[mask].mean()


@pytest.mark.parametrize("relation", RELATIONS)
def test_the_relation_in_the_caption_is_the_one_drawn(relation):
    for seed in range(5):
        s = Scene("square", "red", "large", 1, "plain", "filled", ("circle", "blue", relation))
        img = np.asarray(render(s, scene_rng(seed, 7)))
        (mx, my), (ex, ey) = _centre(img, COLOURS["red"]), _centre(img, COLOURS["blue"])
        expect = {
            "above": my < ey - 8,
            "below": my > ey + 8,
            "left of": mx < ex - 8,
            "right of": mx > ex + 8,
        }
        assert expect[relation], (relation, (mx, my), (ex, ey))


def test_fine_grained_size_task_has_twins_that_differ_in_size_alone(tmp_path):
    ds = load_dataset("synthetic_size_shapes", tmp_path, shots=2, seed=1)
    assert ds.num_classes == len(SIZES) * len(SHAPES) == 16
    assert sorted(ds.classnames) == sorted(f"{z} {s}" for z in SIZES for s in SHAPES)
    counts = np.bincount([r.label for r in ds.test], minlength=16)
    assert (counts == TASKS["size_shapes"].test).all()
    # the drawn size is the class's: large-class images have more foreground than small-class ones
    areas: dict[str, list[int]] = {z: [] for z in SIZES}
    for r in ds.test[::5]:
        img = np.asarray(Image.open(ds.image_root / r.path).convert("RGB"))
        areas[r.classname.split()[0]].append(int(_foreground(img).sum()))
    assert np.median(areas["large"]) > 1.8 * np.median(areas["small"])
    base = load_dataset("synthetic_size_shapes", tmp_path, shots=2, seed=1, subsample="base")
    assert {c.split()[0] for c in base.classnames} == set(SIZES)  # base mixes both sizes


def test_the_worlds_training_crops_keep_a_small_object_smaller_than_a_large_one(tmp_path):
    """The synthetic readers' crop range (50-100 % of the image) keeps a crop's label true; the
    photographs' 8-100 % would turn a "small square" into one larger than a "large square"."""
    import torch
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    ds = load_dataset("synthetic_size_shapes", tmp_path, shots=1, seed=1)
    assert ds.crop_scale == (0.5, 1.0)
    small = render(Scene("square", "red", "small", 1, "plain", "filled"), scene_rng(1, 7))
    large = render(Scene("square", "red", "large", 1, "plain", "filled"), scene_rng(1, 8))
    large_area = _foreground(np.asarray(large)).sum()

    def largest_crop_area(scale):
        torch.manual_seed(0)
        crop = RandomResizedCrop(48, scale=scale, interpolation=InterpolationMode.BICUBIC)
        return max(_foreground(np.asarray(crop(small))).sum() for _ in range(200))

    assert largest_crop_area(ds.crop_scale) < large_area
    assert largest_crop_area((0.08, 1.0)) > large_area


# ------------------------------------------------------------------------ rendering a task folder
_SMALL_TASK = Task((("circle", None), ("star", None)), ("filled",), 2, 1, 2, 5)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_ino for p in folder.rglob("*")}


def test_a_complete_task_folder_is_kept_not_replaced(tmp_path):
    """A late renderer of the same task keeps the folder another one put in place (whose files
    a reader may be reading) and leaves no temporary folder behind."""
    folder = tmp_path / "synthetic" / "small"
    generate_task(_SMALL_TASK, folder)
    first = _files(folder)
    assert "split.json" in first and len([f for f in first if f.endswith(".png")]) == 10
    generate_task(_SMALL_TASK, folder)  # e.g. a second process that finished later
    assert _files(folder) == first  # the same files (same inodes): nothing was replaced
    assert sorted(p.name for p in folder.parent.iterdir()) == ["small"]


def test_an_incomplete_task_folder_is_replaced(tmp_path):
    folder = tmp_path / "small"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "half-written.png").write_bytes(b"")
    generate_task(_SMALL_TASK, folder)
    assert (folder / "split.json").is_file() and not (folder / "images/half-written.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_two_threads_rendering_one_task_at_once_both_read_it(tmp_path, monkeypatch):
    """Two readers render the same missing task at the same time: both finish, neither removes
    the folder under the other, and both read the same complete split."""
    import threading

    from promptalign.data.readers import synthetic as reader_module

    monkeypatch.setitem(reader_module.TASKS, "shapes", _SMALL_TASK)
    barrier = threading.Barrier(2)
    render_once = reader_module.render

    def slow_render(*args, **kwargs):  # both threads are inside the rendering at once
        barrier.wait(timeout=30)
        return render_once(*args, **kwargs)

    monkeypatch.setattr(reader_module, "render", slow_render)
    results, errors = [], []

    def load():
        try:
            results.append(load_dataset("synthetic_shapes", tmp_path, cache_dir=tmp_path / "c"))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 2 and results[0].test == results[1].test and len(results[0].test) == 4
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == ["shapes"]
    for r in results[0].train + results[0].test:
        assert (results[0].image_root / r.path).is_file()


def test_a_task_is_listed_without_rendering_it(tmp_path):
    """The split listing (what sets a run's class count) is known before any image is drawn,
    and equals what the rendered task's split file says."""
    from promptalign.data.base import count_classes, get_reader

    reader = get_reader("synthetic_size_shapes")
    listed = reader.listing(tmp_path)
    assert not (tmp_path / "synthetic").exists()  # nothing rendered
    assert count_classes("synthetic_size_shapes", tmp_path, "base", reader) == 8
    assert not (tmp_path / "synthetic").exists()
    assert listed == reader.read(tmp_path)  # renders it
