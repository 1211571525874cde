"""Run configuration: typed frozen dataclasses, YAML files, dotted ``key=value`` overrides.

A run is described by :class:`RunConfig` (backbone / method / data / optimisation / run). Files are
saved instances (YAML); overrides are dotted keys. Every value is converted by the type of its
field, wherever it comes from (YAML, a preset, ``KEY=VALUE``): ``method.options`` are checked
against the registered method's own config class as soon as the method is known, and ranges and
choices are checked in the classes themselves (``__post_init__``). Errors name the key and the
allowed keys or values, in one line (:class:`ConfigError`).

One optimiser-settings type, :class:`OptimConfig`, serves both the run (``optim``: None = the
method's published value) and the method configs (``MethodConfig.optim``: the published values).
:func:`resolve_optim` layers library defaults, the method's values and the run's values; the run
folder stores the fully resolved config (every method field included), which re-creates the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .accel import AmpChoice, CompileChoice
from .io import EncodingError, read_text


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


class FieldError(ConfigError):
    """Raised by a config class's own checks; the message starts with the field name and
    :func:`from_dict` puts the section in front (``lr: ...`` -> ``optim.lr: ...``)."""


# --------------------------------------------------------------------------- checks in the classes
def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def check_choices(obj: Any) -> None:
    """Literal fields hold one of their values (also for instances built in Python)."""
    hints = typing.get_type_hints(type(obj))
    for name, value in _fields(obj).items():
        try:
            check_value(name, hints[name], value)
        except ConfigError as e:
            raise FieldError(str(e)) from None


def _at_least(obj: Any, **bounds: tuple[float, bool]) -> None:
    """``field=(bound, inclusive)``: the field (when set) is >= / > bound."""
    for name, (bound, inclusive) in bounds.items():
        v = getattr(obj, name)
        if v is not None and (v < bound if inclusive else v <= bound):
            raise FieldError(f"{name}: {show(v)} must be {'>=' if inclusive else '>'} {bound}")


# --------------------------------------------------------------------------- YAML
# aliases may add at most this many nodes beyond the file's own (an "alias bomb" of a few hundred
# bytes expands to billions); a run config has a few hundred nodes in all
YAML_ALIAS_EXPANSION_LIMIT = 100_000
YAML_MAX_DEPTH = 100


def safe_load_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` with PyYAML's safe loader, refusing (before building anything) a
    document whose aliases would expand it by more than :data:`YAML_ALIAS_EXPANSION_LIMIT` nodes,
    a recursive alias, or nesting deeper than :data:`YAML_MAX_DEPTH` levels.

    Raises:
        ConfigError: naming ``where`` (a file or a key) and the problem.
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the pure-Python loader: libyaml's crashes on deep nesting
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({_clip(first)})") from None
    except RecursionError:
        raise ConfigError(
            f"{where}: YAML nested too deeply (more than {YAML_MAX_DEPTH} levels)"
        ) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where}: YAML value not usable ({_clip(str(e))})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Count the nodes the document expands to (aliases counted at every use) without expanding
    it: each distinct node's expanded size is computed once, bottom-up."""

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    size: dict[int, int] = {}  # id -> expanded size (exact: Python integers do not overflow)
    open_: set[int] = set()  # nodes on the current path (a child among them: a recursive alias)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children(node))
            continue
        if key in size:
            continue
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{where}: YAML nested more than {YAML_MAX_DEPTH} levels deep")
        open_.add(key)
        stack.append((node, depth, True))
        for c in children(node):
            if id(c) in open_:
                raise ConfigError(f"{where}: YAML alias refers to itself (a recursive anchor)")
            if id(c) not in size:
                stack.append((c, depth + 1, False))
    extra = size[id(root)] - len(size)
    if extra > YAML_ALIAS_EXPANSION_LIMIT:
        raise ConfigError(
            f"{where}: YAML aliases (*name) would expand the document by more than "
            f"{YAML_ALIAS_EXPANSION_LIMIT} values; refused (write the values out, or use fewer "
            "aliases)"
        )


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3
_REPR.maxlong = 40


def show(value: Any) -> str:
    """A bounded ``repr`` for error messages: long strings, lists and nesting are cut (the work
    is bounded too, whatever the size of ``value``)."""
    return _REPR.repr(value)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# --------------------------------------------------------------------------- conversion
class Text(str):
    """A value as typed on the command line: converted by its field's type (so "none" stays the
    string "none" for a Literal that allows it, and "npt" becomes ("npt",) for a tuple field)."""


def _yaml(key: str, text: str) -> Any:
    return safe_load_yaml(text, f"{key}={show(str(text))}")


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists (YAML/JSON-ready)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Text):
        return str(cfg)
    return cfg


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def check_value(key: str, tp: Any, value: Any) -> Any:
    """Convert/validate ``value`` for a field annotated ``tp``; errors name ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is object:  # converted later by a type known then (method options)
        return value
    if tp is Any:
        return _yaml(key, value) if isinstance(value, Text) else value
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if value is None and len(others) < len(args):
            return None
        if (
            isinstance(value, Text)
            and value.lower() in ("none", "null", "~")
            and len(others) < len(args)
        ):
            takes_text = any(
                typing.get_origin(a) is Literal and str(value) in typing.get_args(a) for a in others
            )  # e.g. optim.amp=none is the choice "none"
            if not takes_text:
                return None
        errors = []
        for a in others:
            try:
                return check_value(key, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else "; ".join(errors))
    if origin is Literal:
        if isinstance(value, Text):
            value = str(value) if str(value) in args else _yaml(key, value)
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{key}: {show(value)} is not allowed; choose one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Text):
            value = _yaml(key, value)
        return from_dict(tp, value, prefix=key)
    if isinstance(value, Text):
        value = str(value) if tp is str else _yaml(key, value)
    if (
        origin in (Mapping, dict, typing.Mapping)
        or tp is dict
        or (origin is not None and getattr(origin, "__name__", "") == "Mapping")
    ):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping ({{key: value}}), got {show(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {k: check_value(f"{key}.{k}", vt, v) for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not (
            len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple
        ):
            value = [value]  # a single item: "npt" -> ("npt",)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {show(value)}")
        return tuple(check_value(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {show(value)}")
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # "1e-4": YAML 1.1 reads exponents without a dot as text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {show(value)} is not a finite number")
            return number
        raise ConfigError(f"{key}: expected a number, got {show(value)}")
    if tp is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise ConfigError(f"{key}: {show(str(value))} holds a NUL character")
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {show(value)}")
    return value


def check_fields(cls: type, data: Any, prefix: str = "") -> dict[str, Any]:
    """Convert the given fields of dataclass ``cls`` (a partial mapping); unknown keys are errors
    that list the allowed ones."""
    where = f"{prefix}." if prefix else ""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix or cls.__name__}: expected a mapping of {where}* keys "
            f"(e.g. {{{dataclasses.fields(cls)[0].name}: ...}}), got {show(data)}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(
        show(k) if not isinstance(k, str) else _clip(k, 80) for k in set(data) - set(names)
    )
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[where + u for u in unknown]}; allowed: {[where + n for n in names]}"
        )
    return {k: check_value(where + k, hints[k], v) for k, v in data.items()}


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking every key, type and range."""
    kwargs = check_fields(cls, {} if data is None else data, prefix)
    try:
        return cls(**kwargs)
    except FieldError as e:
        if not prefix:
            raise
        raise FieldError(f"{prefix}.{e}") from None


# --------------------------------------------------------------------------- optimisation
@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings. In a run config, None = the method's published value; in a method
    config, the published values (None = the library default, :data:`DEFAULT_OPTIM`).

    Attributes:
        optimizer: "sgd" or "adamw".
        lr, momentum, weight_decay: optimiser settings (lr > 0).
        adam_eps: AdamW's ``eps`` (> 0; torch's default 1e-8; Tip-Adapter-F's release 1e-4),
            unused by SGD.
        epochs: training epochs (0 = evaluate only); ``epochs_by_shots`` gives few-shot epochs as
            ((max_shots, epochs), ...) checked in order, e.g. ((1, 50), (4, 100), (16, 200)), used
            when the run does not set ``epochs``.
        batch_size: training batch size (>= 1).
        warmup_epochs, warmup_lr: constant-lr warm-up before the schedule.
        scheduler: "cosine" (stepped once per epoch) or "constant".
        eval_batch_size: evaluation batch size (>= 1).
        grad_clip: max gradient norm (None = no clipping).
        amp: autocast dtype: "auto" (the default: none on CPU; on CUDA bf16 for training, fp16
            for evaluation), "none", "bf16" or "fp16" (fp32 master parameters; the OT solvers
            always run in fp32).
        compile: compile the training step with ``torch.compile``: "auto" (on CUDA only),
            "on" or "off" (the default until GPU measurements show it helps every method).
    """

    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    adam_eps: float | None = None
    epochs: int | None = None
    epochs_by_shots: tuple[tuple[int, int], ...] | None = None
    batch_size: int | None = None
    warmup_epochs: int | None = None
    warmup_lr: float | None = None
    scheduler: Literal["cosine", "constant"] | None = None
    eval_batch_size: int | None = None
    grad_clip: float | None = None
    amp: AmpChoice | None = None
    compile: CompileChoice | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(
            self,
            lr=(0.0, False),
            adam_eps=(0.0, False),
            warmup_lr=(0.0, False),
            grad_clip=(0.0, False),
        )
        _at_least(
            self,
            momentum=(0.0, True),
            weight_decay=(0.0, True),
            epochs=(0, True),
            warmup_epochs=(0, True),
            batch_size=(1, True),
            eval_batch_size=(1, True),
        )
        for max_shots, epochs in self.epochs_by_shots or ():
            if max_shots < 1 or epochs < 0:
                raise FieldError(
                    f"epochs_by_shots: ({max_shots}, {epochs}) needs max_shots >= 1 and epochs >= 0"
                )

    def merged(self, over: OptimConfig) -> OptimConfig:
        """These settings with every field that ``over`` sets (not None) taken from ``over``."""
        return dataclasses.replace(
            self, **{k: v for k, v in _fields(over).items() if v is not None}
        )

    def epochs_for(self, shots: int | None) -> int | None:
        """Epochs for a run with ``shots`` labelled images per class (None: ``epochs``)."""
        if shots is not None:
            for max_shots, epochs in self.epochs_by_shots or ():
                if shots <= max_shots:
                    return epochs
        return self.epochs


DEFAULT_OPTIM = OptimConfig(
    optimizer="sgd",
    lr=0.002,
    momentum=0.9,
    weight_decay=5e-4,
    adam_eps=1e-8,
    epochs=50,
    epochs_by_shots=(),
    batch_size=32,
    warmup_epochs=1,
    warmup_lr=1e-5,
    scheduler="cosine",
    eval_batch_size=100,
    grad_clip=None,
    amp="auto",
    compile="off",
)


def resolve_optim(
    run: OptimConfig,
    method: OptimConfig,
    shots: int | None,
    *,
    iterations: int | None = None,
    num_classes: int | Callable[[], int] | None = None,
) -> OptimConfig:
    """Library defaults < the method's published values < the run's values. Epochs, when the
    run does not set them: from the method's published ``iterations`` budget for ``shots`` x
    ``num_classes`` training images (:func:`budget_epochs`), else by shots.

    Args:
        run, method: the run's and the method's optimisation settings.
        shots: labelled images per class (None: all).
        iterations: optimiser steps the method's published schedule runs
            (``MethodConfig.iteration_budget``; None: its schedule is in epochs).
        num_classes: classes of the run (needed to turn ``iterations`` into epochs), or a
            function giving them, called only then (it may read the dataset's split listing).
    """
    published = DEFAULT_OPTIM.merged(method)
    epochs = run.epochs
    if epochs is None and iterations is not None and shots is not None:
        classes = num_classes() if callable(num_classes) else num_classes
        if classes:
            epochs = budget_epochs(iterations, shots * classes, published.batch_size)
    if epochs is None:
        epochs = published.epochs_for(shots)
    return dataclasses.replace(published.merged(run), epochs=epochs)


def budget_epochs(iterations: int, train_images: int, batch_size: int) -> int:
    """Epochs of ``ceil(train_images / batch_size)`` steps that run at least ``iterations``
    optimiser steps (at least 1)."""
    steps_per_epoch = math.ceil(train_images / batch_size)
    return max(1, math.ceil(iterations / steps_per_epoch))


# --------------------------------------------------------------------------- run sections
@dataclass(frozen=True)
class BackboneConfig:
    """The frozen CLIP a run adapts (``backbone.*`` on the command line).

    Attributes:
        arch: open_clip architecture (or shipped model / config / JSON path).
        weights: open_clip pretrained tag or local weights file; None = random for open_clip
            architectures (tests only) and the shipped weights for a shipped model; "auto" (the
            default) = the shipped weights for a shipped model (e.g. "tiny-shapes"), else
            "openai".
    """

    arch: str = "ViT-B-16"
    weights: str | None = "auto"

    def __post_init__(self) -> None:
        if self.weights == "auto":
            object.__setattr__(self, "weights", default_weights(self.arch))


def default_weights(arch: str) -> str | None:
    """The weights "auto" stands for: a shipped model's own (None), else open_clip's "openai"."""
    from .backbone.loading import SHIPPED_PRETRAINED

    return None if arch in SHIPPED_PRETRAINED else "openai"


@dataclass(frozen=True)
class MethodSpec:
    """The method a run trains and its options (``method.*`` on the command line).

    Attributes:
        name: registered method (required; see ``promptalign list methods``).
        preset: named preset of the method's config (e.g. ALIGN's "reference").
        options: the method's config fields to change, e.g. {"n_ctx": 4}; converted and checked
            by the method's config class (unknown keys and bad values are errors).
        init_from: a run folder whose prompts (``prompts.safetensors``, loaded strictly) start
            this run, e.g. PLOT++ stage 2 from stage 1; None = the method's own initialisation.
    """

    name: str = ""
    preset: str | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.name:  # converted once the method is known
            plain = {k: _yaml(k, v) if isinstance(v, Text) else v for k, v in self.options.items()}
            object.__setattr__(self, "options", plain)
            return
        cls = method_config_class(self.name)
        if self.preset is not None and self.preset not in cls.PRESETS:
            raise FieldError(
                f"preset: {self.name} has no preset {show(self.preset)}; presets: "
                f"{sorted(cls.PRESETS) or 'none'}"
            )
        opts = check_fields(cls, self.options, "method.options")
        try:
            cls.from_preset(self.preset, **opts)  # the class's own checks (ranges, names)
        except FieldError as e:
            raise ConfigError(f"method.options.{e}") from None
        except ValueError as e:
            raise ConfigError(f"method.options: {e}") from None
        object.__setattr__(self, "options", opts)

    def build(self) -> Any:
        """The method's config instance (published defaults < preset < options)."""
        if not self.name:
            raise ConfigError(
                f"method.name: no method given (--method); one of {', '.join(_method_names())}"
            )
        return method_config_class(self.name).from_preset(self.preset, **self.options)


def method_config_class(name: str) -> type:
    from .registry import METHODS

    try:
        return METHODS.get(name).config_class
    except KeyError as e:
        raise FieldError(f"name: {e.args[0]}") from None


def _method_names() -> list[str]:
    from .registry import METHODS

    return METHODS.names()


def default_workers() -> int:
    """Data-loading workers for this machine: 0 on <= 2 cores (workers only compete with the
    training threads there), else min(4, cores - 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 1)


@dataclass(frozen=True)
class DataConfig:
    """The data a run reads (``data.*`` on the command line).

    Attributes:
        dataset: registered dataset name, or a path to a custom ImageFolder tree / CSV.
        root: the data root (CoOp layout).
        split_file: split JSON for a custom dataset.
        shots: labelled images per class (None = all; >= 1).
        subsample: "all", "base" or "new" classes.
        workers: data-loading worker processes (None = :func:`default_workers`; >= 0).
        skip_corrupt: skip (and count) unreadable images instead of failing.
        max_image_pixels: the largest image (width x height) read; a larger one is refused as a
            possible decompression bomb, or skipped and counted under ``skip_corrupt`` (None =
            Pillow's limit, ``PIL.Image.MAX_IMAGE_PIXELS``: 89,478,485 pixels unless changed).
        crop_scale: (min, max) fraction of the image area the training RandomResizedCrop keeps
            (None = the dataset's: (0.08, 1.0), CoOp/Dassl's, unless its reader sets another;
            e.g. (0.5, 1.0) where objects are small in the frame and 8 % crops cut them out). A
            run folder stores the value used.
    """

    dataset: str = ""
    root: str = "."
    split_file: str | None = None
    shots: int | None = 16
    subsample: Literal["all", "base", "new"] = "all"
    workers: int | None = None
    skip_corrupt: bool = False
    crop_scale: tuple[float, float] | None = None
    max_image_pixels: int | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, shots=(1, True), workers=(0, True), max_image_pixels=(1, True))
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise FieldError(
                    f"crop_scale: {list(self.crop_scale)} must be [min, max] with "
                    "0 < min <= max <= 1 (fractions of the image area), e.g. [0.08, 1.0]"
                )


SEED_LIMIT = 2**40


@dataclass(frozen=True)
class RunSettings:
    """Seed, device and reporting of a run (``run.*`` on the command line).

    Attributes:
        seed: run seed (sampling, initialisation, data order).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        eval_every: evaluate on the ``eval_split`` every N epochs (0 = only at the end).
        progress: show a progress bar (only when stderr is a terminal; never changes results).
        eval_split: the split the run scores itself on, during training (``eval_every``) and at
            the end: "test" (the default), or "val", the few-shot validation split (sampled like
            the training split); with "val" the test split is never read, not even by the
            pre-flight check of the images (what ``promptalign tune`` runs its trials with).
    """

    seed: int = 1
    device: str = "auto"
    eval_every: int = 0
    progress: bool = True
    eval_split: Literal["test", "val"] = "test"

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, eval_every=(0, True))
        if not -SEED_LIMIT < self.seed < SEED_LIMIT:  # seeds are combined with epochs for torch
            raise FieldError(f"seed: {show(self.seed)} must lie between -2**40 and 2**40")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run; a run folder's ``config.yaml`` is one, fully resolved.

    ``KEY=VALUE`` overrides and YAML files set its fields by dotted path
    (:func:`apply_overrides`, :func:`load_yaml`), converted and checked by field type.

    Attributes:
        backbone: the frozen CLIP (``backbone.arch``, ``backbone.weights``).
        method: the method and its options (``method.name``, ``method.options.*``).
        data: the dataset, shots, subset and loading (``data.*``).
        optim: optimisation settings; None fields take the method's published values.
        run: seed, device, progress (``run.*``).
    """

    backbone: BackboneConfig = BackboneConfig()
    method: MethodSpec = MethodSpec()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunSettings = RunSettings()


def apply_overrides(cfg: RunConfig, overrides: list[str] | Mapping[str, Any]) -> RunConfig:
    """Apply dotted overrides like ``optim.lr=0.01`` or ``method.options.n_ctx=8``.

    ``KEY=VALUE`` strings are converted by the type of the field they set (method options by the
    method's config class); a mapping gives values as they are.
    """
    data = to_dict(cfg)
    text = not isinstance(overrides, Mapping)
    items = [_split(o) for o in overrides] if text else list(overrides.items())
    for key, value in items:
        parts = key.split(".")
        node, cls = data, RunConfig
        for i, part in enumerate(parts[:-1]):
            if cls is not None:
                hints = typing.get_type_hints(cls)
                if part not in hints:
                    raise ConfigError(
                        f"unknown key {show('.'.join(parts[: i + 1]))}; allowed: "
                        f"{_keys(parts[:i], hints)}"
                    )
                nxt = hints[part]
                cls = nxt if dataclasses.is_dataclass(nxt) else None
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section")
            node = node.setdefault(part, {})
        if cls is not None:
            hints = typing.get_type_hints(cls)
            if parts[-1] not in hints:
                raise ConfigError(f"unknown key {show(key)}; allowed: {_keys(parts[:-1], hints)}")
        if key == "backbone.arch" and data["backbone"].get("weights") == default_weights(
            str(data["backbone"].get("arch"))
        ):
            data["backbone"]["weights"] = "auto"  # the old arch's default follows the new arch
        node[parts[-1]] = Text(value) if text else value
    return from_dict(RunConfig, data)


def _keys(parents: list[str], hints: Mapping[str, Any]) -> list[str]:
    return sorted(".".join([*parents, h]) for h in hints)


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {show(item)} is not key=value (e.g. optim.lr=0.002)")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def load_yaml_file(path: str | Path) -> Any:
    """The parsed content of a YAML file (UTF-8, optional byte-order mark) through
    :func:`safe_load_yaml`: alias bombs and deep nesting are refused before expansion.

    Raises:
        ConfigError: the file is missing, not UTF-8 or not valid YAML, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = read_text(path)
    except EncodingError as e:
        raise ConfigError(str(e)) from None
    return safe_load_yaml(text, str(path))


def load_yaml(path: str | Path) -> RunConfig:
    """Read a YAML run config (a saved :class:`RunConfig`; missing keys keep their defaults;
    the layout of earlier versions is brought up to date first, :func:`migrate`)."""
    path = Path(path)
    data = load_yaml_file(path) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return from_dict(RunConfig, migrate(data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# optimiser-settings keys that earlier versions kept inside a method's ``optim`` section: an
# iteration budget published in optimiser steps (a method config field since) and the class count
# the run filled in to turn it into epochs (derived from the data since)
_MOVED_FROM_METHOD_OPTIM = {"iterations_per_shot": "iterations_per_shot", "num_classes": None}


def migrate(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run config of an earlier version in today's layout (a copy; a current one is
    returned unchanged): in ``method.options`` (and the options of a wrapped method, at any depth),
    the keys of :data:`_MOVED_FROM_METHOD_OPTIM` move out of an ``optim`` section to the config
    holding it (or are dropped)."""
    out = dict(data)
    method = out.get("method")
    if isinstance(method, Mapping) and isinstance(method.get("options"), Mapping):
        out["method"] = {**method, "options": _migrate_options(method["options"])}
    return out


def _migrate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    optim = options.get("optim")
    if isinstance(optim, Mapping) and any(k in optim for k in _MOVED_FROM_METHOD_OPTIM):
        optim = dict(optim)
        for old, new in _MOVED_FROM_METHOD_OPTIM.items():
            if old in optim:
                value = optim.pop(old)
                if new is not None:
                    options.setdefault(new, value)
        options["optim"] = optim
    for key, value in options.items():  # a wrapped method's options (NPT's base_options)
        if key != "optim" and isinstance(value, Mapping):
            options[key] = _migrate_options(value)
    return options


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
