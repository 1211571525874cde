"""The synthetic few-shot tasks: rendered from the synthetic world (:mod:`..world`) to PNG files
under the data root on first use, then read like any dataset (same split / few-shot / base-new
machinery):

* ``synthetic_shapes``: which shape (8 classes), any colour, filled or outline;
* ``synthetic_colour_shapes``: colour x shape (6 x 8 = 48 classes; base / new 24 / 24), with the
  class order shuffled once so base and new both mix colours and shapes;
* ``synthetic_shapes_sketch``, ``synthetic_colour_shapes_sketch``: test-only, the same classes in
  the noisy sketch style (domain shift for generalisation and cross-task transfer);
* ``synthetic_size_shapes``: fine-grained size x shape (2 x 8 = 16 classes, base / new 8 / 8), each
  class with a twin that differs in size alone ("small star" / "large star"), any colour.

A task is rendered into a temporary folder and renamed into place in one step; a complete folder
(one holding ``split.json``) is never replaced, so processes that render the same task at once
all end up reading the one that was renamed in first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...registry import DATASETS
from ..base import DatasetReader, Record, Splits, read_split_json
from ..world import COLOURS, SHAPES, SIZES, render, sample_scene, scene_rng


@dataclass(frozen=True)
class Task:
    # (shape, colour or None) or (shape, colour or None, size or None): a None attribute varies
    classes: tuple[tuple[str | None, ...], ...]
    styles: tuple[str, ...]
    train: int
    val: int
    test: int
    seed: int

    def classname(self, shape: str, colour: str | None, size: str | None = None) -> str:
        return " ".join(w for w in (size, colour, shape) if w)


def _colour_shape_classes() -> tuple[tuple[str, str], ...]:
    pairs = [(s, c) for c in COLOURS for s in SHAPES]
    order = np.random.default_rng(2024).permutation(
        len(pairs)
    )  # base / new both mix colours and shapes
    return tuple(pairs[i] for i in order)


def _size_shape_classes() -> tuple[tuple[str, None, str], ...]:
    triples = [(s, None, z) for z in SIZES for s in SHAPES]
    order = np.random.default_rng(2025).permutation(
        len(triples)
    )  # base / new both mix sizes and shapes
    return tuple(triples[i] for i in order)


TASKS = {
    "shapes": Task(tuple((s, None) for s in SHAPES), ("filled", "outline"), 24, 4, 25, 11),
    "colour_shapes": Task(_colour_shape_classes(), ("filled", "outline"), 20, 4, 12, 12),
    "shapes_sketch": Task(tuple((s, None) for s in SHAPES), ("sketch",), 0, 0, 25, 13),
    "colour_shapes_sketch": Task(_colour_shape_classes(), ("sketch",), 0, 0, 12, 14),
    # fine-grained: each class has a twin that differs only in size ("small star" / "large star")
    "size_shapes": Task(_size_shape_classes(), ("filled", "outline"), 20, 4, 20, 15),
}


def _images(task: Task) -> Iterator[tuple[str, Record, tuple[str, str | None, str | None]]]:
    """``(split, record, (shape, colour, size))`` of every image of ``task``, in rendering order
    (the i-th image is drawn from the scene seed ``(task.seed, i)``)."""
    for label, (shape, colour, *rest) in enumerate(task.classes):
        size = rest[0] if rest else None
        name = task.classname(shape, colour, size)
        for part in ("train", "val", "test"):
            for i in range(getattr(task, part)):
                record = Record(f"{label:02d}/{part}_{i:03d}.png", label, name)
                yield part, record, (shape, colour, size)


SPLIT_FILE = "split.json"  # written last: a task folder holding it is complete


def generate_task(task: Task, folder: Path) -> None:
    """Render the task's images and split file into ``folder``, atomically: into a temporary
    folder beside it, renamed into place in one step. A complete folder found there (e.g. one
    another process renamed in meanwhile) is kept and this copy dropped; an incomplete one (no
    ``split.json``) is moved aside and removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        for index, (part, record, (shape, colour, size)) in enumerate(_images(task)):
            rng = scene_rng(task.seed, index)
            scene = sample_scene(
                rng,
                shapes=(shape,),
                colours=(colour,) if colour else tuple(COLOURS),
                styles=task.styles,
                sizes=(size,) if size else tuple(SIZES),
            )
            (tmp / "images" / record.path).parent.mkdir(parents=True, exist_ok=True)
            render(scene, rng).save(tmp / "images" / record.path)
            split[part].append([record.path, record.label, record.classname])
        (tmp / SPLIT_FILE).write_text(json.dumps(split))
        _rename_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a rename


def _rename_into_place(tmp: Path, folder: Path, tries: int = 5) -> None:
    """``tmp`` renamed to ``folder`` unless a complete folder is there already."""
    for _ in range(tries):
        if (folder / SPLIT_FILE).is_file():
            return  # complete: keep it (a reader may be reading it)
        if folder.exists() or folder.is_symlink():  # an incomplete leftover: set it aside
            aside = folder.parent / f".{folder.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, aside)
            except FileNotFoundError:
                continue  # another process moved it first
            shutil.rmtree(aside, ignore_errors=True)
            continue
        try:
            os.rename(tmp, folder)  # fails when another process renamed its copy in first
            return
        except OSError:
            continue
    raise OSError(f"could not put the rendered task into {folder}; remove it and try again")


class SyntheticReader(DatasetReader):
    """Reads (and on first use renders) one synthetic task under ``<root>/synthetic/<task>``."""

    task: str = ""
    image_dir = "images"
    generates = True
    # The objects cover 5-18 % of a 48 px image, so CoOp/Dassl's 8-100 % training crops often
    # cut them out or enlarge a "small" one past a "large" one: zero-shot accuracy on the base
    # training images falls from 62.5 % (no crop) to 46.8 % with 8-100 % crops and 56.0 % with
    # 50-100 % (tiny-shapes-v3; benchmarks/crop_label_noise.py). Crops keeping half the image
    # or more keep the object, and the label describes it.
    crop_scale = (0.5, 1.0)

    @property
    def folder(self) -> str:  # type: ignore[override]
        return f"synthetic/{self.task}"

    def check_root(self, root: Path) -> Path:
        d = self.dataset_dir(root)
        if not (d / SPLIT_FILE).is_file():
            generate_task(TASKS[self.task], d)
        return d

    def read(self, root: Path) -> Splits:
        d = self.check_root(root)
        return read_split_json(d / SPLIT_FILE, self.registered_name, d / self.image_dir)

    def listing(self, root: Path) -> Splits:
        """What :meth:`read` gives, from the task alone (nothing rendered)."""
        task = TASKS[self.task]
        records: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
        for part, record, _ in _images(task):
            records[part].append(record)
        names = [task.classname(shape, colour, *rest) for shape, colour, *rest in task.classes]
        return Splits(records["train"], records["val"], records["test"], names)


def _register(name: str, task: str, test_only: bool) -> None:
    # prompts in the captions' own words: "a red circle", not "a photo of a red circle."
    cls = type(
        f"Synthetic_{task}",
        (SyntheticReader,),
        {"task": task, "test_only": test_only, "template": "a {}"},
    )
    DATASETS.register(name)(cls)


_register("synthetic_shapes", "shapes", False)
_register("synthetic_colour_shapes", "colour_shapes", False)
_register("synthetic_shapes_sketch", "shapes_sketch", True)
_register("synthetic_colour_shapes_sketch", "colour_shapes_sketch", True)
_register("synthetic_size_shapes", "size_shapes", False)
