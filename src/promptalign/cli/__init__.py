"""The `promptalign` command line: turns arguments into a config and calls library functions.

One module per command group adds its subcommands (:data:`COMMANDS`, in the order ``--help`` lists
them): :mod:`.tools` (list, demo, explain, selfcheck), :mod:`.runs` (train, eval, predict),
:mod:`.bench` (benchmark), :mod:`.tune` (tune). Their flags come from one table, :mod:`.flags`; what
they share (one-line errors, input checks) is in :mod:`.common`. This module parses, runs the
command and turns what goes wrong into one line and an exit status: 0 done, 1 a failure the command
reports (or a bug, with -v for the traceback), 2 bad input, 3 benchmark jobs left to other
processes, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from . import bench, runs, tools, tune
from .common import Parser, UsageError, one_line, os_error_line

# each adds one command to the subcommands: a new command is one module and one entry here
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    tools.add_list,
    runs.add_train,
    runs.add_eval,
    runs.add_predict,
    bench.add_benchmark,
    tune.add_tune,
    tools.add_demo,
    tools.add_explain,
    tools.add_selfcheck,
)


def build_parser() -> argparse.ArgumentParser:
    from promptalign import __version__

    p = Parser(
        prog="promptalign",
        description="Prompt learning for frozen CLIP-style models (ALIGN, CoOp, MaPLe, ...).",
    )
    p.add_argument("--version", action="version", version=f"promptalign {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def _launched_rank() -> int:
    """This process's rank under torchrun (RANK in the environment), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _CtrlC:
    """Ctrl-C for every command: the first SIGINT raises KeyboardInterrupt, so the command
    unwinds (files closed, temporaries removed, a run folder left resumable) and :func:`main`
    prints one line and returns 130; a second SIGINT while it unwinds exits at once (130).

    Active only in the main thread, and only where SIGINT still has Python's default handler;
    the previous handler is restored on exit."""

    def __init__(self, line: Callable[[], str]):
        self.line = line  # the one line to print (the command's own hint included)
        self.count = 0
        self.previous = None

    def __enter__(self) -> _CtrlC:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt
        try:  # the second Ctrl-C: no more unwinding
            line = self.line()
        except Exception:  # noqa: BLE001 - the hint is best effort here
            line = "promptalign: interrupted"
        os.write(2, (line + "\n").encode(errors="replace"))
        os._exit(130)


def _interrupted_line(args: argparse.Namespace) -> str:
    """``promptalign CMD: interrupted`` and the command's own hint (``args.interrupted``)."""
    hint = getattr(args, "interrupted", None)
    tail = ""
    if hint is not None:
        try:
            tail = hint(args)
        except Exception:  # noqa: BLE001 - a hint that fails must not hide the interruption
            tail = ""
    name = f"promptalign {args.command}" if args.command else "promptalign"
    return one_line(f"{name}: interrupted{tail}")


def main(argv: list[str] | None = None) -> int:
    state = argparse.Namespace(command=None)
    with _CtrlC(lambda: _interrupted_line(state)) as ctrl_c:
        try:
            return _main(argv, state)
        except KeyboardInterrupt:
            ctrl_c.count = max(ctrl_c.count, 1)  # a second Ctrl-C from now on exits at once
            if _launched_rank() == 0:  # under torchrun every rank gets it; one line is enough
                print(_interrupted_line(state), file=sys.stderr)
            return 130


def _main(argv: list[str] | None, state: argparse.Namespace) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    bad = next((a for a in argv if "\x00" in a), None)
    if bad is not None:  # a shell cannot pass one; a program calling main() can
        print(
            f"promptalign: error: argument {one_line(repr(bad))} holds a NUL character",
            file=sys.stderr,
        )
        return 2
    try:  # a usage error (or --help) ends parsing with its exit code, returned like any other
        args, extra = parser.parse_known_args(argv)
        if extra:
            # argparse binds a trailing nargs="*" positional right after a leading positional
            # (benchmark PROTOCOL); KEY=VALUE overrides given after the options arrive here
            if getattr(args, "overrides", None) is None or not all("=" in e for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = list(args.overrides) + extra
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    state.__dict__.update(vars(args))
    args = state  # one namespace: what a command records (e.g. its progress) reaches the hint
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; what goes wrong is one line and an exit status."""
    from promptalign.backbone import BackboneError
    from promptalign.backbone.towers import UnsupportedTower
    from promptalign.config import ConfigError
    from promptalign.data import DatasetError
    from promptalign.engine import CheckpointError, NonFiniteError
    from promptalign.io import EncodingError

    def fail(message: str) -> int:
        print(f"promptalign {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2

    try:
        if _launched_rank() > 0:  # under torchrun only rank 0 reports: one result, not one per rank
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return args.func(args)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `promptalign list backbones | head`: the reader left; stop quietly
        _silence_stdout()
        return 0
    except (
        UsageError,
        ConfigError,
        DatasetError,
        CheckpointError,
        NonFiniteError,
        BackboneError,
        UnsupportedTower,
        EncodingError,
    ) as e:
        return fail(str(e))
    except (FileExistsError, FileNotFoundError) as e:
        return fail(str(e) if not e.strerror else os_error_line(e))
    except KeyError as e:
        return fail(str(e.args[0]) if e.args else repr(e))
    except OSError as e:  # read-only folder, disk full, ...
        return fail(os_error_line(e))
    except Exception as e:  # noqa: BLE001 - a bug: one line by default, the traceback with -v
        if args.verbose:
            raise
        print(
            f"promptalign {args.command}: internal error: "
            f"{one_line(f'{type(e).__name__}: {e}')}; this is a bug in promptalign, please "
            "report it with the command (run it again with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


__all__ = ["UsageError", "build_parser", "main"]
