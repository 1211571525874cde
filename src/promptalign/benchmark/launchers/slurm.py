"""``slurm``: one Slurm job array per grid, through submitit.

Every unfinished job becomes one task of a job array (``sbatch --array``, at most
``array_parallelism`` running at once) that runs :func:`~promptalign.benchmark.grid.execute` with
the submitter's Python interpreter and the submitter's ``promptalign`` (its folder is put first
on ``PYTHONPATH``; the job refuses to run if it imports another one). A job that reaches its time
limit gets submitit's signal first, and is requeued (up to ``requeues`` times) and resumes from
its last epoch; a preempted job requeued by Slurm resumes the same way. The submitter then
follows the array through the grid folder and ``squeue``: a job that ended without a result or
an error (``scancel``, killed, out of memory) is submitted again, up to ``--retries`` times, and
resumes from its last epoch. Interrupting the submitter leaves the jobs running
(:class:`StillRunning`); ``promptalign benchmark cancel`` cancels them (``scancel``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..grid import RESULT, Outcome, Submissions, execute, package_folder
from . import LAUNCHERS, Launcher, LauncherError, LaunchTask, OnDone, StillRunning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmOptions:
    """Settings of the ``slurm`` launcher (``--slurm-*`` flags or a YAML launcher file).

    Attributes:
        partition: Slurm partition (``--partition``).
        time: time limit per job: minutes, ``HH:MM:SS`` or ``D-HH:MM:SS``.
        gpus_per_job: GPUs per job.
        cpus_per_job: CPU cores per job.
        mem: memory per job, e.g. ``32G``.
        array_parallelism: jobs of the array running at once.
        account, qos, constraint: Slurm's ``--account``, ``--qos``, ``--constraint``.
        setup: shell lines run before each job (``module load ...``, venv activation).
        requeues: requeues of a job that reaches its time limit.
        signal_delay_s: seconds before the time limit at which a job is told to checkpoint and
            requeue (it resumes from its last finished epoch).
        wait: follow the jobs until they end (False: submit and return).
        poll_s: seconds between checks while following.
        extra: further ``#SBATCH`` options, e.g. ``{"nodelist": "gpu01"}``.
    """

    partition: str | None = None
    time: str | int = 60
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem: str | None = None
    array_parallelism: int = 256
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()
    requeues: int = 3
    signal_delay_s: int = 120
    wait: bool = True
    poll_s: float = 15.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.setup, str):
            object.__setattr__(self, "setup", (self.setup,))
        elif isinstance(self.setup, (list, tuple)):
            object.__setattr__(self, "setup", tuple(str(s) for s in self.setup))
        else:
            raise ValueError(f"setup must be a list of shell lines, not {self.setup!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping of sbatch option: value, not {self.extra!r}")
        if not isinstance(self.wait, bool):
            raise ValueError(f"wait must be true or false, not {self.wait!r}")
        if not isinstance(self.poll_s, (int, float)) or self.poll_s <= 0:
            raise ValueError(f"poll_s must be a number of seconds above 0, not {self.poll_s!r}")


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(value: str | int) -> int:
    """A Slurm time limit (``MIN``, ``MIN:SEC``, ``H:MM:SS``, ``D-H``, ``D-H:MM[:SS]``) in
    minutes, rounded up."""
    text = str(value).strip()
    m = _TIME.match(text)
    if not m:
        raise LauncherError(
            f"--slurm-time {value}: not a Slurm time limit; give minutes (240), H:MM:SS "
            "(4:00:00) or D-HH:MM:SS (1-00:00:00)"
        )
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (nums + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + mi) * 60 + s
    elif len(nums) == 1:
        seconds = nums[0] * 60
    elif len(nums) == 2:
        seconds = nums[0] * 60 + nums[1]
    else:
        seconds = (nums[0] * 60 + nums[1]) * 60 + nums[2]
    if seconds <= 0:
        raise LauncherError(f"--slurm-time {value}: the time limit must be above zero")
    return -(-seconds // 60)


def _log(grid: Submissions, job_id: str) -> Path:
    return grid.folder / ".slurm" / job_id / f"{job_id}_0_log.err"


class SlurmTask:
    """What each array task runs: the job, resumed from its last epoch after a requeue
    (submitit calls ``checkpoint`` on the time-limit signal and requeues what it returns)."""

    def __call__(self, task: LaunchTask) -> str:
        return execute(task).status

    def checkpoint(self, task: LaunchTask):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, task)


def _squeue(ids: Sequence[str]) -> dict[str, str] | None:
    """State of every task still known to Slurm of the given array/job ids (``"123_4"`` ->
    ``"RUNNING"``); None when squeue does not answer."""
    if not ids:
        return {}
    try:
        p = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        if "invalid job id" in p.stderr.lower():
            return {}
        return None
    states = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


@LAUNCHERS.register("slurm")
class SlurmLauncher(Launcher):
    Options = SlurmOptions
    detached = True

    def check(self, tasks: Sequence[LaunchTask]) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LauncherError(
                "--launcher slurm needs submitit: pip install 'promptalign[slurm]'"
            ) from None
        if not shutil.which("sbatch"):
            raise LauncherError(
                "--launcher slurm: sbatch is not on PATH; run from a Slurm login node (or load "
                "Slurm's module), or use --launcher local"
            )
        time_minutes(self.options.time)
        o = self.options
        for name in ("array_parallelism", "requeues", "gpus_per_job", "cpus_per_job"):
            v = getattr(o, name)
            low = 1 if name in ("array_parallelism", "cpus_per_job") else 0
            if v is not None and (not isinstance(v, int) or v < low):
                flag = "--slurm-" + name.replace("_", "-")
                raise LauncherError(f"{flag} {v}: must be an integer >= {low}")

    def executor(self, grid: Submissions, protocol: str):
        import submitit

        o = self.options
        ex = submitit.SlurmExecutor(
            folder=grid.folder / ".slurm" / "%j", max_num_timeout=o.requeues
        )
        src = str(Path(package_folder()).parent)
        params: dict[str, Any] = {
            "job_name": f"promptalign-{protocol}",
            "time": time_minutes(o.time),
            "array_parallelism": o.array_parallelism,
            "setup": [*o.setup, f'export PYTHONPATH="{src}${{PYTHONPATH:+:$PYTHONPATH}}"'],
            "signal_delay_s": o.signal_delay_s,
        }
        optional = {
            "partition": o.partition,
            "gpus_per_node": o.gpus_per_job or None,
            "cpus_per_task": o.cpus_per_job,
            "mem": o.mem,
            "account": o.account,
            "qos": o.qos,
            "constraint": o.constraint,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        if o.extra:
            params["additional_parameters"] = dict(o.extra)
        ex.update_parameters(**params)
        return ex

    def submit(
        self, grid: Submissions, tasks: Sequence[LaunchTask], attempt: int = 0
    ) -> dict[str, str]:
        """Submit ``tasks`` as one job array; returns job key -> Slurm id (``"123_4"``)."""
        ex = self.executor(grid, tasks[0].name)
        runner = SlurmTask()
        try:
            jobs = ex.map_array(runner, list(tasks))
        except Exception as e:  # submitit's FailedJobError / sbatch errors: one line
            first = str(e).strip().splitlines()
            raise LauncherError(f"sbatch refused the job array: {first[-1] if first else e}") from e
        ids = {t.key: j.job_id for t, j in zip(tasks, jobs)}
        array = jobs[0].job_id.split("_")[0]
        self.record(grid, tasks, id=f"slurm-{array}", array=array, slurm_jobs=ids, attempt=attempt)
        log.info("submitted %d job(s) as Slurm array %s", len(tasks), array)
        return ids

    def run(
        self,
        tasks: Sequence[LaunchTask],
        grid: Submissions,
        *,
        backbone=None,
        on_done: OnDone | None = None,
    ) -> list[Outcome]:
        if not tasks:
            return []
        ids = self.submit(grid, tasks)
        arrays = {f"slurm-{ids[tasks[0].key].split('_')[0]}"}
        if not self.options.wait:
            return [Outcome(t.key, "submitted", detail=ids[t.key]) for t in tasks]
        try:
            return self._follow(grid, tasks, ids, arrays, on_done)
        except KeyboardInterrupt:
            running = sorted({i.split("_")[0] for i in ids.values()})
            raise StillRunning(
                f"interrupted: the Slurm job(s) of {grid.folder} (array {', '.join(running)}) keep "
                f"running; {grid.follow_hint()}"
            ) from None

    def _follow(
        self,
        grid: Submissions,
        tasks: Sequence[LaunchTask],
        ids: dict[str, str],
        arrays: set[str],
        on_done: OnDone | None,
    ) -> list[Outcome]:
        by_key = {t.key: t for t in tasks}
        outcomes: dict[str, Outcome] = {}
        resubmitted = dict.fromkeys(by_key, 0)
        retries = max((t.retries for t in tasks), default=0)
        while len(outcomes) < len(tasks):
            time.sleep(self.options.poll_s)
            if any((grid.submission(a) or {}).get("state") == "cancelled" for a in arrays):
                for key in by_key:
                    outcomes.setdefault(key, Outcome(key, "lost", detail="cancelled"))
                break
            queued = _squeue(sorted({ids[k].split("_")[0] for k in by_key if k not in outcomes}))
            if queued is None:
                continue  # squeue did not answer: try again
            again = []
            for key, task in by_key.items():
                if key in outcomes:
                    continue
                st = task.state()
                if st.state == "finished":
                    outcomes[key] = self._finished(task, on_done)
                elif ids[key] in queued:
                    continue
                elif st.state == "running":
                    continue  # ending, or run by another process: its claim says so
                elif (
                    st.state == "failed"
                    and st.attempts
                    and st.attempts[-1].get("job_id") == ids[key]
                ):
                    outcomes[key] = Outcome(key, "failed", detail=st.error)
                elif resubmitted[key] < retries:
                    resubmitted[key] += 1
                    again.append(task)
                else:
                    outcomes[key] = Outcome(
                        key,
                        "failed",
                        detail=f"Slurm job {ids[key]} ended without a result (cancelled, killed "
                        f"or out of memory; its log: {_log(grid, ids[key])})",
                    )
            if again:
                log.info("submitting %d job(s) again: their Slurm jobs ended early", len(again))
                new = self.submit(grid, again, attempt=max(resubmitted[t.key] for t in again))
                ids.update(new)
                arrays.add(f"slurm-{next(iter(new.values())).split('_')[0]}")
        for a in arrays:
            if (grid.submission(a) or {}).get("state") == "active":
                grid.update_submission(a, state="ended")
        return [outcomes[t.key] for t in tasks]

    @staticmethod
    def _finished(task: LaunchTask, on_done: OnDone | None) -> Outcome:
        import json

        result = json.loads((task.folder / RESULT).read_text(encoding="utf-8"))["result"]
        out = Outcome(task.key, "ran", result=result)
        return Launcher.done(out, task, on_done)

    def cancel(self, grid: Submissions, submission: dict[str, Any]) -> str:
        array = submission.get("array")
        if not array:
            return "no Slurm job id recorded"
        if not shutil.which("scancel"):
            return f"scancel is not on PATH: cancel Slurm job {array} from a Slurm node"
        p = subprocess.run(["scancel", str(array)], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            return f"scancel {array} failed: {p.stderr.strip() or p.returncode}"
        return f"cancelled Slurm job array {array}"
