"""The grid folder: the one source of truth about a benchmark grid, whatever runs its jobs.

Layout of ``<out>/<protocol>/``::

    grid.json       format, promptalign version, every job of the grid (key -> folder) and every
                    submission (launcher, scheduler ids, who submitted, cancelled or not)
    jobs/<dataset>/<method>/shots<K>-seed<S>-<fingerprint>/
        job.json    the job and its run config, written when the job is planned
        .lock       while a process runs the job: host, process, scheduler job id and heartbeat
                    (:mod:`promptalign.claim`, the same claim ``train`` puts on a run folder)
        state.json  every attempt: where and when it ran, the epoch it resumed from, how it ended
        error.txt   the last failed attempt's traceback
        result.json the job's metrics and config: the job is finished
        run/        the training run folder (run-stage<i>/ for multi-run recipes)
    <protocol>.md/.csv, fewshot-*.png   tables and plots, from whatever has finished

A job is *finished* (``result.json``), *running* (a live claim: host and scheduler job id),
*failed* (its last attempt ended with an error and nothing runs it) or *pending*. Any process on
any host that sees the folder reads the same states, so ``promptalign benchmark status`` works
from a login node while the jobs run on compute nodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promptalign

from ..claim import LOCK, Claim, Holder, holder_of
from ..config import ConfigError, RunConfig, to_dict
from ..engine.build import _flatten
from ..engine.checkpoint import RUN_INFO, write_text
from .jobs import Job, recipe_stages, run_job

log = logging.getLogger(__name__)

GRID_FORMAT = 1
MANIFEST = "grid.json"
JOB_INFO = "job.json"
STATE = "state.json"
RESULT = "result.json"
ERROR = "error.txt"
_MANIFEST_LOCK = ".grid.lock"


class GridError(ConfigError):
    """The grid folder cannot be used as asked (another format, other settings); nothing in it
    was changed."""


@dataclass(frozen=True)
class Task:
    """One job as a launcher hands it to whatever runs it (picklable).

    It has what :func:`execute` and the launchers use of any task (``key``, ``folder``,
    ``retries``, ``package``, ``what``, ``device``, ``name``, ``work``, ``progress``,
    ``result_record``, ``state``; see :class:`.launchers.LaunchTask`): other tasks (e.g. the
    workers of ``promptalign tune``) provide the same and run on the same launchers.

    Attributes:
        job: the job.
        config: its run config.
        job_dir: its folder.
        retries: failed attempts retried in the same process before the job counts as failed.
        package: the folder of the submitter's ``promptalign``; a worker importing another one
            refuses to run (its results would not be the submitter's).
    """

    job: Job
    config: RunConfig
    job_dir: Path
    retries: int = 0
    package: str = ""
    what = "benchmark job"  # in its claim, for whoever finds it

    @property
    def key(self) -> str:
        return self.job.key

    @property
    def folder(self) -> Path:
        return self.job_dir

    @property
    def device(self) -> str:
        return self.config.run.device

    @property
    def name(self) -> str:
        return self.job.protocol

    def work(self, backbone=None) -> dict[str, Any]:
        return run_job(self.job, self.config, self.job_dir, backbone)

    def progress(self) -> tuple[int, int, int] | None:
        return _run_progress(self.job_dir, self.job)

    def result_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"job": self.job.to_dict(), "result": result, "config": to_dict(self.config)}

    def state(self) -> JobState:
        return job_state(self.job, self.job_dir)


@dataclass
class Outcome:
    """What happened to one task: ``ran``, ``skipped`` (finished before), ``failed``, ``busy``
    (another process runs it; ``detail`` says which) or ``lost`` (its scheduler job ended without
    a result or an error: cancelled, killed, out of memory)."""

    key: str
    status: str
    result: dict | None = None
    detail: str = ""


def package_folder() -> str:
    return str(Path(promptalign.__file__).resolve().parent)


# --------------------------------------------------------------------------- one job, anywhere
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_progress(job_dir: Path, job: Job) -> tuple[int, int, int] | None:
    """(stage, epochs done, epochs) of the job's latest run folder, None before its first
    checkpoint."""
    stages = len(recipe_stages(job.method))
    names = ["run"] if stages == 1 else [f"run-stage{i + 1}" for i in range(stages)]
    for i in reversed(range(len(names))):
        info = _read_json(job_dir / names[i] / RUN_INFO)
        if info is not None:
            epochs = info.get("promptalign_config", {}).get("optim", {}).get("epochs")
            return i + 1, int(info.get("epoch", 0)), int(epochs or 0)
    return None


def _record_attempt(job_dir: Path, attempt: dict[str, Any]) -> None:
    """Add or update (same ``attempt`` number) one attempt in the job's state.json."""
    state = _read_json(job_dir / STATE) or {"attempts": []}
    attempts = [a for a in state.get("attempts", []) if a.get("attempt") != attempt["attempt"]]
    state["attempts"] = sorted([*attempts, attempt], key=lambda a: a["attempt"])
    write_text(job_dir / STATE, json.dumps(state, indent=2))


def execute(task: Task, backbone=None) -> Outcome:
    """Run one task where this process is (inline, a local worker, a Slurm job): claim its
    folder, do its work (a benchmark job: train or resume it, evaluate), write ``result.json``;
    a failure is retried ``task.retries`` times, then recorded (``error.txt``, state.json) and
    returned, never raised. Ctrl-C and scheduler signals propagate (the task stays
    resumable)."""
    key, jdir = task.key, task.folder
    if task.package and task.package != package_folder():
        return Outcome(
            key,
            "failed",
            detail=f"this process imports promptalign from {package_folder()}, the submitter "
            f"from {task.package}; make the job's environment import the same one",
        )
    if (jdir / RESULT).is_file():
        return Outcome(key, "skipped")
    claim = Claim(jdir / LOCK, what=task.what)
    holder = claim.try_acquire()
    if holder is not None:
        return Outcome(key, "busy", detail=holder)
    try:
        if (jdir / RESULT).is_file():  # finished by another process meanwhile
            return Outcome(key, "skipped")
        earlier = (_read_json(jdir / STATE) or {}).get("attempts", [])
        for a in earlier:  # its process died without a word (killed, out of memory, node lost)
            if a.get("outcome") == "running":
                _record_attempt(jdir, {**a, "outcome": "killed"})
        done = len(earlier)
        me = claim.holder
        assert me is not None
        for n in range(task.retries + 1):
            progress = task.progress()
            attempt = {
                "attempt": done + n + 1,
                "host": me.host,
                "pid": me.pid,
                "scheduler": me.scheduler,
                "job_id": me.job_id,
                "started": time.time(),
                "resumed_from": list(progress) if progress else None,
                "outcome": "running",
            }
            _record_attempt(jdir, attempt)
            try:
                result = task.work(backbone)
            except BaseException as e:
                attempt["ended"] = time.time()
                if not isinstance(e, Exception):  # Ctrl-C, a scheduler's signal: resumable
                    attempt["outcome"] = "interrupted"
                    _record_attempt(jdir, attempt)
                    raise
                first = str(e).splitlines()[0] if str(e) else ""
                attempt.update(outcome="failed", error=f"{type(e).__name__}: {first}")
                write_text(jdir / ERROR, traceback.format_exc())
                _record_attempt(jdir, attempt)
                left = task.retries - n
                log.info(
                    "%s %s failed (details in %s): %s%s",
                    task.what,
                    key,
                    jdir / ERROR,
                    first,
                    f"; retrying ({left} retr{'y' if left == 1 else 'ies'} left)" if left else "",
                )
                if left:
                    continue
                return Outcome(key, "failed", detail=attempt["error"])
            claim.check()  # never write a result for a task another process has taken over
            (jdir / ERROR).unlink(missing_ok=True)
            write_text(jdir / RESULT, json.dumps(task.result_record(result), indent=2))
            attempt.update(outcome="finished", ended=time.time())
            _record_attempt(jdir, attempt)
            return Outcome(key, "ran", result=result)
        raise AssertionError("unreachable")
    finally:
        claim.release()


# --------------------------------------------------------------------------- submissions
class Submissions:
    """A folder with a JSON manifest, and the submissions recorded in it (who launched which
    tasks, with which launcher, and whether that run is active, ended or cancelled). A class
    that keeps a manifest (:class:`Grid`; a tuning study) names it (``manifest_name``), the
    file whose claim locks it (``lock_name``) and what it is in errors (``what``), and provides
    ``read()`` and ``_write(manifest)``; launchers record and follow their submissions through
    these methods."""

    manifest_name: str
    lock_name: str
    what: str

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    @property
    def manifest_path(self) -> Path:
        return self.folder / self.manifest_name

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive access to the manifest, across processes and hosts."""
        claim = Claim(self.folder / self.lock_name, what=self.what, stale_after_s=60)
        claim.acquire(wait_s=60)
        try:
            yield
        finally:
            claim.release()

    def read(self) -> dict[str, Any]:
        raise NotImplementedError

    def _write(self, m: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_submission(self, record: dict[str, Any]) -> None:
        with self._locked():
            m = self.read()
            m.setdefault("submissions", []).append(record)
            self._write(m)

    def update_submission(self, sid: str, **changes: Any) -> None:
        with self._locked():
            m = self.read()
            for s in m.get("submissions", []):
                if s.get("id") == sid:
                    s.update(changes)
            self._write(m)

    def submissions(self) -> list[dict[str, Any]]:
        return list(self.read().get("submissions", []))

    def submission(self, sid: str) -> dict[str, Any] | None:
        return next((s for s in self.submissions() if s.get("id") == sid), None)

    def follow_hint(self) -> str:
        """How to follow and cancel this folder's detached tasks, in words (said when the
        submitting process is interrupted while they run on)."""
        return (
            f"follow them with `promptalign benchmark status {self.folder}`, cancel them with "
            f"`promptalign benchmark cancel {self.folder}`"
        )


# --------------------------------------------------------------------------- the manifest
class Grid(Submissions):
    """A grid folder (``<out>/<protocol>``): its manifest, its jobs and their states."""

    manifest_name = MANIFEST
    lock_name = _MANIFEST_LOCK
    what = "grid manifest"

    def read(self) -> dict[str, Any]:
        """The manifest; GridError when it is missing, unreadable or of another format."""
        if not self.manifest_path.is_file():
            legacy = " (its jobs/ were written by an earlier promptalign: run its benchmark "
            legacy += "command once with this version to record the grid)"
            raise GridError(
                f"{self.folder} is not a benchmark grid folder: no {MANIFEST}"
                + (legacy if (self.folder / "jobs").is_dir() else "")
            )
        m = _read_json(self.manifest_path)
        if m is None or not isinstance(m.get("jobs"), dict):
            raise GridError(
                f"{self.manifest_path} is unreadable or not a grid manifest; move it away and "
                "re-run the grid's benchmark command to write it again (finished jobs are kept)"
            )
        if m.get("format") != GRID_FORMAT:
            raise GridError(
                f"{self.folder} was written by promptalign {m.get('promptalign', '?')} in grid "
                f"format {m.get('format')!r}; this promptalign {promptalign.__version__} reads "
                f"format {GRID_FORMAT}: use that version for this folder, or another --out"
            )
        return m

    def _write(self, m: dict[str, Any]) -> None:
        write_text(self.manifest_path, json.dumps(m, indent=1))

    def register(
        self,
        protocol: str,
        plan: Sequence[tuple[Job, RunConfig, Path]],
        *,
        new_settings: bool = False,
    ) -> None:
        """Record the plan's jobs in the manifest (creating it), refusing a job already in the
        grid with other settings unless ``new_settings`` (GridError naming the keys that differ
        and the version that wrote them). Nothing is written when refused."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self.exists():
                m = self.read()
            else:  # a new grid, or one of an earlier version (no manifest): record its jobs now
                m = {
                    "format": GRID_FORMAT,
                    "promptalign": promptalign.__version__,
                    "protocol": protocol,
                    "created": time.time(),
                    "jobs": {},
                    "submissions": [],
                }
            if not new_settings:
                self._check_settings(m, plan)
            for job, cfg, jdir in plan:
                rel = jdir.relative_to(self.folder).as_posix()
                if not (jdir / JOB_INFO).is_file():
                    write_text(
                        jdir / JOB_INFO,
                        json.dumps({"job": job.to_dict(), "config": to_dict(cfg)}, indent=1),
                    )
                m["jobs"][job.key] = {"folder": rel, "job": job.to_dict()}
            m["promptalign"] = promptalign.__version__
            self._write(m)

    def _check_settings(self, m: dict, plan: Sequence[tuple[Job, RunConfig, Path]]) -> None:
        changed = []
        for job, cfg, jdir in plan:
            old = m["jobs"].get(job.key)
            if old and old["folder"] != jdir.relative_to(self.folder).as_posix():
                changed.append((job, cfg, self.folder / old["folder"]))
        if not changed:
            return
        job, cfg, old_dir = changed[0]
        old_cfg = (_read_json(old_dir / JOB_INFO) or {}).get("config", {})
        a, b = _flatten(old_cfg), _flatten(to_dict(cfg))
        diff = [
            f"{k} {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in ("data.workers", "run.progress")
        ]
        what = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        version = m.get("promptalign")
        by = (
            f" (its jobs were planned by promptalign {version}, this is {promptalign.__version__})"
            if version != promptalign.__version__
            else ""
        )
        raise GridError(
            f"{self.folder} holds this grid with other settings{by}: {len(changed)} job(s) "
            f"such as {job.key} had {what or 'another resolved config'}; the finished results "
            "there are kept. Use another --out for these settings, or add --new-settings to "
            "run them in this folder (the grid then reports the new settings)"
        )

    # ------------------------------------------------------------------ jobs and states
    def jobs(self) -> list[tuple[Job, Path]]:
        return [
            (Job.from_dict(e["job"]), self.folder / e["folder"])
            for e in self.read()["jobs"].values()
        ]

    def state(self, job: Job, jdir: Path) -> JobState:
        return job_state(job, jdir)

    def status(self) -> GridStatus:
        """Every job's state, grouped by method and dataset, with times and an estimate of the
        time left."""
        m = self.read()
        states = [job_state(j, d) for j, d in self.jobs()]
        return GridStatus(self.folder, m.get("protocol", self.folder.name), states)


@dataclass
class JobState:
    """One job's (or any launched task's) state as read from its folder.

    Attributes:
        job: the job (None for a task of another kind, e.g. a tuning worker).
        folder: its folder.
        state: ``finished``, ``running``, ``failed`` or ``pending``.
        holder: who runs it (running).
        attempts: its attempts (state.json), oldest first.
        error: the last failed attempt's error (failed).
        seconds: run time of its attempts so far.
        progress: (stage, epochs done, epochs) of its run folder, when it has one.
    """

    job: Job | None
    folder: Path
    state: str
    holder: Holder | None = None
    attempts: list[dict] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    progress: tuple[int, int, int] | None = None

    @property
    def running_for(self) -> float:
        if self.state != "running" or not self.attempts:
            return 0.0
        return max(0.0, time.time() - float(self.attempts[-1].get("started", time.time())))


def job_state(job: Job, jdir: Path) -> JobState:
    return folder_state(jdir, job, _run_progress(jdir, job) if jdir.is_dir() else None)


def folder_state(
    jdir: Path, job: Job | None = None, progress: tuple[int, int, int] | None = None
) -> JobState:
    """The state of the task whose folder is ``jdir`` (see :func:`execute`), from the folder
    alone."""
    attempts = (_read_json(jdir / STATE) or {}).get("attempts", [])
    holder = None
    if (jdir / RESULT).is_file():
        state = "finished"
    elif (jdir / LOCK).exists() and (holder := holder_of(jdir)) is not None:
        state = "running"
    elif attempts and attempts[-1].get("outcome") == "failed":
        state = "failed"
    else:
        state = "pending"
    now = time.time()
    seconds = sum(  # an attempt without an end runs now, or was killed (no time known)
        float(a.get("ended", now if state == "running" else a.get("started", now)))
        - float(a.get("started", now))
        for a in attempts
    )
    error = attempts[-1].get("error", "") if state == "failed" else ""
    return JobState(job, jdir, state, holder, attempts, error, max(seconds, 0.0), progress)


@dataclass
class GroupStatus:
    method: str
    dataset: str
    counts: dict[str, int]
    seconds: float
    eta: float | None


@dataclass
class GridStatus:
    """The states of a grid's jobs; :meth:`groups` sums them per method and dataset."""

    folder: Path
    protocol: str
    jobs: list[JobState]

    def counts(self, states: Sequence[JobState] | None = None) -> dict[str, int]:
        states = self.jobs if states is None else states
        return {
            s: sum(j.state == s for j in states)
            for s in ("finished", "running", "failed", "pending")
        }

    def _mean_seconds(self) -> Callable[[str], float | None]:
        done = [j for j in self.jobs if j.state == "finished" and j.seconds > 0]
        overall = sum(j.seconds for j in done) / len(done) if done else None
        per: dict[str, list[float]] = {}
        for j in done:
            per.setdefault(j.job.method, []).append(j.seconds)
        return lambda m: sum(per[m]) / len(per[m]) if m in per else overall

    def _left(self, states: Sequence[JobState]) -> float | None:
        """Seconds of work left in ``states`` (one process), from the finished jobs' mean run
        time per method; None before any job has finished."""
        mean = self._mean_seconds()
        left = 0.0
        for j in states:
            if j.state not in ("pending", "running"):
                continue
            m = mean(j.job.method)
            if m is None:
                return None
            left += m if j.state == "pending" else max(m - j.running_for, 0.0)
        return left

    @property
    def parallel(self) -> int:
        """Jobs running at once now (at least 1): the estimate's speed."""
        return max(1, sum(j.state == "running" for j in self.jobs))

    def eta(self, states: Sequence[JobState] | None = None) -> float | None:
        left = self._left(self.jobs if states is None else states)
        return None if left is None else left / self.parallel

    def groups(self) -> list[GroupStatus]:
        order: dict[tuple[str, str], list[JobState]] = {}
        for j in self.jobs:
            order.setdefault((j.job.method, j.job.dataset), []).append(j)
        return [
            GroupStatus(m, d, self.counts(js), sum(j.seconds for j in js), self.eta(js))
            for (m, d), js in order.items()
        ]

    def elapsed(self) -> float:
        """Wall time since the grid's first attempt started (to its last end when none runs)."""
        starts = [float(a["started"]) for j in self.jobs for a in j.attempts if "started" in a]
        if not starts:
            return 0.0
        if any(j.state == "running" for j in self.jobs):
            return time.time() - min(starts)
        ends = [float(a["ended"]) for j in self.jobs for a in j.attempts if "ended" in a]
        return (max(ends) if ends else time.time()) - min(starts)


def format_seconds(seconds: float | None) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s``; ``?`` for None."""
    if seconds is None or math.isnan(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def find_grids(out: str | Path) -> list[Grid]:
    """The grid folders under ``out``: ``out`` itself when it holds a manifest, else its
    protocol folders that do."""
    from .jobs import PROTOCOLS

    root = Path(out).expanduser()
    if (root / MANIFEST).is_file():
        return [Grid(root)]
    grids = [Grid(root / p) for p in PROTOCOLS if (root / p / MANIFEST).is_file()]
    if grids:
        return grids
    if (root / "jobs").is_dir():
        Grid(root).read()  # raises, naming the earlier version's layout
    legacy = [p for p in PROTOCOLS if (root / p / "jobs").is_dir()]
    if legacy:
        Grid(root / legacy[0]).read()
    raise GridError(
        f"{out}: no benchmark grid here (no {MANIFEST} in it or in its protocol folders); give "
        "the --out of a `promptalign benchmark` command"
    )
