"""Building a run from its config: data, backbone, method and optimiser.

:func:`build_run` resolves the config once (:func:`promptalign.resolve.resolve_config`: every
method and optimiser field, the training crop) and fills in this machine's loader workers; the
run folder stores that config, and building from it again gives the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..accel import resolve_amp
from ..backbone import load_backbone
from ..config import ConfigError, RunConfig, apply_overrides, default_workers, to_dict
from ..data import Dataset, ImageDataset, build_transform, load_dataset, make_loader
from ..data.base import DatasetError
from ..data.custom import dataset_reader
from ..data.images import find_unreadable
from ..data.loader import ViewSampler
from ..methods import PromptMethod, create_method
from ..resolve import resolve_config
from .checkpoint import sample_hash

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig, seed: int, subsample: str | None = None) -> Dataset:
    """The dataset of ``cfg.data`` (registered name or a custom tree / CSV path)."""
    d = cfg.data
    reader, root = dataset_reader(d.dataset, d.root, d.split_file)
    return load_dataset(
        reader.registered_name,
        root,
        shots=d.shots,
        seed=seed,
        subsample=subsample or d.subsample,
        reader=reader,
    )


def build_method(
    cfg: RunConfig, classnames: Sequence[str], device: torch.device, backbone=None
) -> PromptMethod:
    """The method of ``cfg`` (a resolved config: its ``method.options`` are the method's config)
    on its backbone (or ``backbone``), prompts from the run seed."""
    spec = cfg.method
    bb = (
        backbone
        if backbone is not None
        else load_backbone(cfg.backbone.arch, cfg.backbone.weights, device=device)
    )
    torch.manual_seed(cfg.run.seed)  # prompt initialisation
    try:
        method = create_method(spec.name, bb, classnames, config=spec.build())
    except ConfigError:
        raise
    except ValueError as e:  # a method's own check of its options (one line for the CLI)
        raise ConfigError(f"method.options ({spec.name}): {e}") from e
    except (TypeError, RuntimeError, OverflowError, MemoryError) as e:  # e.g. absurd sizes
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ConfigError(
            f"method.options ({spec.name}): the method cannot be built with these options "
            f"({type(e).__name__}: {first}); check its sizes and counts"
        ) from e
    return method.to(device)


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: RunConfig
) -> torch.optim.Optimizer | None:
    o = cfg.optim
    if not params:
        return None
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, eps=o.adam_eps)


def image_sets(
    cfg: RunConfig, data: Dataset, method: PromptMethod, split: str = "test"
) -> tuple[ImageDataset, ImageDataset]:
    """(train, evaluation) image datasets with the backbone's preprocessing; the evaluation set
    holds the ``split`` ("test" or "val") records."""
    pre = method.backbone.preprocess
    train = ImageDataset(
        data.name,
        data.image_root,
        data.train,
        build_transform(pre, train=True, crop_scale=cfg.data.crop_scale),
        cfg.data.skip_corrupt,
        cfg.data.max_image_pixels,
    )
    scored = ImageDataset(
        data.name,
        data.image_root,
        data.val if split == "val" else data.test,
        build_transform(pre, train=False),
        cfg.data.skip_corrupt,
        cfg.data.max_image_pixels,
    )
    return train, scored


def check_eval_split(cfg: RunConfig, data: Dataset) -> None:
    """A run scored on the validation split (``run.eval_split=val``) needs one.

    Raises:
        DatasetError: the dataset has no validation images, saying how to give some.
    """
    if cfg.run.eval_split == "val" and not data.val:
        raise DatasetError(
            f"{data.name}: no validation split, and run.eval_split=val scores the run on it: "
            "give one (a val/ folder of class folders beside train/ in an ImageFolder dataset, "
            "or a 'val' list in its --split-file), or score on the test split "
            "(run.eval_split=test)"
        )


def record_batches(
    cfg: RunConfig,
    data: Dataset,
    records: Sequence[Any],
    method: PromptMethod,
    device: torch.device,
    *,
    augment: bool,
) -> Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """For the method hooks: a callable iterating ``(images, labels)`` of ``records`` in a fixed
    order, unreadable images skipped. Without ``augment`` it takes no arguments (evaluation
    preprocessing). With ``augment``, ``batches(view=0, crop_scale=None)`` gives augmented view
    ``view``: the training crop (``crop_scale``: its area range; None = the run's training crop)
    and flip of sample ``i`` are drawn from the seed ``(run seed, view, i)``, so views differ from
    one another and none depends on the worker count (:class:`~promptalign.data.loader.
    ViewSampler`)."""
    pre = method.backbone.preprocess
    run_crop = tuple(cfg.data.crop_scale)
    transforms: dict[tuple[float, float], Any] = {}

    def dataset(scale: tuple[float, float]) -> ImageDataset:
        if scale not in transforms:
            transforms[scale] = build_transform(pre, train=augment, crop_scale=scale)
        return ImageDataset(
            data.name,
            data.image_root,
            records,
            transforms[scale],
            cfg.data.skip_corrupt,
            cfg.data.max_image_pixels,
        )

    def batches(
        view: int = 0, crop_scale: Sequence[float] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not len(records):
            return
        scale = tuple(crop_scale) if augment and crop_scale is not None else run_crop
        loader = make_loader(
            dataset(scale),
            cfg.optim.eval_batch_size,
            train=False,
            workers=cfg.data.workers,
            device=device,
            sampler=ViewSampler(len(records), cfg.run.seed, view) if augment else None,
        )
        for batch in loader:
            if batch["image"] is not None:
                yield batch["image"].to(device), batch["label"].to(device)

    return batches


@dataclass
class Run:
    """Everything a training loop needs, built from a config."""

    cfg: RunConfig  # fully resolved
    data: Dataset
    method: PromptMethod
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler
    train_set: ImageDataset
    eval_set: ImageDataset  # the run.eval_split records: test, or the few-shot validation split
    param_names: dict[int, str]


def build_run(cfg: RunConfig, device: torch.device, backbone=None) -> Run:
    """Data, backbone, method and optimiser of ``cfg``, and the resolved config (this machine's
    loader workers filled in when ``data.workers`` is unset)."""
    cfg = resolve_config(cfg)
    if cfg.data.workers is None:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, workers=default_workers())
        )
    seed_everything(cfg.run.seed)
    data = load_data(cfg, cfg.run.seed)
    method = build_method(cfg, data.classnames, device, backbone)
    check_eval_split(cfg, data)
    check_data(cfg, data, method)
    # data-dependent method state (e.g. Tip-Adapter's cache) exists before the optimiser does
    method.fit_before_training(record_batches(cfg, data, data.train, method, device, augment=True))
    params = method.trainable_parameters()
    names = {id(p): n for n, p in method.named_parameters() if p.requires_grad}
    amp = resolve_amp(cfg.optim.amp, device, training=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    train_set, eval_set = image_sets(cfg, data, method, cfg.run.eval_split)
    return Run(cfg, data, method, build_optimizer(params, cfg), scaler, train_set, eval_set, names)


def check_data(cfg: RunConfig, data: Dataset, method: PromptMethod) -> None:
    """Before training: every class the run learns has training images, and every image the run
    will read (training; validation when the method selects on it or the run is scored on it;
    test unless the run is scored on validation, ``run.eval_split=val``) opens as an image within
    the pixel limit (headers only, so this stays fast). Unreadable images are an error naming the
    first one and how many there are, or, under ``data.skip_corrupt``, a warning (they are then
    skipped and counted as they are met).

    Raises:
        DatasetError: a class without training images, or unreadable images.
    """
    base = PromptMethod
    learns = bool(method.trainable_parameters()) or (
        type(method).fit_before_training is not base.fit_before_training  # e.g. a feature cache
    )
    if learns and data.train:
        have = {r.label for r in data.train}
        missing = [c for i, c in enumerate(data.classnames) if i not in have]
        if missing:
            raise DatasetError(
                f"{data.name}: {len(missing)} class(es) have no training images: "
                f"{', '.join(repr(m) for m in missing[:5])}{', ...' if len(missing) > 5 else ''}"
                "; a prompt cannot learn a class it never sees: add training images for them, "
                "or remove their folders from every split"
            )
    on_val = cfg.run.eval_split == "val"
    uses_val = on_val or type(method).select_on_validation is not base.select_on_validation
    splits = [
        ("train", data.train),
        ("val", data.val if uses_val else []),
        ("test", [] if on_val else data.test),  # never opened while scoring on validation
    ]
    paths = [r.path for _, recs in splits for r in recs]
    bad = find_unreadable(data.image_root, paths, cfg.data.max_image_pixels)
    if not bad:
        return
    path, why = bad[0]
    what = (
        f"{data.name}: {len(bad)} of {len(set(paths))} image(s) cannot be read, first "
        f"{data.image_root / path}: {why}"
    )
    if cfg.data.skip_corrupt:
        log.warning("%s; data.skip_corrupt: they are skipped and counted", what)
        return
    raise DatasetError(
        f"{what}. Fix or remove the files, or set data.skip_corrupt=true to skip and count such "
        "images"
    )


def run_info(
    cfg: RunConfig, method: PromptMethod, data: Dataset, epoch: int, metrics: dict | None
) -> dict[str, Any]:
    return {
        "method": cfg.method.name,
        "classnames": list(method.classnames),
        "sampling": data.sampling_info(),
        "sample_sha256": sample_hash(data),  # of the lists in sample.json
        "epoch": epoch,
        "metrics": metrics or {},
        "promptalign_config": to_dict(cfg),
    }


# how unreadable images are handled: a run may be resumed or evaluated with other values (the
# results of the images that can be read do not change)
READING = ("data.skip_corrupt", "data.max_image_pixels")
# settings a resumed run may change: they do not change what is computed
RESUMABLE = ("run.device", "run.progress", "data.workers", "data.root", *READING)


def resume_config(
    stored: RunConfig, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> RunConfig:
    """The config of a resumed run: ``stored`` with ``overrides`` that do not change results
    (:data:`RESUMABLE`); an override that changes anything else is an error naming the keys."""
    return changed_settings(
        stored,
        overrides,
        RESUMABLE,
        "--resume continues the run as its config.yaml says",
        "start a new run with another --out to change them",
    )


def changed_settings(
    stored: RunConfig,
    overrides: Sequence[str] | Mapping[str, Any],
    allowed: Sequence[str],
    what: str,
    fix: str,
) -> RunConfig:
    """``stored`` with ``overrides``, which may change only the ``allowed`` keys; any other
    change is a :class:`ConfigError` naming the keys, ``what`` the command does and the ``fix``."""
    changed = apply_overrides(stored, overrides)
    flat_a, flat_b = _flatten(to_dict(stored)), _flatten(to_dict(changed))
    diff = sorted(
        k
        for k in flat_a.keys() | flat_b.keys()
        if flat_a.get(k) != flat_b.get(k) and k not in allowed
    )
    if diff:
        raise ConfigError(f"{what} and cannot change {diff} (only {list(allowed)}); {fix}")
    return changed


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
