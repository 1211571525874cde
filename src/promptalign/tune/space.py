"""Search spaces: which config keys a study searches, over which values.

A search space is a list of :class:`Param`, one per dotted config key (any key of a run config,
method options included: ``optim.lr``, ``method.options.n_ctx``). It is written on the command
line or in a YAML file:

* ``KEY=LOW..HIGH``: a range; integer or real by the type of the field (``optim.epochs=5..20``
  draws integers, ``optim.lr=1e-4..1e-2`` reals); ``:log`` after it draws on a log scale
  (``optim.lr=1e-4..1e-2:log``);
* ``KEY=A,B,C``: a choice among values, each converted by the field's type
  (``method.options.n_ctx=2,4,8``, ``optim.scheduler=cosine,constant``);
* in a YAML file (``--space FILE``), one entry per key: the same text (``optim.lr:
  1e-4..1e-2:log``), a list of choices (``method.options.n_ctx: [2, 4, 8]``; also for values
  that hold commas, such as lists), or a mapping ``{low: 1e-4, high: 1e-2, log: true}``.

Every bound and choice is checked as a value of its key before anything runs (an unknown key, a
range on a field that is not a number, ``low > high``, a value the field refuses), so a typo
costs one line, not a study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import (
    ConfigError,
    RunConfig,
    Text,
    apply_overrides,
    check_value,
    load_yaml_file,
    method_config_class,
    show,
)

# keys a study sets itself (the flag or reason in the message)
RESERVED = {
    "method.name": "it is the study's --method",
    "data.dataset": "it is the study's --dataset",
    "data.shots": "it is the study's --shots (the validation split is sampled with it)",
    "data.root": "it is the study's --data-root",
    "run.seed": "the trials use the study's first --seeds value",
    "run.eval_split": "trials always score on the validation split, the final runs on test",
}
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^(?P<low>{_NUM})\.\.(?P<high>{_NUM})(?P<log>:log)?$")


@dataclass(frozen=True)
class Param:
    """One searched config key.

    Attributes:
        key: the dotted config key (also the parameter's name in the study).
        kind: ``float`` or ``int`` (a range), ``choice`` (a list of values).
        low, high: the range's bounds (inclusive).
        log: draw the range on a log scale.
        choices: the values of a choice, as the config holds them.
    """

    key: str
    kind: Literal["float", "int", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna ``trial`` draws for this key (the same value again for a trial
        that already drew it)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        picked = trial.suggest_categorical(self.key, self.optuna_choices())
        return self.choices[self.optuna_choices().index(picked)]

    def optuna_choices(self) -> list[Any]:
        """The choices as Optuna stores them: plain values, lists and mappings as JSON text."""
        return [c if _plain(c) else json.dumps(c) for c in self.choices]

    def grid_values(self) -> list[Any] | None:
        """Every value, for a grid search (None for a real range)."""
        if self.kind == "choice":
            return self.optuna_choices()
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1))
        return None

    def value_of(self, stored: Any) -> Any:
        """The config value of a value as the study stores it."""
        if self.kind == "choice":
            return self.choices[self.optuna_choices().index(stored)]
        return stored

    def describe(self) -> str:
        """The parameter as typed on the command line."""
        if self.kind == "choice":
            return f"{self.key}={','.join(override_text(c) for c in self.choices)}"
        return f"{self.key}={self.low}..{self.high}{':log' if self.log else ''}"

    def to_dict(self) -> dict[str, Any]:
        d = {"key": self.key, "kind": self.kind}
        if self.kind == "choice":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Param:
        return cls(
            str(d["key"]),
            d["kind"],
            d.get("low"),
            d.get("high"),
            bool(d.get("log", False)),
            tuple(d.get("choices", ())),
        )


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def override_text(value: Any) -> str:
    """A config value as the text of a ``KEY=VALUE`` override that gives it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value) if isinstance(value, str) else repr(value)
    return json.dumps(value)


# --------------------------------------------------------------------------- field types
def field_type(cfg: RunConfig, key: str) -> Any:
    """The type annotation of the config field ``key`` (method options by the method of
    ``cfg``); an unknown key is a ConfigError listing the allowed ones."""
    parts = key.split(".")
    if parts[:2] == ["method", "options"]:
        cls = method_config_class(cfg.method.name)
        names = [f.name for f in dataclasses.fields(cls)]
        if len(parts) != 3 or parts[2] not in names:
            raise ConfigError(
                f"unknown key {show(key)}: {cfg.method.name} has no option "
                f"{show('.'.join(parts[2:]))}; its options: {names}"
            )
        return typing.get_type_hints(cls)[parts[2]]
    cls: Any = RunConfig
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        where = ".".join(parts[:i])
        if part not in names:
            allowed = sorted(f"{where}.{n}" if where else n for n in names)
            raise ConfigError(f"unknown key {show(key)}; allowed: {allowed}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a section: search one of its keys ({key}.KEY)")
            return tp
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section (in {show(key)})")
        cls = tp
    raise AssertionError("unreachable")


def _number_kind(tp: Any) -> str | None:
    """``int`` / ``float`` for a number field (optional or not), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kinds = {_number_kind(a) for a in typing.get_args(tp) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return {int: "int", float: "float"}.get(tp)


# --------------------------------------------------------------------------- parsing
def _split_choices(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ["a", "b", "[1,2]"]: commas inside brackets or braces stay."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur]


def is_search(text: str) -> bool:
    """Whether the value of a ``KEY=VALUE`` item is a search (``LOW..HIGH`` of numbers, or
    ``A,B,C`` outside brackets) rather than one fixed value."""
    v = text.strip()
    return bool(_RANGE.match(v)) or (v[:1] not in "[{" and len(_split_choices(v)) > 1)


def split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """``KEY=VALUE`` items as (searched, fixed): ``KEY=LOW..HIGH`` and ``KEY=A,B,C`` are
    searched, any other ``KEY=VALUE`` sets that value for every run of the study."""
    searched, fixed = [], []
    for item in items:
        (searched if is_search(item.partition("=")[2]) else fixed).append(item)
    return searched, fixed


def parse_item(item: str, base: RunConfig, where: str = "") -> Param:
    """One ``KEY=LOW..HIGH[:log]`` or ``KEY=A,B,C`` item (see the module docstring)."""
    if "=" not in item:
        raise ConfigError(
            f"{where}{show(item)} is not KEY=LOW..HIGH or KEY=A,B,C (e.g. optim.lr=1e-4..1e-2:log)"
        )
    key, _, text = item.partition("=")
    return parse_entry(key.strip(), text.strip(), base, where)


def parse_entry(key: str, spec: Any, base: RunConfig, where: str = "") -> Param:
    """The :class:`Param` of ``key`` from text (``LOW..HIGH[:log]``, ``A,B,C``), a list of
    choices or a mapping ``{low, high, log}``, checked against ``base``."""
    label = f"{where}{key}"
    if not key:
        raise ConfigError(f"{where}a search entry has no key (KEY=LOW..HIGH or KEY=A,B,C)")
    if key in RESERVED:
        raise ConfigError(f"{label}: cannot be searched: {RESERVED[key]}")
    tp = field_type(base, key)
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ConfigError(f"{label}: no values: give LOW..HIGH or A,B,C")
        m = _RANGE.match(text)
        if m:
            return _range(key, where, tp, m["low"], m["high"], bool(m["log"]), base)
        items = _split_choices(text)
        if len(items) < 2:
            raise ConfigError(
                f"{label}={show(text)}: one value is not a search: give LOW..HIGH or A,B,C "
                f"(or set it for every trial as {key}={text})"
            )
        return _choice(key, where, tp, [Text(i.strip()) for i in items], base)
    if isinstance(spec, (list, tuple)):
        return _choice(key, where, tp, list(spec), base)
    if isinstance(spec, Mapping):
        extra = sorted(set(spec) - {"low", "high", "log"})
        if extra or "low" not in spec or "high" not in spec:
            raise ConfigError(
                f"{label}: a range is {{low: L, high: H}} with an optional log: true"
                + (f"; unknown key(s) {extra}" if extra else "")
            )
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{label}: log must be true or false, not {show(log)}")
        return _range(key, where, tp, spec["low"], spec["high"], log, base)
    raise ConfigError(
        f"{label}: {show(spec)} is not a search: give LOW..HIGH, a list of choices or "
        "{low: L, high: H}"
    )


def _checked(key: str, where: str, tp: Any, value: Any, base: RunConfig) -> Any:
    """``value`` converted by the field's type and accepted by the config's own checks."""
    try:
        converted = check_value(key, tp, value)
        apply_overrides(base, {key: converted})
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return converted


def _range(key: str, where: str, tp: Any, low: Any, high: Any, log: bool, base: RunConfig) -> Param:
    label = f"{where}{key}"
    kind = _number_kind(tp)
    if kind is None:
        raise ConfigError(
            f"{label}: a range needs a number field, and {key} is not one; give its choices "
            f"as {key}=A,B,C"
        )
    number = int if kind == "int" else float
    lo = _checked(key, where, number, Text(str(low)) if isinstance(low, str) else low, base)
    hi = _checked(key, where, number, Text(str(high)) if isinstance(high, str) else high, base)
    if lo > hi:
        raise ConfigError(f"{label}={low}..{high}: low {lo} is above high {hi}; give LOW..HIGH")
    if log and lo <= 0:
        raise ConfigError(f"{label}={low}..{high}:log: a log scale needs low > 0")
    if kind == "float" and not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{label}: the range's bounds must be finite numbers")
    return Param(key, kind, lo, hi, log)


def _choice(key: str, where: str, tp: Any, values: Sequence[Any], base: RunConfig) -> Param:
    label = f"{where}{key}"
    if not values:
        raise ConfigError(f"{label}: no choices given")
    converted = []
    for v in values:
        if isinstance(v, str) and not v.strip():
            raise ConfigError(f"{label}: an empty choice (two commas in a row?)")
        converted.append(_checked(key, where, tp, v, base))
    plain = [json.dumps(c, sort_keys=True, default=str) for c in converted]
    if len(set(plain)) < len(plain):
        raise ConfigError(f"{label}: a choice is given twice")
    return Param(key, "choice", choices=tuple(converted))


def parse_space(
    items: Sequence[str] = (), *, base: RunConfig, space_file: str | Path | None = None
) -> list[Param]:
    """The search space of ``items`` (``KEY=LOW..HIGH[:log]``, ``KEY=A,B,C``) and of the YAML
    ``space_file``, checked against the trials' ``base`` config.

    Raises:
        ConfigError: an empty or malformed space, an unknown key, a range with low > high, a
            value the key's field refuses, a key searched twice; the message names it.
    """
    params: list[Param] = []
    if space_file is not None:
        data = load_yaml_file(space_file)
        where = f"{space_file}: "
        if data is None:
            raise ConfigError(f"{where}the search space file is empty")
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where}expected a mapping of KEY: LOW..HIGH, KEY: [A, B, C] or "
                "KEY: {low: L, high: H}"
            )
        for key, spec in data.items():
            if isinstance(spec, Mapping) and not {"low", "high"} & set(spec):
                raise ConfigError(
                    f"{where}{key}: write dotted keys ({key}.KEY: ...), not nested sections"
                )
            params.append(parse_entry(str(key), spec, base, where))
    params += [parse_item(i, base) for i in items]
    if not params:
        raise ConfigError(
            "no search space: give KEY=LOW..HIGH[:log] or KEY=A,B,C (e.g. "
            "optim.lr=1e-4..1e-2:log), or a YAML file with --space"
        )
    seen: set[str] = set()
    for p in params:
        if p.key in seen:
            raise ConfigError(f"{p.key} is searched twice; give it once")
        seen.add(p.key)
    return params
