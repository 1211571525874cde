"""Launchers: where and how the jobs of a benchmark grid (or any other tasks) run.

A launcher gets the grid's unfinished jobs as :class:`~promptalign.benchmark.grid.Task` objects
and has each one run by :func:`~promptalign.benchmark.grid.execute` somewhere: in this process
(``inline``, the default), in worker processes on this machine (``local``, one GPU each) or as
scheduler jobs (``slurm``, through submitit). ``execute`` claims the job's folder, trains or
resumes it and writes its result or its error, so results, retries and the folder's states are
the same whatever the launcher; a launcher only decides where and when (DomainBed's
``command_launchers.py`` and Hydra's submitit launcher work the same way).

A launcher runs any picklable task of the :class:`LaunchTask` shape, not only benchmark jobs:
``promptalign tune`` launches its study's workers the same way. The folder that records the
submissions (a :class:`~promptalign.benchmark.grid.Grid`, a study folder) is a
:class:`~promptalign.benchmark.grid.Submissions`.

Adding a launcher is one file in this package (it registers itself when the registry loads the
package), or a module of your own named as ``--launcher my_module:name``::

    from promptalign.benchmark.launchers import LAUNCHERS, Launcher
    from promptalign.benchmark.grid import execute

    @LAUNCHERS.register("mine")
    class MyLauncher(Launcher):
        def run(self, tasks, grid, *, backbone=None, on_done=None):
            return [self.done(execute(t), t, on_done) for t in tasks]

Options come from a frozen dataclass ``Options`` on the class (its fields are the keys of a YAML
launcher file, ``--launcher-config``); ``check`` refuses bad settings before anything runs;
``cancel`` stops what a submission recorded in the grid folder started.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from ...config import ConfigError
from ...registry import Registry
from ..grid import JobState, Outcome, Submissions
from ..jobs import Job

LAUNCHERS: Registry = Registry("launcher", ["promptalign.benchmark.launchers"])

OnDone = Callable[[Job, dict], None]


class LaunchTask(Protocol):
    """What a launcher runs (picklable; :class:`~promptalign.benchmark.grid.Task` is one).

    Attributes:
        key: its name in records and outcomes, unique within a submission.
        folder: its folder: claim (``.lock``), attempts (``state.json``), ``result.json``,
            ``error.txt`` (:func:`~promptalign.benchmark.grid.execute` writes them).
        retries: failed attempts retried in the same process.
        package: the submitter's ``promptalign`` folder ("" = not checked).
        what: a few words on the task, in its claim.
        device: the device it computes on (``run.device``).
        name: a short word for the scheduler's job name.
    """

    key: str
    folder: Path
    retries: int
    package: str
    what: str
    device: str
    name: str

    def work(self, backbone=None) -> dict[str, Any]:
        """Do the task in this process; returns its result."""

    def progress(self) -> tuple[int, int, int] | None:
        """(stage, epochs done, epochs) of its training run, when it has one."""

    def result_record(self, result: dict[str, Any]) -> dict[str, Any]:
        """What ``result.json`` holds ( ``result`` under the key "result")."""

    def state(self) -> JobState:
        """Its state, read from its folder."""


class LauncherError(ConfigError):
    """A launcher cannot run as asked (unknown name, bad option, missing tool); nothing ran."""


class StillRunning(KeyboardInterrupt):
    """The submitting process was interrupted while its jobs go on elsewhere (a cluster); the
    message says which jobs and how to follow or cancel them."""


@dataclass(frozen=True)
class NoOptions:
    pass


class Launcher:
    """Base class of launchers (see the module docstring).

    Attributes:
        Options: frozen dataclass of this launcher's settings.
        detached: True when jobs outlive the submitting process (scheduler jobs).
    """

    Options: type = NoOptions
    detached = False
    registered_name = "launcher"

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], source: str = "") -> Launcher:
        """Build from a mapping of option name -> value (None values are left at defaults);
        an unknown option is a LauncherError naming the keys this launcher has."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = [k for k in settings if k not in fields]
        if unknown:
            where = f"{source}: " if source else ""
            raise LauncherError(
                f"{where}launcher {cls.registered_name!r} has no option {unknown[0]!r}; its "
                f"options: {', '.join(fields) or 'none'}"
            )
        given = {k: v for k, v in settings.items() if v is not None}
        try:
            return cls(cls.Options(**given))
        except (TypeError, ValueError) as e:
            raise LauncherError(f"launcher {cls.registered_name!r}: {e}") from None

    def workers(self) -> int:
        """Tasks this launcher runs at once unless told otherwise (the workers a tuning study
        launches)."""
        return 1

    def check(self, tasks: Sequence[LaunchTask]) -> None:
        """Refuse settings this machine cannot run (LauncherError), before anything runs."""

    def run(
        self,
        tasks: Sequence[LaunchTask],
        grid: Submissions,
        *,
        backbone=None,
        on_done: OnDone | None = None,
    ) -> list[Outcome]:
        """Run (or submit and follow) every task; returns their outcomes. ``grid`` records the
        submission (any :class:`~promptalign.benchmark.grid.Submissions`); ``on_done`` is
        called with (job, result) for benchmark jobs."""
        raise NotImplementedError

    def cancel(self, grid: Submissions, submission: dict[str, Any]) -> str:
        """Stop what ``submission`` (a record in the grid folder) started; returns what was
        done, in words."""
        return stop_submitter(submission)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def done(outcome: Outcome, task: LaunchTask, on_done: OnDone | None) -> Outcome:
        if on_done is not None and outcome.status == "ran" and outcome.result is not None:
            on_done(task.job, outcome.result)
        return outcome

    def record(self, grid: Submissions, tasks: Sequence[LaunchTask], **extra: Any) -> str:
        """Record this process's submission of ``tasks`` in the grid folder; returns its id."""
        sid = extra.pop("id", None) or uuid.uuid4().hex[:12]
        grid.add_submission(
            {
                "id": sid,
                "launcher": self.registered_name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "submitted": time.time(),
                "state": "active",
                "jobs": [t.key for t in tasks],
                **extra,
            }
        )
        return sid


def stop_submitter(submission: dict[str, Any]) -> str:
    """Interrupt (as Ctrl-C would) the process that runs a submission's jobs itself, when it runs
    on this host; its jobs stay resumable."""
    host, pid = submission.get("host"), int(submission.get("pid", 0))
    if host != socket.gethostname():
        return f"its jobs run in process {pid} on {host}: stop it there (Ctrl-C)"
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return f"its process {pid} has already ended"
    except PermissionError:
        return f"process {pid} belongs to another user: it was not stopped"
    return f"interrupted process {pid} on {host} (its jobs stay resumable)"


def get_launcher(
    name: str, settings: Mapping[str, Any] | None = None, source: str = ""
) -> Launcher:
    """The launcher ``name`` built from ``settings``: a registered name, or ``module:name`` for
    a launcher registered by a module of your own (imported first)."""
    if ":" in name:
        module, _, name = name.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise LauncherError(
                f"--launcher {module}:{name}: cannot import {module} ({e})"
            ) from None
    if name not in LAUNCHERS:
        raise LauncherError(
            f"--launcher {name}: unknown launcher; choose from {', '.join(LAUNCHERS.names())} "
            "(or module:name for one of your own)"
        )
    return LAUNCHERS.get(name).from_settings(settings or {}, source)


def read_launcher_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """A YAML launcher file: ``launcher: NAME`` (optional) and that launcher's options."""
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise LauncherError(f"--launcher-config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise LauncherError(f"--launcher-config {path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LauncherError(f"--launcher-config {path}: expected a mapping of option: value")
    name = data.pop("launcher", None)
    return (str(name) if name is not None else None), data


__all__ = [
    "LAUNCHERS",
    "LaunchTask",
    "Launcher",
    "LauncherError",
    "NoOptions",
    "StillRunning",
    "get_launcher",
    "read_launcher_file",
    "stop_submitter",
]
