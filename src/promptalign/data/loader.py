"""Torch datasets and loaders over records, with clear errors for unreadable images.

An unreadable or corrupt image raises an error naming the dataset, the file and the entry. With
``skip_corrupt=True`` such images are skipped instead; every batch carries the number it lost
(``batch["skipped"]``) and the dataset keeps the paths it skipped, so nothing goes unreported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .base import DatasetError, Record

log = logging.getLogger(__name__)


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``records`` under ``image_root``, returned as {"image", "label", "index"}."""

    def __init__(self, name: str, image_root: Path, records: Sequence[Record],
                 transform: Callable | None = None, skip_corrupt: bool = False):
        self.name = name
        self.image_root = Path(image_root)
        self.records = list(records)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image | None:
        r = self.records[index]
        path = self.image_root / r.path
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            if self.skip_corrupt:
                self.skipped.append(str(path))
                log.warning("%s: skipping unreadable image %s (entry %d): %s", self.name, path, index, e)
                return None
            raise DatasetError(
                f"{self.name}: cannot read image {path} (entry {index}, label {r.label} {r.classname!r}): {e}. "
                "Fix or remove the file, or pass skip_corrupt=True to skip and count such images"
            ) from e

    def __getitem__(self, index: int) -> dict | None:
        im = self.load_image(index)
        if im is None:
            return None
        x = self.transform(im) if self.transform else im
        return {"image": x, "label": self.records[index].label, "index": index}


def collate(items: list[dict | None]) -> dict:
    """Stack a batch, dropping skipped (None) items and counting them in ``"skipped"``."""
    kept = [i for i in items if i is not None]
    if not kept:
        return {"image": None, "label": torch.empty(0, dtype=torch.long),
                "index": torch.empty(0, dtype=torch.long), "skipped": len(items)}
    return {
        "image": torch.stack([i["image"] for i in kept]),
        "label": torch.tensor([i["label"] for i in kept], dtype=torch.long),
        "index": torch.tensor([i["index"] for i in kept], dtype=torch.long),
        "skipped": len(items) - len(kept),
    }


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    device: torch.device | str | None = None,
    seed: int | None = None,
    sampler: torch.utils.data.Sampler | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader: shuffled (seeded) for training, pinned memory when the target is a GPU."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    pin = torch.device(device).type == "cuda" if device is not None else False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=collate,
        generator=generator,
        persistent_workers=workers > 0,
    )
