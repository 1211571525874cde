"""Custom datasets without editing the library: an ImageFolder tree or a CSV of
``path,label[,classname]``, optionally with a split file in CoOp's JSON format.

* ImageFolder with ``train/`` (and optionally ``val/``, ``test/``) subfolders of class folders:
  the subfolders are the splits; the classes are the sorted union of the class folders of every
  split (a class with no training images is kept for evaluation; training refuses it, naming it).
  Images in subfolders of a class folder belong to that class; images directly in a split folder
  (outside any class folder) are ignored with a warning naming the folder.
* ImageFolder of class folders only: every image is a test image (an evaluation-only dataset).
* CSV (UTF-8, an optional byte-order mark; paths relative to the CSV's folder; an optional header
  row): every row is a test image.
* With ``split_file`` (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``, paths
  relative to the ImageFolder root or the CSV's folder) the splits come from that file; for a CSV
  every path in the split file must be listed in the CSV with the same label.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .base import (
    Dataset,
    DatasetError,
    DatasetReader,
    Record,
    Splits,
    Subsample,
    check_inside,
    get_reader,
    list_datasets,
    list_dirs,
    list_images,
    list_images_below,
    load_dataset,
    read_dataset_text,
    read_split_json,
)

log = logging.getLogger(__name__)


class CustomReader(DatasetReader):
    """Reader for a user's own ImageFolder tree or CSV (not registered: built per call)."""

    def __init__(
        self, source: Path, split_file: Path | None = None, template: str = "a photo of a {}."
    ):
        self.source = source
        self.split_file = split_file
        self.template = template
        self.registered_name = source.stem
        self.is_csv = source.suffix.lower() == ".csv"
        self.test_only = split_file is None and not (
            not self.is_csv and (source / "train").is_dir()
        )

    def dataset_dir(self, root: Path) -> Path:
        return self.source.parent if self.is_csv else self.source

    def split_files(self, root: Path) -> list[Path]:
        return [self.split_file] if self.split_file is not None else []

    def image_root(self, root: Path) -> Path:
        return self.dataset_dir(root)

    def check_root(self, root: Path) -> Path:
        if not self.source.exists():
            raise DatasetError(f"custom dataset: {self.source} does not exist")
        return self.dataset_dir(root)

    def read(self, root: Path) -> Splits:
        name, base = self.registered_name, self.image_root(root)
        if self.is_csv:
            rows = self._read_csv()
            if self.split_file is None:
                return Splits([], [], rows, _names(rows, str(self.source)))
            splits = read_split_json(self.split_file, name, base)
            listed = {r.path: r.label for r in rows}
            for split in ("train", "val", "test"):
                for r in splits.split(split):
                    if listed.get(r.path, r.label) != r.label or r.path not in listed:
                        raise DatasetError(
                            f"{name}: {self.split_file}: {split} entry {r.path!r} "
                            f"(label {r.label}) is not listed in {self.source} with that label"
                        )
            return splits
        if self.split_file is not None:
            return read_split_json(self.split_file, name, base)
        if (base / "train").is_dir():
            present = [s for s in ("train", "val", "test") if (base / s).is_dir()]
            classes = sorted({c for s in present for c in list_dirs(base / s)})
            out = {s: [] for s in ("train", "val", "test")}
            for s in present:
                _warn_loose_images(base / s, name)
                found = set(list_dirs(base / s))
                out[s] = [
                    Record(f"{s}/{c}/{f}", label, c)
                    for label, c in enumerate(classes)
                    if c in found
                    for f in list_images_below(base / s / c)
                ]
            return Splits(out["train"], out["val"], out["test"], classes)
        classes = list_dirs(base)
        if not classes:
            raise DatasetError(
                f"{name}: {base} holds no class folders (ImageFolder layout: <class>/<image>)"
            )
        _warn_loose_images(base, name)
        test = [
            Record(f"{c}/{f}", label, c)
            for label, c in enumerate(classes)
            for f in list_images_below(base / c)
        ]
        return Splits([], [], test, classes)

    def _read_csv(self) -> list[Record]:
        recs: list[Record] = []
        where = f"{self.registered_name}: {self.source}"
        first_row: dict[str, tuple[int, int]] = {}  # path -> (row, label)
        rows: list[int] = []
        text = read_dataset_text(self.source, self.registered_name)
        for i, row in _csv_rows(text, where):
            if not row or not "".join(row).strip():
                continue
            if "\x00" in "".join(row):
                raise DatasetError(f"{where}:{i}: the row holds a NUL byte; remove it")
            if i == 1 and len(row) >= 2 and _label(row[1]) is None:
                continue  # header
            label = _label(row[1]) if len(row) in (2, 3) else None
            if label is None:
                raise DatasetError(
                    f"{where}:{i}: expected 'path,label[,classname]' with an integer label, "
                    f"got {_cut(repr(row))}"
                )
            path = row[0].strip()
            if label < 0:
                raise DatasetError(f"{where}:{i}: negative label {label}; labels are 0-based")
            check_inside(
                self.image_root(self.source), path, self.registered_name, f"{self.source}:{i}"
            )
            if path in first_row:
                j, other = first_row[path]
                what = f"with conflicting labels {other} and {label}" if other != label else "twice"
                raise DatasetError(
                    f"{where}: {_cut(repr(path))} is listed {what} (rows {j} and {i}); "
                    "list every image once"
                )
            first_row[path] = (i, label)
            rows.append(i)
            recs.append(Record(path, label, row[2].strip() if len(row) == 3 else str(label)))
        if not recs:
            raise DatasetError(f"{where} lists no images")
        _names(recs, where, rows)
        return recs


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


_INT = re.compile(r"\s*-?[0-9]{1,18}\s*")


def _label(text: str) -> int | None:
    """An integer label as written in a CSV cell (ASCII digits), else None."""
    return int(text) if _INT.fullmatch(text) else None


def _csv_rows(text: str, where: str) -> Iterator[tuple[int, list[str]]]:
    """(row number, cells) of a CSV text; a malformed file (e.g. a NUL byte) names the row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    i = 0
    while True:
        i += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DatasetError(f"{where}:{i}: not a readable CSV row ({e})") from None
        yield i, row


def _warn_loose_images(folder: Path, name: str) -> None:
    """Images directly in a split folder belong to no class: say so rather than drop them."""
    loose = list_images(folder)
    if loose:
        log.warning(
            "%s: %d image(s) directly in %s (e.g. %s) are in no class folder and are not used; "
            "move them into %s/<class>/",
            name,
            len(loose),
            folder,
            loose[0],
            folder,
        )


def _names(recs: list[Record], where: str, rows: list[int] | None = None) -> list[str]:
    """Class names indexed by label; labels must be 0..n-1 with every label used. ``rows`` (the
    CSV row of each record) lets errors name the offending row."""
    rows = rows or [0] * len(recs)
    names: dict[int, str] = {}
    first: dict[int, int] = {}
    for r, row in zip(recs, rows):
        if names.setdefault(r.label, r.classname) != r.classname:
            at = f":{row}" if row else ""
            raise DatasetError(
                f"{where}{at}: label {r.label} is named {r.classname!r} here and "
                f"{names[r.label]!r} in row {first[r.label]}"
            )
        first.setdefault(r.label, row)
    n = max(names) + 1
    missing = sorted(set(range(n)) - set(names))
    if missing:
        top = max(names)
        at = f":{first[top]}" if first[top] else ""
        raise DatasetError(
            f"{where}{at}: label {top} is out of range: only {len(names)} distinct labels are used "
            f"and labels {missing[:10]} never occur; labels must be 0..{len(names) - 1} "
            "(one per class)"
        )
    return [names[i] for i in range(n)]


def load_custom_dataset(
    source: str | os.PathLike,
    *,
    split_file: str | os.PathLike | None = None,
    template: str = "a photo of a {}.",
    shots: int | None = None,
    seed: int = 1,
    subsample: Subsample = "all",
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load an ImageFolder tree or CSV as a dataset (see the module docstring)."""
    source = Path(source).expanduser().resolve()
    reader = custom_reader(source, split_file, template)
    return load_dataset(
        reader.registered_name,
        reader.dataset_dir(source),
        shots=shots,
        seed=seed,
        subsample=subsample,
        cache_dir=cache_dir,
        reader=reader,
    )


def custom_reader(
    source: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    template: str = "a photo of a {}.",
) -> CustomReader:
    """The reader of a custom ImageFolder tree or CSV at ``source`` (its data root is
    ``reader.dataset_dir(source)``)."""
    source = Path(source).expanduser().resolve()
    return CustomReader(source, Path(split_file) if split_file else None, template)


def dataset_reader(
    dataset: str, root: str | os.PathLike, split_file: str | os.PathLike | None = None
) -> tuple[DatasetReader, Path]:
    """``(reader, data root)`` of a run's dataset: a registered dataset under ``root``, or a
    custom ImageFolder tree / CSV at the path ``dataset`` (with ``split_file``).

    Raises:
        DatasetError: no dataset given, or neither a registered name nor an existing path.
    """
    if not dataset:
        raise DatasetError(
            "no dataset given: set data.dataset (a registered name or a folder / CSV path)"
        )
    if dataset in list_datasets():
        return get_reader(dataset), Path(root).expanduser()
    if Path(dataset).expanduser().exists():
        reader = custom_reader(dataset, split_file)
        return reader, reader.dataset_dir(reader.source)
    raise DatasetError(
        f"dataset {dataset!r} is neither a registered dataset ({', '.join(list_datasets())}) "
        "nor an existing ImageFolder / CSV path"
    )
