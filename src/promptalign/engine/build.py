"""Building a run from its config: data, backbone, method, optimiser, and the fully resolved config.

:func:`resolve_config` turns a user's config into the one a run folder stores: every method field
(published defaults < preset < options, the dataset's template for a method with a hand-written
``template`` field), every optimiser field (:func:`promptalign.config.resolve_optim`), the
backbone weights and the worker count. Building from a resolved config again gives the same run.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..accel import resolve_amp
from ..backbone import load_backbone
from ..config import (
    ConfigError,
    MethodSpec,
    RunConfig,
    apply_overrides,
    default_workers,
    resolve_optim,
    to_dict,
)
from ..data import (
    Dataset,
    ImageDataset,
    build_transform,
    list_datasets,
    load_custom_dataset,
    load_dataset,
    make_loader,
)
from ..data.base import DatasetError
from ..data.loader import ViewSampler
from ..methods import PromptMethod, create_method
from .checkpoint import sample_hash


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig, seed: int, subsample: str | None = None) -> Dataset:
    """The dataset of ``cfg.data`` (registered name or a custom tree / CSV path)."""
    d = cfg.data
    sub = subsample or d.subsample
    if not d.dataset:
        raise DatasetError(
            "no dataset given: set data.dataset (a registered name or a folder / CSV path)"
        )
    if d.dataset in list_datasets():
        return load_dataset(d.dataset, d.root, shots=d.shots, seed=seed, subsample=sub)
    if Path(d.dataset).expanduser().exists():
        return load_custom_dataset(
            d.dataset, split_file=d.split_file, shots=d.shots, seed=seed, subsample=sub
        )
    raise DatasetError(
        f"dataset {d.dataset!r} is neither a registered dataset ({', '.join(list_datasets())}) "
        "nor an existing ImageFolder / CSV path"
    )


def resolve_method(
    spec: MethodSpec, template: str | None = None, dataset: str | None = None
) -> MethodSpec:
    """``spec`` with every field of the method's config in ``options``, for a run on
    ``dataset``: the release's settings for a registered dataset (the method's ``RELEASED``
    table) under the preset and options, and for a method with a ``template`` field the
    dataset's ``template`` unless the table or the run sets one
    (:meth:`~promptalign.methods.base.MethodConfig.for_run`)."""
    cls = type(spec.build())  # unknown method / preset / option: ConfigError
    registered = dataset if dataset in list_datasets() else None  # not a custom folder's name
    config = cls.for_run(spec.preset, spec.options, dataset=registered, template=template)
    return dataclasses.replace(spec, options=config.to_dict())


def resolve_config(cfg: RunConfig, data: Dataset, method: PromptMethod) -> RunConfig:
    """The fully resolved config of a run (what its folder stores)."""
    shots = cfg.data.shots
    o = resolve_optim(
        cfg.optim,
        method.optim_preset,
        shots,
        iterations=method.config.iteration_budget(shots),  # a schedule published in steps
        num_classes=method.num_classes,
    )
    workers = default_workers() if cfg.data.workers is None else cfg.data.workers
    return dataclasses.replace(
        cfg,
        method=resolve_method(cfg.method, data.template, cfg.data.dataset),
        optim=o,
        data=dataclasses.replace(cfg.data, workers=workers, crop_scale=crop_scale(cfg, data)),
    )


def crop_scale(cfg: RunConfig, data: Dataset) -> tuple[float, float]:
    """The training crop's area range: the run's ``data.crop_scale``, else the dataset's."""
    return tuple(cfg.data.crop_scale or data.crop_scale)


def build_method(
    cfg: RunConfig,
    classnames: Sequence[str],
    device: torch.device,
    backbone=None,
    template: str | None = None,
) -> PromptMethod:
    """The method of ``cfg`` on its backbone (or ``backbone``), prompts from the run seed."""
    spec = resolve_method(cfg.method, template, cfg.data.dataset)
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
    cfg: RunConfig, data: Dataset, method: PromptMethod
) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) image datasets with the backbone's preprocessing."""
    pre = method.backbone.preprocess
    train = ImageDataset(
        data.name,
        data.image_root,
        data.train,
        build_transform(pre, train=True, crop_scale=crop_scale(cfg, data)),
        cfg.data.skip_corrupt,
    )
    test = ImageDataset(
        data.name,
        data.image_root,
        data.test,
        build_transform(pre, train=False),
        cfg.data.skip_corrupt,
    )
    return train, test


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
    run_crop = crop_scale(cfg, data)
    transforms: dict[tuple[float, float], Any] = {}

    def dataset(scale: tuple[float, float]) -> ImageDataset:
        if scale not in transforms:
            transforms[scale] = build_transform(pre, train=augment, crop_scale=scale)
        return ImageDataset(
            data.name, data.image_root, records, transforms[scale], cfg.data.skip_corrupt
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
    test_set: ImageDataset
    param_names: dict[int, str]


def build_run(cfg: RunConfig, device: torch.device, backbone=None) -> Run:
    """Data, backbone, method and optimiser of ``cfg``, and the resolved config."""
    if not cfg.method.name:
        raise ConfigError(
            f"no method given: set method.name (--method), one of {', '.join(_methods())}"
        )
    seed_everything(cfg.run.seed)
    data = load_data(cfg, cfg.run.seed)
    method = build_method(cfg, data.classnames, device, backbone, data.template)
    cfg = resolve_config(cfg, data, method)
    # data-dependent method state (e.g. Tip-Adapter's cache) exists before the optimiser does
    method.fit_before_training(record_batches(cfg, data, data.train, method, device, augment=True))
    params = method.trainable_parameters()
    names = {id(p): n for n, p in method.named_parameters() if p.requires_grad}
    amp = resolve_amp(cfg.optim.amp, device, training=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    train_set, test_set = image_sets(cfg, data, method)
    return Run(cfg, data, method, build_optimizer(params, cfg), scaler, train_set, test_set, names)


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


# settings a resumed run may change: they do not change what is computed
RESUMABLE = ("run.device", "run.progress", "data.workers", "data.root")


def resume_config(
    stored: RunConfig, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> RunConfig:
    """The config of a resumed run: ``stored`` with ``overrides`` that do not change results
    (:data:`RESUMABLE`); an override that changes anything else is an error naming the keys."""
    changed = apply_overrides(stored, overrides)
    flat_a, flat_b = _flatten(to_dict(stored)), _flatten(to_dict(changed))
    diff = sorted(
        k
        for k in flat_a.keys() | flat_b.keys()
        if flat_a.get(k) != flat_b.get(k) and k not in RESUMABLE
    )
    if diff:
        raise ConfigError(
            f"--resume continues the run as its config.yaml says and cannot change {diff} "
            f"(only {list(RESUMABLE)}); start a new run with another --out to change them"
        )
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


def _methods() -> list[str]:
    from ..methods import list_methods

    return list_methods()
