"""The command line's flags, declared once: flag, the config key it sets, type, help.

:data:`FLAGS` is the table. A command adds the flags it takes by name with :func:`add_flags`
(changing an entry's help or default for itself where its meaning there differs, e.g. ``eval
--dataset``: another dataset to evaluate on), and :func:`config_overrides` gives the config keys a
parsed command's flags set (train, benchmark). A new command takes its flags from here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .common import one_line


def int_at_least(low: int, what: str, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]``; ``what`` says the rule when it is not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{one_line(repr(text))} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{one_line(str(value))} is not allowed: {what}")
        return value

    return parse


positive = int_at_least(1, "must be >= 1")
workers = int_at_least(0, "must be >= 0 (0 loads images in the main process)")
seed = int_at_least(-(2**40) + 1, "a seed lies between -2**40 and 2**40", high=2**40 - 1)
SUBSETS = ("all", "base", "new")
_NO_VALUE = object()


@dataclass(frozen=True)
class Flag:
    """One command-line option.

    Attributes:
        flag: the option, e.g. "--shots".
        key: the run-config key it sets ("data.shots"); None for an option of the command.
        type: how its text is read (None: as text).
        help: what it does.
        choices, metavar: as argparse takes them.
        switch: for an option without a value: the value it sets (its config key's, or True).
    """

    flag: str
    key: str | None = None
    type: Callable[[str], Any] | None = None
    help: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: Any = _NO_VALUE

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add(self, parser: argparse.ArgumentParser, **changes: Any) -> None:
        """Add the option to ``parser``; ``changes``: argparse arguments that differ there."""
        if self.switch is not _NO_VALUE:
            kwargs: dict[str, Any] = {"action": "store_true", "help": self.help}
        else:
            kwargs = {"type": self.type, "help": self.help, "metavar": self.metavar}
            kwargs["choices"] = list(self.choices) if self.choices else None
        kwargs.update(changes)
        parser.add_argument(self.flag, **{k: v for k, v in kwargs.items() if v is not None})


FLAGS = {
    f.flag: f
    for f in (
        # ---------------------------------------------------------------- run-config keys
        Flag("--method", "method.name", help="method name (promptalign list methods)"),
        Flag(
            "--preset",
            "method.preset",
            help="named preset of the method's config (e.g. align's 'reference')",
        ),
        Flag(
            "--dataset",
            "data.dataset",
            help="dataset name (promptalign list datasets) or a folder / CSV path",
        ),
        Flag("--data-root", "data.root", help="folder holding the datasets (CoOp layout)"),
        Flag("--shots", "data.shots", positive, "labelled images per class (>= 1)"),
        Flag("--subsample", "data.subsample", choices=SUBSETS, help="class subset"),
        Flag("--seed", "run.seed", seed, "run seed (sampling, initialisation, data order)"),
        Flag("--arch", "backbone.arch", help="backbone architecture (default ViT-B-16)"),
        Flag(
            "--weights",
            "backbone.weights",
            help="open_clip pretrained tag or local weights file",
        ),
        Flag("--device", "run.device", help="auto, cpu, cuda, cuda:1, ..."),
        Flag(
            "--workers",
            "data.workers",
            workers,
            "data-loading workers (>= 0; results do not depend on it)",
        ),
        Flag(
            "--split-file",
            "data.split_file",
            help="split JSON (train/val/test lists) for a custom ImageFolder / CSV dataset "
            "(= data.split_file)",
        ),
        Flag(
            "--init-from",
            "method.init_from",
            metavar="RUN",
            help="start from the prompts of a finished run of the same method (PLOT++ stage 2)",
        ),
        Flag("--no-progress", "run.progress", switch=False, help="no progress bar"),
        # ---------------------------------------------------------------- command options
        Flag("--out", help="output folder"),
        Flag("--json", switch=True, help="print JSON"),
        Flag("--classes", help="comma-separated class names (default: the run's classes)"),
        Flag("--topk", type=positive, help="top classes per image (>= 1)"),
    )
}


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[str], **changes: Any) -> None:
    """Add the table's ``flags`` to ``parser``; ``changes``: per flag (by its dest, e.g.
    ``data_root``) the argparse arguments that differ for this command."""
    for name in flags:
        entry = FLAGS[name]
        entry.add(parser, **changes.get(entry.dest, {}))


def config_overrides(args: argparse.Namespace, flags: Iterable[str]) -> dict[str, Any]:
    """The run-config keys the given ``flags`` set in a parsed command (only those given).

    ``--arch`` of a shipped model without ``--weights`` means the model's own shipped weights
    (``backbone.weights`` None), not the config default ('openai', which only open_clip
    architectures have)."""
    from promptalign.backbone.loading import SHIPPED_PRETRAINED

    out: dict[str, Any] = {}
    for name in flags:
        entry = FLAGS[name]
        value = getattr(args, entry.dest, None)
        if entry.key is None or value is None:
            continue
        if entry.switch is _NO_VALUE:
            out[entry.key] = value
        elif value:
            out[entry.key] = entry.switch
    if getattr(args, "arch", None) in SHIPPED_PRETRAINED and getattr(args, "weights", None) is None:
        out["backbone.weights"] = None
    return out
