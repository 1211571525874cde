"""Run configuration: typed frozen dataclasses, YAML files, dotted ``key=value`` overrides.

A run is described by :class:`RunConfig` (backbone / method / data / optimisation / run). Files are
saved instances (YAML); overrides are dotted keys checked against the dataclass types, with errors
that name the key and the allowed keys or values. Optimisation fields left as None take the
method's published preset (shot-dependent epochs included); :func:`resolve` fills them in and every
run writes that fully resolved config next to its outputs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml


@dataclass(frozen=True)
class BackboneConfig:
    """Attributes:
        arch: open_clip architecture (or shipped config / JSON path).
        weights: open_clip pretrained tag or local weights file; None = random (tests only).
    """

    arch: str = "ViT-B-16"
    weights: str | None = "openai"


@dataclass(frozen=True)
class MethodSpec:
    """Attributes:
        name: registered method (required; see ``promptalign list methods``).
        preset: named preset of the method's config (e.g. ALIGN's "reference").
        options: method config overrides, e.g. {"n_ctx": 4}.
        init_from: a run folder whose prompts (``prompts.safetensors``, loaded strictly) start
            this run, e.g. PLOT++ stage 2 from stage 1; None = the method's own initialisation.
    """

    name: str = ""
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    init_from: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Attributes:
        dataset: registered dataset name, or a path to a custom ImageFolder tree / CSV.
        root: the data root (CoOp layout).
        split_file: split JSON for a custom dataset.
        shots: labelled images per class (None = all).
        subsample: "all", "base" or "new" classes.
        workers: data-loading worker processes.
        skip_corrupt: skip (and count) unreadable images instead of failing.
    """

    dataset: str = ""
    root: str = "."
    split_file: str | None = None
    shots: int | None = 16
    subsample: Literal["all", "base", "new"] = "all"
    workers: int = 4
    skip_corrupt: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """None = the method's published value (see the method's ``OptimPreset``).

    Attributes:
        optimizer: "sgd" or "adamw"; lr, momentum, weight_decay, epochs, batch_size,
        warmup_epochs, warmup_lr, scheduler ("cosine" | "constant"): as in the presets.
        eval_batch_size: evaluation batch size.
        grad_clip: max gradient norm (None = no clipping).
        amp: autocast dtype: "none", "bf16" or "fp16" (fp32 master parameters).
    """

    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    warmup_epochs: int | None = None
    warmup_lr: float | None = None
    scheduler: Literal["cosine", "constant"] | None = None
    eval_batch_size: int = 100
    grad_clip: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"


@dataclass(frozen=True)
class RunSettings:
    """Attributes:
        seed: run seed (sampling, initialisation, data order).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        eval_every: evaluate on the test split every N epochs (0 = only at the end).
        progress: show a progress bar.
    """

    seed: int = 1
    device: str = "auto"
    eval_every: int = 0
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    backbone: BackboneConfig = BackboneConfig()
    method: MethodSpec = MethodSpec()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunSettings = RunSettings()


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


# --------------------------------------------------------------------------- conversion
def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-ready)."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Coerce/validate ``value`` for a field annotated ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(key, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (Mapping, dict) or tp in (dict,) or (origin is not None and origin.__name__ == "Mapping"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    return value


def from_dict(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {[where + u for u in unknown]}; allowed: {[where + n for n in names]}")
    kwargs = {k: _check_value(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules ("4" -> 4, "none"/"null" -> None, "[1,2]" -> list)."""
    if text.lower() == "none":
        return None
    return yaml.safe_load(text)


def apply_overrides(cfg: RunConfig, overrides: list[str] | Mapping[str, Any]) -> RunConfig:
    """Apply dotted overrides like ``optim.lr=0.01`` or ``method.options.n_ctx=8``."""
    data = to_dict(cfg)
    items = overrides.items() if isinstance(overrides, Mapping) else [_split(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node, cls = data, RunConfig
        for i, part in enumerate(parts[:-1]):
            if cls is not None:
                hints = typing.get_type_hints(cls)
                if part not in hints:
                    raise ConfigError(f"unknown key {'.'.join(parts[:i + 1])!r}; allowed: {sorted(hints)}")
                nxt = hints[part]
                cls = nxt if dataclasses.is_dataclass(nxt) else None
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section")
        if cls is not None:
            hints = typing.get_type_hints(cls)
            if parts[-1] not in hints:
                raise ConfigError(f"unknown key {key!r}; allowed: {sorted('.'.join(parts[:-1] + [h]) if parts[:-1] else h for h in hints)}")
        node[parts[-1]] = parse_scalar(value) if isinstance(value, str) and not isinstance(overrides, Mapping) else value
    return from_dict(RunConfig, data)


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=0.002)")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def load_yaml(path: str | Path) -> RunConfig:
    """Read a YAML run config (a saved :class:`RunConfig`; missing keys keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve(cfg: RunConfig, preset_optim: Any) -> RunConfig:
    """Fill None optimisation fields from the method's published ``OptimPreset``."""
    o = cfg.optim
    epochs = o.epochs if o.epochs is not None else preset_optim.epochs_for(cfg.data.shots)
    filled = {
        name: getattr(o, name) if getattr(o, name) is not None else getattr(preset_optim, name)
        for name in ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "warmup_epochs",
                     "warmup_lr", "scheduler")
    }
    return dataclasses.replace(cfg, optim=dataclasses.replace(o, epochs=epochs, **filled))
