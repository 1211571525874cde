"""Custom datasets without editing the library: an ImageFolder tree or a CSV of
``path,label[,classname]``, optionally with a split file in CoOp's JSON format.

* ImageFolder with ``train/`` (and optionally ``val/``, ``test/``) subfolders of class folders:
  the subfolders are the splits; labels follow the sorted union of class folders.
* ImageFolder of class folders only: every image is a test image (an evaluation-only dataset).
* CSV (paths relative to the CSV's folder; an optional header row): every row is a test image.
* With ``split_file`` (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``, paths
  relative to the ImageFolder root or the CSV's folder) the splits come from that file; for a CSV
  every path in the split file must be listed in the CSV with the same label.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .base import (
    Dataset,
    DatasetError,
    DatasetReader,
    Record,
    Splits,
    Subsample,
    check_inside,
    list_dirs,
    list_images,
    load_dataset,
    read_split_json,
)
from .base import folder_records


class CustomReader(DatasetReader):
    """Reader for a user's own ImageFolder tree or CSV (not registered: built per call)."""

    def __init__(self, source: Path, split_file: Path | None = None, template: str = "a photo of a {}."):
        self.source = source
        self.split_file = split_file
        self.template = template
        self.registered_name = source.stem
        self.is_csv = source.suffix.lower() == ".csv"
        self.test_only = split_file is None and not (not self.is_csv and (source / "train").is_dir())

    def dataset_dir(self, root: Path) -> Path:
        return self.source.parent if self.is_csv else self.source

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
                            f"{name}: {self.split_file}: {split} entry {r.path!r} (label {r.label}) is "
                            f"not listed in {self.source} with that label"
                        )
            return splits
        if self.split_file is not None:
            return read_split_json(self.split_file, name, base)
        if (base / "train").is_dir():
            present = [s for s in ("train", "val", "test") if (base / s).is_dir()]
            classes = sorted({c for s in present for c in list_dirs(base / s)})
            out = {s: [] for s in ("train", "val", "test")}
            for s in present:
                found = set(list_dirs(base / s))
                out[s] = [Record(f"{s}/{c}/{f}", label, c) for label, c in enumerate(classes)
                          if c in found for f in list_images(base / s / c)]
            return Splits(out["train"], out["val"], out["test"], classes)
        classes = list_dirs(base)
        if not classes:
            raise DatasetError(f"{name}: {base} holds no class folders (ImageFolder layout: <class>/<image>)")
        return Splits([], [], folder_records(base, "", classes, classes), classes)

    def _read_csv(self) -> list[Record]:
        recs: list[Record] = []
        with open(self.source, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if i == 1 and len(row) >= 2 and not row[1].strip().lstrip("-").isdigit():
                    continue  # header
                if len(row) not in (2, 3) or not row[1].strip().lstrip("-").isdigit():
                    raise DatasetError(f"{self.registered_name}: {self.source}:{i}: expected 'path,label[,classname]', got {row}")
                path, label = row[0].strip(), int(row[1])
                if label < 0:
                    raise DatasetError(f"{self.registered_name}: {self.source}:{i}: negative label {label}")
                check_inside(self.image_root(self.source), path, self.registered_name, f"{self.source}:{i}")
                recs.append(Record(path, label, row[2].strip() if len(row) == 3 else str(label)))
        if not recs:
            raise DatasetError(f"{self.registered_name}: {self.source} lists no images")
        return recs


def _names(recs: list[Record], where: str) -> list[str]:
    names: dict[int, str] = {}
    for r in recs:
        if names.setdefault(r.label, r.classname) != r.classname:
            raise DatasetError(f"{where}: label {r.label} is named both {names[r.label]!r} and {r.classname!r}")
    n = max(names) + 1
    missing = sorted(set(range(n)) - set(names))
    if missing:
        raise DatasetError(f"{where}: labels {missing[:10]} never occur; labels must be 0..{n - 1}")
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
    reader = CustomReader(source, Path(split_file) if split_file else None, template)
    return load_dataset(
        reader.registered_name, reader.dataset_dir(source), shots=shots, seed=seed, subsample=subsample,
        cache_dir=cache_dir, reader=reader,
    )
