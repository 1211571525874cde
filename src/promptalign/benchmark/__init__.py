"""Benchmark protocols in one call: base-to-new, few-shot, cross-dataset, domain generalisation.

Every (dataset, method, shots, seed) training is an independent job with its own folder in the
grid folder ``<out>/<protocol>/`` (:mod:`.jobs`; the folder's layout and the job states:
:mod:`.grid`). A finished job leaves ``result.json``. Re-running with the same settings skips
finished jobs and resumes an interrupted one from its last epoch; a job the grid already holds
with other settings (e.g. ``optim.epochs=3`` after 2) is refused unless asked for
(``new_settings``), and then runs in a new folder, so old results are never reported as new ones.
Every job's config is built and checked before any job runs, so a typo in an override, a method or
a dataset name fails once, with one message; a job that fails while running is retried
(``retries``), then recorded (``error.txt``) and reported in the summary without stopping the
others. Jobs run in this process, in worker processes, or on a Slurm cluster (:mod:`.launchers`);
the results are the same. Tables are written as Markdown and CSV (mean ± std over seeds, the
published numbers beside ours where they exist) and few-shot curves as PNG (:mod:`.tables`), from
whatever has finished.
"""

from ..claim import LOCK
from .grid import Grid, GridError, GridStatus, JobState, Outcome, Task, execute, format_seconds
from .jobs import (
    CROSS_TARGETS,
    DG_TARGETS,
    PROTOCOLS,
    Job,
    config_fingerprint,
    default_datasets,
    job_config,
    job_dir,
    make_jobs,
    plan_jobs,
    recipe_stages,
    run_job,
    split_recipe,
)
from .launchers import LAUNCHERS, Launcher, LauncherError, StillRunning, get_launcher
from .runner import (
    BenchmarkSummary,
    acquire_job,
    cancel_grid,
    grid_status,
    release_job,
    run_benchmark,
    write_grid_tables,
)
from .tables import published, write_tables

__all__ = [
    "CROSS_TARGETS",
    "DG_TARGETS",
    "LAUNCHERS",
    "LOCK",
    "PROTOCOLS",
    "BenchmarkSummary",
    "Grid",
    "GridError",
    "GridStatus",
    "Job",
    "JobState",
    "Launcher",
    "LauncherError",
    "Outcome",
    "StillRunning",
    "Task",
    "acquire_job",
    "cancel_grid",
    "config_fingerprint",
    "default_datasets",
    "execute",
    "format_seconds",
    "get_launcher",
    "grid_status",
    "job_config",
    "job_dir",
    "make_jobs",
    "plan_jobs",
    "published",
    "recipe_stages",
    "release_job",
    "run_benchmark",
    "run_job",
    "split_recipe",
    "write_grid_tables",
    "write_tables",
]
