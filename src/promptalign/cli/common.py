"""What every command of the command line shares: one-line errors, input checks, tables."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
from pathlib import Path


class UsageError(Exception):
    """A bad command-line input found before any work starts: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``promptalign CMD: error: MESSAGE (see ... --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# PyTorch's advice to load untrusted files unsafely must never be repeated to users
_UNSAFE_LOAD = re.compile(r"This file can still be loaded.*?(checkpoint\.|$)", re.IGNORECASE)
_UNSAFE_FLAG = re.compile(r"weights_only\s*=\s*False", re.IGNORECASE)
# the longest error line printed; what a message quotes beyond it is cut (and the work with it)
MAX_MESSAGE = 2000


def one_line(message: str) -> str:
    """An error message as one line of at most :data:`MAX_MESSAGE` characters, without terminal
    escapes or unsafe-loading advice; linear in the length of ``message``."""
    text = message[: 4 * MAX_MESSAGE]
    text = _ANSI.sub("", text)
    if "still be loaded" in text.lower():
        text = _UNSAFE_LOAD.sub("", text)
    if _UNSAFE_FLAG.search(text):  # drop each sentence part that advises weights_only=False
        parts = re.split(r"([.;()])", text)  # pieces at even, delimiters at odd positions
        keep, i = [], 0
        while i < len(parts):
            if i % 2 == 0 and _UNSAFE_FLAG.search(parts[i]):
                i += 2 if i + 1 < len(parts) and parts[i + 1] in ".;" else 1
                continue
            keep.append(parts[i])
            i += 1
        text = "".join(keep)
    text = " ".join(text.split())
    text = text.replace("( ", "(").replace(" )", ")")
    if len(message) > MAX_MESSAGE or len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE].rstrip()}... (message cut at {MAX_MESSAGE} characters)"
    return text


def os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    hint = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EACCES: "choose a writable folder",
        errno.EPERM: "choose a writable folder",
        errno.EROFS: "the file system is read-only; choose another --out",
        errno.EEXIST: "choose another path",
        errno.ENOTDIR: "a parent of the path is a file",
    }
    reason = e.strerror or str(e)
    extra = hint.get(e.errno or -1)
    return f"{where}{reason}" + (f"; {extra}" if extra else "")


# --------------------------------------------------------------------------- input checks
def check_device(device: str | None, flag: str = "--device") -> None:
    """``cuda`` without a usable GPU is a usage error, not a traceback from deep inside torch."""
    if not device or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"{flag} {device}: no CUDA GPU is available to PyTorch on this machine; "
            "use --device cpu (or auto)"
        )
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UsageError(
            f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) visible; "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )


def check_out(out: str, data_dir: tuple[Path, bool] | None = None) -> None:
    """``--out`` must be a writable folder path outside the dataset (``data_dir``: the dataset's
    folder and whether folders inside it are refused too)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder; choose a new folder path")
    target = path.resolve()
    if data_dir is not None:
        data, nested = data_dir[0].resolve(), data_dir[1]
        if target == data or (nested and data in target.parents):
            where = "is" if target == data else "is inside"
            raise UsageError(
                f"--out {out}: {where} the dataset folder {data_dir[0]}; run files must "
                "not be written into the data, choose a folder elsewhere"
            )
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out}: cannot write into {existing} (permission denied); "
            "choose a writable folder"
        )


def class_list(text: str | None, flag: str = "--classes") -> list[str] | None:
    """Comma-separated class names: None when not given; no name at all, or a repeated one, is
    an error naming ``flag``."""
    from promptalign.engine.inference import check_classnames

    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise UsageError(f"{flag} {text!r}: names no class; give comma-separated class names")
    return check_classnames(names, flag)


# --------------------------------------------------------------------------- output
def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def rerun_interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C line of a command that continues where it stopped when run again."""
    return f"; finished work is kept, re-run to go on: {shlex.join(['promptalign', *args.argv])}"
