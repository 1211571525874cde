"""Torch datasets and loaders over records, with clear errors for unreadable images.

An unreadable or corrupt image, or one over the pixel limit (``max_pixels``,
``data.max_image_pixels``), raises an error naming the dataset, the file and the entry. Images are
read by :func:`promptalign.data.images.read_image` (every Pillow mode to 8-bit RGB). With
``skip_corrupt=True`` (``data.skip_corrupt=true`` on the command line) such images are skipped
instead: every batch carries how many it lost (``batch["skipped"]``) and their paths
(``batch["skipped_paths"]``), so nothing goes unreported whichever process read them. The dataset's
own ``skipped`` list only sees images read in this process (``workers=0``); worker processes read
copies of the dataset, so use the batches' ``skipped_paths`` for a complete list.

Determinism. The training order and every random augmentation are pure functions of
``(seed, epoch, sample index)``: :class:`EpochSampler` draws the permutation of epoch ``e`` from a
private generator seeded with ``(seed, e)`` (iterating twice gives the same order, so a progress
bar that calls ``iter(loader)`` an extra time changes nothing) and hands each index to the dataset
together with a per-sample seed; :class:`ImageDataset` runs the transform of that sample under that
seed (restoring the RNG afterwards), so the crop and flip of sample ``i`` do not depend on which
worker process reads it or on how many there are. The loaders never draw from the global torch
RNG. A trainer calls ``loader.sampler.set_epoch(epoch)`` before each epoch (or builds a loader per
epoch with ``epoch=``) to get the next epoch's order and augmentations. Passes in a fixed order
with augmentation (e.g. Tip-Adapter's augmented cache views) use :class:`ViewSampler`: the
augmentation of sample ``i`` in view ``v`` is a pure function of ``(seed, v, i)``, so the views
differ from one another and do not depend on the worker count either.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from .base import DatasetError, Record
from .images import ImageReadError, read_image

log = logging.getLogger(__name__)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...): stable across runs, platforms and
    Python versions (unlike ``hash``), and different for every tuple in practice."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled training order that is a pure function of ``(seed, epoch)``.

    Yields ``(index, sample_seed)`` pairs; :class:`ImageDataset` uses ``sample_seed`` for the
    random augmentation of that sample. ``num_replicas`` / ``rank`` shard the permutation for
    data-parallel training as ``DistributedSampler`` does (padding by repetition so every rank gets
    the same number of samples).
    """

    def __init__(self, n: int, seed: int, *, epoch: int = 0, num_replicas: int = 1, rank: int = 0):
        if n < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler: bad n={n}, num_replicas={num_replicas}, rank={rank}")
        self.n = n
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        """Select the order and augmentations of ``epoch`` (called by the trainer every epoch)."""
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        """The indices of this epoch for this rank, in order."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas > 1 and perm:
            total = len(self) * self.num_replicas
            perm = (perm * (total // self.n + 1))[:total]
            perm = perm[self.rank :: self.num_replicas]
        return perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.order():
            yield i, mix_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return (self.n + self.num_replicas - 1) // self.num_replicas


# tags the seeds of augmented views apart from the training epochs' (seed, epoch, index)
_VIEW_STREAM = 0x76696577


class ViewSampler(torch.utils.data.Sampler):
    """Indices ``0..n-1`` in order, each with the sample seed of ``(seed, view, index)``: view
    ``view`` of a fixed-order augmented pass (:class:`ImageDataset` runs the transform of each
    sample under its seed, so no worker process or earlier pass changes it)."""

    def __init__(self, n: int, seed: int, view: int):
        if n < 0:
            raise ValueError(f"ViewSampler: bad n={n}")
        self.n, self.seed, self.view = n, int(seed), int(view)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in range(self.n):
            yield i, mix_seed(_VIEW_STREAM, self.seed, self.view, i)

    def __len__(self) -> int:
        return self.n


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``records`` under ``image_root``, returned as {"image", "label", "index"}.

    ``dataset[i]`` reads entry ``i``; ``dataset[(i, sample_seed)]`` (what :class:`EpochSampler`
    yields) also runs the transform under ``sample_seed`` so its random augmentation is fixed.
    """

    def __init__(
        self,
        name: str,
        image_root: Path,
        records: Sequence[Record],
        transform: Callable | None = None,
        skip_corrupt: bool = False,
        max_pixels: int | None = None,
    ):
        self.name = name
        self.image_root = Path(image_root)
        self.records = list(records)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.max_pixels = max_pixels  # None: Pillow's limit (see promptalign.data.images)
        self.skipped: list[str] = []  # images skipped in this process (see the module docstring)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image | None:
        r = self.records[index]
        path = self.image_root / r.path
        try:
            return read_image(path, self.max_pixels)
        except ImageReadError as e:
            if self.skip_corrupt:
                self.skipped.append(str(path))
                log.warning(
                    "%s: skipping unreadable image %s (entry %d): %s", self.name, path, index, e
                )
                return None
            raise DatasetError(
                f"{self.name}: cannot read image {path} "
                f"(entry {index}, label {r.label} {r.classname!r}): {e}. "
                "Fix or remove the file, or set data.skip_corrupt=true to skip and count such "
                "images"
            ) from e

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        im = self.load_image(index)
        if im is None:
            return {"skipped_path": str(self.image_root / self.records[index].path)}
        if self.transform is None:
            x = im
        elif sample_seed is None:
            x = self.transform(im)
        else:  # the transform draws from the CPU default generator: seed it, then restore it
            gen = (
                torch.default_generator
            )  # (torch.manual_seed would also seed every accelerator: ms)
            state = gen.get_state()
            gen.manual_seed(sample_seed)
            try:
                x = self.transform(im)
            finally:
                gen.set_state(state)
        return {"image": x, "label": self.records[index].label, "index": index}


def collate(items: list[dict | None]) -> dict:
    """Stack a batch, dropping skipped items and counting them in ``"skipped"`` (their paths in
    ``"skipped_paths"``; a None item counts as skipped with no path)."""
    kept = [i for i in items if i is not None and "image" in i]
    lost = [i["skipped_path"] for i in items if i is not None and "skipped_path" in i]
    if not kept:
        return {
            "image": None,
            "label": torch.empty(0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
            "skipped": len(items),
            "skipped_paths": lost,
        }
    return {
        "image": torch.stack([i["image"] for i in kept]),
        "label": torch.tensor([i["label"] for i in kept], dtype=torch.long),
        "index": torch.tensor([i["index"] for i in kept], dtype=torch.long),
        "skipped": len(items) - len(kept),
        "skipped_paths": lost,
    }


def _worker_count(workers: int, n: int, batch_size: int) -> int:
    """``workers`` bounded by the batches there are and by 4 per CPU core: more would only start
    idle processes (results never depend on the worker count)."""
    cores = os.cpu_count() or 1
    if workers > 4 * cores:
        log.warning(
            "data.workers=%d is more than 4 per CPU core (%d cores): using %d",
            workers,
            cores,
            4 * cores,
        )
    return min(workers, 4 * cores, -(-n // batch_size))


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    device: torch.device | str | None = None,
    seed: int | None = None,
    epoch: int = 0,
    sampler: torch.utils.data.Sampler | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader: for training an :class:`EpochSampler` over ``(seed, epoch)`` (call
    ``loader.sampler.set_epoch(e)`` to move to epoch ``e``), pinned memory when the target is a GPU.

    The loader has its own generator, so neither iterating it nor starting worker processes
    draws from the global torch RNG (dropout and other streams of the caller stay untouched).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}; use 0 to load in the main process")
    if train and len(dataset) == 0:
        name = getattr(dataset, "name", "dataset")
        raise DatasetError(
            f"{name}: no training images: the dataset has no train split (a CSV or a folder of "
            "class folders without a split file is evaluation-only); give a split file with "
            "--split-file / data.split_file, or a train/ folder of class folders"
        )
    if seed is None:  # an unseeded training order: one draw from the global RNG picks it
        seed = int(torch.randint(0, 2**62, (1,)).item()) if train else 0
    if train and sampler is None:
        sampler = EpochSampler(len(dataset), seed, epoch=epoch)
    n = len(sampler) if sampler is not None else len(dataset)
    batch_size = min(batch_size, max(n, 1))  # a larger batch is the same one batch of everything
    workers = _worker_count(workers, n, batch_size)
    pin = torch.device(device).type == "cuda" if device is not None else False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 1)),
        persistent_workers=workers > 0,
    )
