"""Running a benchmark grid: plan, record in the grid folder, launch, then tables."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..claim import LOCK, Claim, holder_of
from ..config import ConfigError
from .grid import RESULT, Grid, GridStatus, Task, find_grids, package_folder
from .jobs import Job, plan_jobs, prepare_data
from .launchers import Launcher, get_launcher
from .tables import write_tables

log = logging.getLogger(__name__)


@dataclass
class BenchmarkSummary:
    """What one :func:`run_benchmark` call did.

    Attributes:
        out_dir: the grid folder.
        ran: jobs run (to the end) by this call.
        skipped: jobs finished before.
        failed: job -> its error (one line).
        busy: job -> who runs it (another process).
        submitted: job -> scheduler job id, for jobs left running on a cluster.
        tables: file name -> Markdown table.
        launcher: the launcher's name.
    """

    out_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    launcher: str = "inline"


def run_benchmark(
    protocol: str,
    *,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int] = (1, 2, 3),
    data_root: str = ".",
    out: str | Path = "benchmark",
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    targets: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    backbone=None,
    on_job_done: Callable[[Job, dict], None] | None = None,
    launcher: str | Launcher = "inline",
    launcher_settings: Mapping[str, Any] | None = None,
    retries: int = 0,
    new_settings: bool = False,
) -> BenchmarkSummary:
    """Run every unfinished job of ``protocol`` with ``launcher`` and write tables and plots.

    Args:
        protocol, methods, datasets, seeds, shots, targets: the grid (see :func:`plan_jobs`).
        data_root: folder holding the datasets.
        out: output folder; the grid folder is ``out/protocol``.
        overrides: ``key=value`` for every job, ``method:key=value`` for one method's jobs.
        backbone: a built backbone shared by the jobs (inline launcher only).
        on_job_done: called with (job, result) after each job this call ran.
        launcher: ``inline``, ``local``, ``slurm``, another registered name, or an instance.
        launcher_settings: the launcher's options (e.g. ``{"parallel": 2}``).
        retries: times a failed job is tried again before it counts as failed.
        new_settings: run jobs whose settings differ from those the grid folder holds for them.

    Raises:
        ConfigError: a bad name, override, launcher setting or grid folder, before any job runs.
        StillRunning: interrupted while following cluster jobs, which go on.
    """
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"--retries {retries}: give 0 or more")
    out_dir = Path(out).expanduser() / protocol
    plan = plan_jobs(
        protocol,
        methods=methods,
        datasets=datasets,
        seeds=seeds,
        data_root=data_root,
        out_dir=out_dir,
        shots=shots,
        targets=targets,
        overrides=overrides,
    )
    lch = launcher if isinstance(launcher, Launcher) else get_launcher(launcher, launcher_settings)
    package = package_folder()
    tasks = [Task(job, cfg, jdir, retries, package) for job, cfg, jdir in plan]
    lch.check(tasks)
    grid = Grid(out_dir)
    grid.register(protocol, plan, new_settings=new_settings)
    summary = BenchmarkSummary(out_dir, launcher=lch.registered_name)
    todo = []
    for task in tasks:
        if (task.job_dir / RESULT).is_file():
            summary.skipped.append(task.job.key)
        elif lch.detached and (holder := holder_of(task.job_dir)) is not None:
            summary.busy[task.job.key] = holder.describe()  # not submitted twice
        else:
            todo.append(task)
    if todo and lch.registered_name != "inline":
        prepare_data([(t.job, t.config, t.job_dir) for t in todo])
    for o in lch.run(todo, grid, backbone=backbone, on_done=on_job_done):
        if o.status == "ran":
            summary.ran.append(o.key)
        elif o.status == "skipped":
            summary.skipped.append(o.key)
        elif o.status == "busy":
            summary.busy[o.key] = o.detail
        elif o.status == "submitted":
            summary.submitted[o.key] = o.detail
        else:
            summary.failed[o.key] = o.detail
    summary.tables = write_tables(
        protocol,
        [job for job, _, _ in plan],
        out_dir,
        summary.failed,
        job_dirs={job: jdir for job, _, jdir in plan},
    )
    return summary


def grid_status(out: str | Path) -> list[GridStatus]:
    """The state of every job of the grids in ``out`` (the ``--out`` of a benchmark command, or
    one protocol's folder in it), read from the folder alone."""
    return [g.status() for g in find_grids(out)]


def write_grid_tables(out: str | Path) -> dict[str, str]:
    """Write the tables of the grids in ``out`` from whatever has finished (missing cells
    marked); returns file name -> Markdown."""
    tables: dict[str, str] = {}
    for g in find_grids(out):
        st = g.status()
        jobs = {j.job: j.folder for j in st.jobs}
        failed = {j.job.key: j.error for j in st.jobs if j.state == "failed"}
        tables.update(write_tables(st.protocol, list(jobs), g.folder, failed, jobs))
    return tables


def cancel_grid(out: str | Path) -> list[str]:
    """Cancel what every active submission of the grids in ``out`` started (Slurm arrays:
    ``scancel``; a local or inline run on this host: interrupted like Ctrl-C); returns one line
    per submission. Finished jobs and checkpoints are kept."""
    lines = []
    for g in find_grids(out):
        for s in g.submissions():
            if s.get("state") != "active":
                continue
            try:
                what = get_launcher(s.get("launcher", "?")).cancel(g, s)
            except ConfigError as e:
                what = f"not cancelled: {e}"
            g.update_submission(s["id"], state="cancelled", cancelled=time.time())
            lines.append(f"{g.folder}: {s.get('launcher')} run {s['id']}: {what}")
    return lines


# ------------------------------------------------------------- job claims, as earlier versions
_HELD: dict[Path, Claim] = {}


def acquire_job(job_dir: Path) -> str | None:
    """Claim ``job_dir`` for this process; None when claimed, else who holds it (see
    :mod:`promptalign.claim`). Release with :func:`release_job`."""
    claim = Claim(Path(job_dir) / LOCK, what="benchmark job")
    holder = claim.try_acquire()
    if holder is None:
        _HELD[Path(job_dir)] = claim
    return holder


def release_job(job_dir: Path) -> None:
    claim = _HELD.pop(Path(job_dir), None)
    if claim is not None:
        claim.release()
