"""Datasets: readers parse a layout into records; this module owns everything shared.

A reader (one file per dataset under ``readers/``) only turns its annotation format into
``(relative path, label, classname)`` records for train / val / test and registers itself with
``@DATASETS.register(name)``. Few-shot sampling with CoOp's semantics (so a seed selects the same
images as CoOp), the portable cache of sampled splits, base/new subsampling and the load-time
summary live here, once.

The few-shot cache is keyed on everything that determines the sample (the train/val listings with
labels, the class list, the split files' paths and content hashes, shots and seed), so an added
class folder or an edited split file never reuses an old sample; it lives under the user's cache
folder (:func:`default_cache_dir`), not in the data folder, unless ``cache_dir`` says otherwise.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

from ..io import EncodingError, atomic_write_text, read_text
from ..registry import DATASETS

log = logging.getLogger(__name__)

Subsample = Literal["all", "base", "new"]
SPLITS = ("train", "val", "test")
# RandomResizedCrop's area range in CoOp/Dassl's training pipeline (torchvision's default)
DEFAULT_CROP_SCALE = (0.08, 1.0)
# file name suffixes taken for images where a folder is listed
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class DatasetError(ValueError):
    """Bad dataset input: the message names the dataset, the file and the entry."""


@dataclass(frozen=True)
class Record:
    """One image: ``path`` relative to the dataset's image folder, 0-based ``label``, class name."""

    path: str
    label: int
    classname: str


@dataclass
class Splits:
    """Records of the three splits plus the class names indexed by label."""

    train: list[Record]
    val: list[Record]
    test: list[Record]
    classnames: list[str]

    def split(self, name: str) -> list[Record]:
        return getattr(self, name)


@dataclass
class Dataset:
    """A loaded dataset: records, class names for prompts, where the images are, and how it was
    sampled. ``classnames`` are display names ("_" -> " "), indexed by the (relabelled) label."""

    name: str
    image_root: Path
    train: list[Record]
    val: list[Record]
    test: list[Record]
    classnames: list[str]
    template: str
    shots: int | None = None
    seed: int | None = None
    subsample: Subsample = "all"
    label_map: dict[int, int] = field(default_factory=dict)  # original label -> label here
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE  # the reader's training crop

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def summary(self) -> str:
        """A one-table summary: classes / train / val / test / shots."""
        shots = "all" if self.shots is None else str(self.shots)
        head = (
            f"{'dataset':<16}{'subset':<8}{'classes':>8}{'train':>9}{'val':>8}{'test':>8}"
            f"{'shots':>7}"
        )
        row = (
            f"{self.name:<16}{self.subsample:<8}{self.num_classes:>8}{len(self.train):>9}"
            f"{len(self.val):>8}{len(self.test):>8}{shots:>7}"
        )
        return f"{head}\n{row}"

    def sampling_info(self) -> dict:
        """What identifies the sample (stored with checkpoints)."""
        return {
            "dataset": self.name,
            "shots": self.shots,
            "seed": self.seed,
            "subsample": self.subsample,
            "num_classes": self.num_classes,
        }


def display_name(name: str) -> str:
    """Class name as used in prompts: "_" -> " " (applied everywhere, after reader cleanups)."""
    return name.replace("_", " ")


class DatasetReader(abc.ABC):
    """Base of the readers. Subclasses set ``folder``, ``image_dir``, ``template`` and implement
    :meth:`read`; ``test_only`` marks evaluation-only datasets; ``crop_scale`` is the area range
    of the training RandomResizedCrop (CoOp/Dassl's for real photographs)."""

    folder: ClassVar[str] = ""
    image_dir: ClassVar[str] = ""
    template: ClassVar[str] = "a photo of a {}."
    crop_scale: ClassVar[tuple[float, float]] = DEFAULT_CROP_SCALE
    test_only: ClassVar[bool] = False
    generates: ClassVar[bool] = False  # renders its own images under the root (synthetic world)
    registered_name: ClassVar[str] = ""

    def dataset_dir(self, root: Path) -> Path:
        return root / self.folder

    def image_root(self, root: Path) -> Path:
        return self.dataset_dir(root) / self.image_dir

    @abc.abstractmethod
    def read(self, root: Path) -> Splits:
        """Parse the layout under ``root`` (the data root) into splits."""

    def split_files(self, root: Path) -> list[Path]:
        """Annotation files the splits are read from (part of the few-shot cache key)."""
        return []

    def listing(self, root: Path) -> Splits:
        """The records :meth:`read` gives, for a reader that ``generates`` its images: listed
        without generating them (a reader that reads files has no other way: :meth:`read`)."""
        return self.read(root)

    def check_root(self, root: Path) -> Path:
        d = self.dataset_dir(root)
        if not d.is_dir():
            raise DatasetError(
                f"{self.registered_name}: dataset folder {d} does not exist; prepare it under the "
                f"data root as {self.folder}/ (CoOp's DATASETS.md layout) or pass the right "
                "--data-root"
            )
        return d


class SplitJsonReader(DatasetReader):
    """Readers whose splits come from a CoOp ``split_zhou_*.json`` in the dataset folder."""

    split_file: ClassVar[str] = ""
    rename: ClassVar[dict[str, str]] = {}

    def split_files(self, root: Path) -> list[Path]:
        return [self.dataset_dir(root) / self.split_file]

    def read(self, root: Path) -> Splits:
        return read_split_json(
            self.dataset_dir(root) / self.split_file,
            self.registered_name,
            self.image_root(root),
            self.rename,
        )


# --------------------------------------------------------------------------- shared parsing
def read_split_json(
    path: Path, dataset: str, image_root: Path, rename: dict[str, str] | None = None
) -> Splits:
    """Read a CoOp ``split_zhou_*.json``:
    {"train"|"val"|"test": [[relpath, label, classname], ...]}."""
    if not path.is_file():
        raise DatasetError(f"{dataset}: split file {path} does not exist")
    text = read_dataset_text(path, dataset)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DatasetError(f"{dataset}: split file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(s in data for s in SPLITS):
        raise DatasetError(
            f"{dataset}: split file {path} must be an object with 'train', 'val' and 'test' lists"
        )
    names: dict[int, str] = {}
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        items = data[split]
        if not isinstance(items, list):
            raise DatasetError(f"{dataset}: {path}: '{split}' is not a list")
        recs = []
        for i, item in enumerate(items):
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 3
                or not isinstance(item[0], str)
                or not isinstance(item[1], int)
                or isinstance(item[1], bool)
                or not isinstance(item[2], str)
            ):
                raise DatasetError(
                    f"{dataset}: {path}: {split}[{i}] = {item!r} is not "
                    "[relpath, int label, classname]"
                )
            rel, label, cname = item
            if label < 0:
                raise DatasetError(f"{dataset}: {path}: {split}[{i}] has negative label {label}")
            check_inside(image_root, rel, dataset, f"{path}: {split}[{i}]")
            cname = (rename or {}).get(cname, cname)
            if names.setdefault(label, cname) != cname:
                raise DatasetError(
                    f"{dataset}: {path}: {split}[{i}] labels {label} as {cname!r}, "
                    f"earlier entries as {names[label]!r}"
                )
            recs.append(Record(rel, label, cname))
        out[split] = recs
    n = max(names) + 1 if names else 0
    missing = sorted(set(range(n)) - set(names))
    if missing:
        raise DatasetError(
            f"{dataset}: {path}: labels {missing[:10]} never occur; labels must be 0..{n - 1}"
        )
    return Splits(out["train"], out["val"], out["test"], [names[i] for i in range(n)])


def read_dataset_text(path: Path, dataset: str) -> str:
    """A dataset's text file (list, split or class names): UTF-8 with an optional byte-order
    mark; another encoding is a :class:`DatasetError` naming the file, the byte and the fix."""
    try:
        return read_text(path)
    except EncodingError as e:
        raise DatasetError(f"{dataset}: {e}") from None


def check_inside(image_root: Path, rel: str, dataset: str, where: str) -> None:
    """A relative path must stay inside the dataset's image folder."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DatasetError(
            f"{dataset}: {where}: path {rel!r} escapes the dataset folder {image_root}"
        )


def list_images(folder: Path) -> list[str]:
    """Sorted image file names in a folder (hidden files skipped)."""
    return sorted(
        f.name
        for f in folder.iterdir()
        if not f.name.startswith(".") and f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    )


def list_images_below(folder: Path) -> list[str]:
    """Image files anywhere below ``folder`` as sorted relative POSIX paths (hidden files and
    folders skipped, symlinked folders not entered); a flat folder gives :func:`list_images`."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(here).relative_to(folder)
        for f in files:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                if (Path(here) / f).is_file():
                    found.append((rel / f).as_posix())
    return sorted(found)


def list_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_classnames_txt(path: Path, dataset: str) -> dict[str, str]:
    """``<wnid> <name with spaces>`` lines -> {wnid: name}, in file order."""
    if not path.is_file():
        raise DatasetError(
            f"{dataset}: class-name file {path} does not exist (lines '<wnid> <name>')"
        )
    out: dict[str, str] = {}
    for i, line in enumerate(read_dataset_text(path, dataset).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2:
            raise DatasetError(f"{dataset}: {path}:{i}: expected '<wnid> <name>', got {line!r}")
        out[parts[0]] = parts[1].strip()
    return out


def folder_records(
    image_root: Path, sub: str, folders: Sequence[str], names: Sequence[str]
) -> list[Record]:
    """Records of ``image_root/sub/<folder>/*`` with label = index in ``folders``."""
    recs = []
    for label, (folder, name) in enumerate(zip(folders, names)):
        d = image_root / sub / folder if sub else image_root / folder
        for f in list_images(d):
            recs.append(Record(f"{sub}/{folder}/{f}" if sub else f"{folder}/{f}", label, name))
    return recs


def camel_to_words(name: str) -> str:
    """UCF101 cleanup: ApplyEyeMakeup -> Apply_Eye_Makeup."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*|[^A-Z]+", name))


# --------------------------------------------------------------------------- few-shot sampling
def sample_few_shot(records: Sequence[Record], k: int, rng: random.Random) -> list[Record]:
    """CoOp's rule: group by label in first-seen order, ``rng.sample(items, k)`` per label (all
    items when fewer than k)."""
    groups: dict[int, list[Record]] = {}
    for r in records:
        groups.setdefault(r.label, []).append(r)
    out: list[Record] = []
    for items in groups.values():
        out.extend(rng.sample(items, k) if len(items) >= k else items)
    return out


def few_shot_splits(splits: Splits, shots: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Train with ``shots`` per class and val with min(shots, 4), from one RNG seeded with ``seed``
    (the same stream as CoOp's seeded global ``random``: train first, then val)."""
    rng = random.Random(seed)
    train = sample_few_shot(splits.train, shots, rng)
    val = sample_few_shot(splits.val, min(shots, 4), rng)
    return train, val


def _records_to_json(recs: list[Record]) -> list[list]:
    return [[r.path, r.label, r.classname] for r in recs]


def base_new_labels(labels: set[int], subsample: Subsample) -> list[int]:
    """sorted labels; base = first ceil(n/2), new = the rest; "all" = every label."""
    ordered = sorted(labels)
    m = math.ceil(len(ordered) / 2)
    return {"all": ordered, "base": ordered[:m], "new": ordered[m:]}[subsample]


def _relabel(recs: list[Record], mapping: dict[int, int]) -> list[Record]:
    return [replace(r, label=mapping[r.label]) for r in recs if r.label in mapping]


def list_datasets() -> list[str]:
    """Names of the registered datasets (the registry imports every reader on first use)."""
    return DATASETS.names()


def get_reader(name: str) -> DatasetReader:
    """A new instance of the registered reader ``name``."""
    return DATASETS.get(name)()


def load_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    shots: int | None = None,
    seed: int = 1,
    subsample: Subsample = "all",
    cache_dir: str | os.PathLike | None = None,
    reader: DatasetReader | None = None,
) -> Dataset:
    """Read a dataset and apply few-shot sampling and base/new subsampling.

    Args:
        name: a registered dataset (see :func:`list_datasets`).
        root: the data root holding the dataset folders (CoOp layout).
        shots: labelled images per class for training (None = all).
        seed: sampling seed (CoOp seeds 1, 2, 3 select the same images as CoOp).
        subsample: "all", "base" (first ceil(n/2) classes) or "new" (the rest), relabelled from 0.
        cache_dir: where sampled splits are cached (JSON, relative paths, one file per key of
            :func:`few_shot_key`); default :func:`default_cache_dir` (``$PROMPTALIGN_CACHE_DIR``,
            ``$XDG_CACHE_HOME/promptalign`` or ``~/.cache/promptalign``), never the data folder
            unless given.
        reader: a reader instance to use instead of the registered one (custom datasets).
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample {subsample!r} unknown; use 'all', 'base' or 'new'")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be >= 1 (or None for all images), got {shots}")
    root = Path(root).expanduser()
    reader = reader or get_reader(name)
    splits = read_splits(name, root, reader)
    image_root = reader.image_root(root)
    train, val = splits.train, splits.val
    if shots is not None and not reader.test_only:
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "fewshot"
        train, val = _cached_few_shot(
            name, splits, shots, seed, cache, image_root, reader.split_files(root)
        )
        _note_short_classes(name, train, shots)
    keep = kept_labels(splits, subsample)
    mapping = {old: new for new, old in enumerate(keep)}
    ds = Dataset(
        name=name,
        image_root=image_root,
        train=_relabel(train, mapping),
        val=_relabel(val, mapping),
        test=_relabel(splits.test, mapping),
        classnames=[display_name(splits.classnames[old]) for old in keep],
        template=reader.template,
        crop_scale=reader.crop_scale,
        shots=shots,
        seed=seed,
        subsample=subsample,
        label_map=mapping,
    )
    log.info("loaded dataset\n%s", ds.summary())
    return ds


def read_splits(name: str, root: Path, reader: DatasetReader) -> Splits:
    """The reader's split listing of the dataset under ``root``, its labels checked (no image is
    opened; a generated dataset is rendered on first use)."""
    if not root.is_dir() and not reader.generates:
        raise DatasetError(f"{name}: data root {root} does not exist")
    reader.check_root(root)
    splits = reader.read(root)
    _check_labels(splits, name)
    return splits


def kept_labels(splits: Splits, subsample: Subsample) -> list[int]:
    """The labels of the classes a run on ``subsample`` has, in order: of every class of every
    split (a class with test images only is kept: training on it is refused at train time,
    evaluating it is not)."""
    return base_new_labels({r.label for split in SPLITS for r in splits.split(split)}, subsample)


def count_classes(
    name: str,
    root: str | os.PathLike,
    subsample: Subsample = "all",
    reader: DatasetReader | None = None,
) -> int:
    """How many classes a run on ``subsample`` of dataset ``name`` under ``root`` has, from the
    reader's split listing alone (no image is opened): what :func:`load_dataset` would give as
    ``num_classes``."""
    reader = reader or get_reader(name)
    root = Path(root).expanduser()
    splits = reader.listing(root) if reader.generates else read_splits(name, root, reader)
    return len(kept_labels(splits, subsample))


def _note_short_classes(name: str, train: Sequence[Record], shots: int) -> None:
    """Log how many training images a few-shot sample really holds when some classes have fewer
    than ``shots`` (e.g. ``--shots 100000``: every image of every class)."""
    per_class: dict[int, int] = {}
    for r in train:
        per_class[r.label] = per_class.get(r.label, 0) + 1
    short = {k: n for k, n in per_class.items() if n < shots}
    if short:
        log.warning(
            "%s: %d shots per class asked, but %d of %d classes have fewer training images "
            "(fewest: %d); training uses %d images",
            name,
            shots,
            len(short),
            len(per_class),
            min(short.values()),
            len(train),
        )


def _check_labels(splits: Splits, name: str) -> None:
    n = len(splits.classnames)
    for split in SPLITS:
        for r in splits.split(split):
            if not 0 <= r.label < n:
                raise DatasetError(
                    f"{name}: {split} entry {r.path!r} has label {r.label} outside 0..{n - 1}"
                )


def default_cache_dir() -> Path:
    """Where few-shot samples are cached unless ``cache_dir`` is given: ``$PROMPTALIGN_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/promptalign``, else ``~/.cache/promptalign`` (never the data folder)."""
    env = os.environ.get("PROMPTALIGN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "promptalign"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def few_shot_key(
    name: str, splits: Splits, shots: int, seed: int, split_files: Sequence[Path] = ()
) -> dict:
    """Everything that determines a few-shot sample: the dataset's train and val listings (paths
    and labels), its class list, the split files (path and content hash), shots and seed."""

    def listing(recs: list[Record]) -> str:
        return hashlib.sha256(json.dumps(_records_to_json(recs)).encode()).hexdigest()

    return {
        "version": 2,
        "dataset": name,
        "shots": shots,
        "seed": seed,
        "classnames": list(splits.classnames),
        "train_listing": listing(splits.train),
        "val_listing": listing(splits.val),
        "split_files": [
            {"path": str(Path(p).resolve()), "sha256": _file_sha256(Path(p))}
            for p in split_files
            if Path(p).is_file()
        ],
    }


def _cached_few_shot(
    name, splits, shots, seed, cache_dir: Path, image_root: Path, split_files: Sequence[Path] = ()
):
    """The few-shot sample from the cache when its key matches exactly, else sampled afresh and
    cached. A cache entry is named by the hash of its key, so a changed dataset, class list or
    split file never finds a stale entry; an unreadable entry is only a cache: it is rebuilt with a
    warning naming the file."""
    key = few_shot_key(name, splits, shots, seed, split_files)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "dataset"
    path = cache_dir / safe / f"shot_{shots}-seed_{seed}-{digest}.json"
    if path.is_file():
        cached = None
        try:
            data = json.loads(read_text(path))
            if isinstance(data, dict) and data.get("key") == key:
                cached = read_split_json(path, name, image_root)
            else:
                log.warning(
                    "%s: few-shot cache %s does not match this dataset; resampling", name, path
                )
        except (json.JSONDecodeError, EncodingError, OSError, DatasetError) as e:
            log.warning(
                "%s: ignoring unreadable few-shot cache %s (%s); resampling",
                name,
                path,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
        if cached is not None:
            log.info("%s: few-shot split from cache %s", name, path)
            return cached.train, cached.val
    train, val = few_shot_splits(splits, shots, seed)
    payload = {
        "train": _records_to_json(train),
        "val": _records_to_json(val),
        "test": [],
        "shots": shots,
        "seed": seed,
        "key": key,
    }
    try:
        atomic_write_text(path, json.dumps(payload))
    except OSError as e:  # an unwritable cache folder must not stop the run
        log.warning("%s: could not cache the few-shot split at %s (%s)", name, path, e)
    else:
        log.info("%s: few-shot split cached at %s", name, path)
    return train, val
