"""Captions of the synthetic world: the (image, caption) stream the shipped tiny CLIP was
pretrained on (``scripts/pretrain_tiny_clip.py``).

:func:`caption` gives the words that describe exactly what :func:`~.world.render` draws ("two
small red triangles on a striped background"; "a sketch of ..."). ``caption_pairs(...,
mode="rich")`` gives a richer stream for stronger models: varied word order, synonyms, digits,
optional attributes, and in part of the scenes a second object in a spatial relation that the
renderer draws ("two red stars above a blue circle"); the default ``mode="plain"`` stream is
unchanged.
"""

from __future__ import annotations

import numpy as np

from .world import (
    IMAGE_SIZE,
    Scene,
    render,
    sample_scene,
    sample_scene_rich,
    scene_rng,
)

COUNTS = {1: "one", 2: "two", 3: "three"}
_PLURAL = {"cross": "crosses"}


def caption(scene: Scene) -> str:
    """Words that describe exactly what :func:`render` draws."""
    noun = scene.shape if scene.count == 1 else _PLURAL.get(scene.shape, scene.shape + "s")
    det = "a" if scene.count == 1 else COUNTS[scene.count]
    body = f"{det} {scene.size} {scene.colour} {noun} on a {scene.background} background"
    if scene.style == "outline":
        return f"an outline of {body}"
    if scene.style == "sketch":
        return f"a sketch of {body}"
    return body


# ----------------------------------------------------------------- the rich caption distribution
# Alt-text is not a fixed template: the same scene is described with varying word order, synonyms,
# number words or digits, omitted attributes, and other objects beside the one of interest. The
# "rich" mode samples such captions (and, in part of the scenes, a second object in a spatial
# relation) so that a prompt like "a red circle" is a plausible but imperfect query: zero-shot
# transfer works, and learned context has something to add. Every word stays true to the image:
# colour, shape, count and (when drawn) the second object and relation are always named; size,
# background and the filled style may be left out; outline and sketch styles are always named.
COLOUR_WORDS = {
    "red": ("red", "red", "red", "scarlet"),
    "green": ("green", "green", "green", "emerald"),
    "blue": ("blue", "blue", "blue", "navy"),
    "yellow": ("yellow", "yellow", "yellow", "golden"),
    "purple": ("purple", "purple", "purple", "violet"),
    "orange": ("orange", "orange", "orange", "amber"),
}
SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "cross", "plus sign"),
    "diamond": ("diamond", "diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "heart": ("heart",),
}
SIZE_WORDS = {
    "small": ("small", "small", "tiny", "little"),
    "large": ("large", "large", "big", "huge"),
}
COUNT_WORDS = {
    1: ("a", "a", "one", "a single"),
    2: ("two", "two", "2", "a pair of"),
    3: ("three", "three", "3"),
}
BACKGROUND_WORDS = {
    "plain": ("plain", "plain", "blank"),
    "striped": ("striped", "striped", "stripy"),
    "dotted": ("dotted", "dotted", "polka-dot"),
    "checkered": ("checkered", "checkered", "checkerboard"),
}
RELATION_WORDS = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "next to", "beside"),
    "right of": ("to the right of", "next to", "beside"),
}
CAPTION_MODES = ("plain", "rich")


def _plural(word: str) -> str:
    if word.endswith(("ss", "x", "s")):
        return word + "es"
    if word == "plus sign":
        return "plus signs"
    return word + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_rich(scene: Scene, rng: np.random.Generator) -> str:
    """A caption drawn from the rich distribution for ``scene`` (``rng`` picks the wording only)."""

    def pick(options):
        return str(options[int(rng.integers(len(options)))])

    colour, noun, size = (
        pick(COLOUR_WORDS[scene.colour]),
        pick(SHAPE_WORDS[scene.shape]),
        pick(SIZE_WORDS[scene.size]),
    )
    det = pick(COUNT_WORDS[scene.count])
    plural = scene.count > 1
    if plural:
        noun = _plural(noun)
    with_size = rng.uniform() < 0.7
    solid = scene.style == "filled" and rng.uniform() < 0.2
    adjectives = [size, colour] if with_size else [colour]
    order = int(rng.integers(4))
    if order == 1 and with_size:  # "a red small circle": attribute order varies
        adjectives = adjectives[::-1]
    if solid:
        adjectives.insert(0, "solid")
    if order == 2:  # "a circle that is small and red" / "two circles in red"
        verb = "that are" if plural else "that is"
        tail = (
            f"{verb} {' and '.join(adjectives)}"
            if len(adjectives) > 1 or rng.uniform() < 0.5
            else f"in {colour}"
        )
        phrase = f"{det} {noun} {tail}"
    else:
        phrase = f"{det} {' '.join(adjectives)} {noun}"
    if det == "a":
        phrase = _article(phrase.split(" ", 1)[1]) + " " + phrase.split(" ", 1)[1]
    if scene.extra is not None:
        shape2, colour2, relation = scene.extra
        other = pick(SHAPE_WORDS[shape2])
        other = f"{pick(COLOUR_WORDS[colour2])} {other}"
        phrase = f"{phrase} {pick(RELATION_WORDS[relation])} {_article(other)} {other}"
    if rng.uniform() < 0.65:
        bg = pick(BACKGROUND_WORDS[scene.background])
        phrase = (
            f"{phrase} {pick(('on', 'on', 'against'))} {_article(bg)} {bg} "
            f"{pick(('background', 'background', 'backdrop'))}"
        )
    if scene.style == "outline":
        phrase = pick(
            ("an outline of {}", "the outline of {}", "{} drawn in outline", "a line drawing of {}")
        ).format(phrase)
    elif scene.style == "sketch":
        phrase = pick(
            ("a sketch of {}", "a rough sketch of {}", "a noisy drawing of {}", "a sketch of {}")
        ).format(phrase)
    elif rng.uniform() < 0.2:
        phrase = pick(("a picture of {}", "an image of {}", "there is {}")).format(phrase)
    return phrase


def caption_pairs(
    seed: int, start: int, n: int, size: int = IMAGE_SIZE, *, mode: str = "plain"
) -> tuple[np.ndarray, list[str]]:
    """``n`` (image, caption) pairs of the pretraining stream: uint8 ``[n, size, size, 3]``.

    ``mode="plain"`` (the shipped model's stream): one object kind per scene, one fixed caption
    template. ``mode="rich"``: :func:`sample_scene_rich` scenes (a second object in a relation in
    part of them) with :func:`caption_rich` captions, whose wording comes from its own generator,
    so pair ``i`` is a function of ``(seed, start + i)`` alone in both modes.
    """
    if mode not in CAPTION_MODES:
        raise ValueError(f"unknown caption mode {mode!r}; expected one of {CAPTION_MODES}")
    images, captions = np.empty((n, size, size, 3), dtype=np.uint8), []
    for i in range(n):
        rng = scene_rng(seed, start + i)
        if mode == "plain":
            scene = sample_scene(rng)
            images[i] = np.asarray(render(scene, rng, size))
            captions.append(caption(scene))
        else:
            scene = sample_scene_rich(rng)
            images[i] = np.asarray(render(scene, rng, size))
            captions.append(caption_rich(scene, np.random.default_rng([seed, start + i, 1])))
    return images, captions
