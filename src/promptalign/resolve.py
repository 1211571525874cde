"""One function resolves a run's config: :func:`resolve_config`.

It turns a user's run config (a YAML file, a preset, ``KEY=VALUE`` overrides) into the config a run
folder stores, from the config and its dataset's metadata alone, without building a model (no
weights loaded, no image opened):

* ``method.options``: every field of the method's config: published defaults < the release's
  settings for the registered dataset < preset < options; for a method with a ``template`` field
  the dataset's template unless those set one; prompt depths fitted to the backbone's towers,
  whose layer counts come from its architecture config
  (:meth:`~promptalign.methods.base.MethodConfig.for_run`);
* ``optim``: every field: library defaults < the method's published settings (a wrapped method's
  included) < the run's; epochs from a schedule published in optimiser steps and the run's class
  count, read from the dataset reader's split listing only when needed
  (:func:`~promptalign.config.resolve_optim`);
* ``data.crop_scale``: the run's, else the dataset reader's training crop.

Training, resume, evaluation, benchmark jobs (the config a job records and its fingerprint) and
the shipped run presets all use it, and resolving a resolved config changes nothing.
``data.workers`` is left as it is: loader processes never change a result, and the engine fills
in this machine's count where it makes the run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from .backbone import TowerDepths, tower_depths
from .config import ConfigError, MethodSpec, RunConfig, resolve_optim
from .data.base import DEFAULT_CROP_SCALE, count_classes, list_datasets
from .data.custom import dataset_reader
from .methods import list_methods


def resolve_config(cfg: RunConfig) -> RunConfig:
    """The fully resolved config of a run of ``cfg`` (what its folder's config.yaml holds).

    Raises:
        ConfigError: no method, or a bad method name, preset or option.
        DatasetError: a dataset that is neither registered nor an existing path; a missing
            dataset folder only where its class count is needed.
        BackboneError: an unknown architecture, where a prompt depth is fitted to it.
    """
    if not cfg.method.name:
        raise ConfigError(
            f"no method given: set method.name (--method), one of {', '.join(list_methods())}"
        )
    d = cfg.data
    template, crop, num_classes = None, DEFAULT_CROP_SCALE, None
    if d.dataset:  # (a config without one, e.g. being put together, gets the defaults)
        reader, root = dataset_reader(d.dataset, d.root, d.split_file)
        template, crop = reader.template, reader.crop_scale

        def num_classes() -> int:  # read only for a schedule published in optimiser steps
            return count_classes(reader.registered_name, root, d.subsample, reader)

    towers = functools.cache(lambda: tower_depths(cfg.backbone.arch))
    spec = resolve_method(cfg.method, template, d.dataset, towers)
    method = spec.build()
    optim = resolve_optim(
        cfg.optim,
        method.published_optim(),
        d.shots,
        iterations=method.iteration_budget(d.shots),
        num_classes=num_classes,
    )
    data = dataclasses.replace(d, crop_scale=tuple(d.crop_scale or crop))
    return dataclasses.replace(cfg, method=spec, optim=optim, data=data)


def resolve_method(
    spec: MethodSpec,
    template: str | None = None,
    dataset: str | None = None,
    towers: TowerDepths | Callable[[], TowerDepths] | None = None,
) -> MethodSpec:
    """``spec`` with every field of the method's config in ``options``, for a run on
    ``dataset`` (a registered name, None for a custom one) with the dataset's ``template``, on a
    backbone with ``towers`` (None: depths left as asked): the method's part of
    :func:`resolve_config` (:meth:`~promptalign.methods.base.MethodConfig.for_run`)."""
    cls = type(spec.build())  # unknown method / preset / option: ConfigError
    registered = dataset if dataset in list_datasets() else None
    config = cls.for_run(
        spec.preset, spec.options, dataset=registered, template=template, towers=towers
    )
    return dataclasses.replace(spec, options=config.to_dict())
