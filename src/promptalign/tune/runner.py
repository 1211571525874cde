"""Running a study: check everything, launch the workers, then choose and test once."""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbone import load_backbone
from ..benchmark.grid import package_folder
from ..benchmark.jobs import plan_jobs, split_recipe
from ..benchmark.launchers import Launcher, get_launcher
from ..benchmark.runner import run_benchmark
from ..claim import holder_of
from ..config import ConfigError
from ..engine.build import load_data
from ..engine.checkpoint import read_json, write_text
from ..resolve import resolve_config
from .report import best_trial, shots_text, write_chosen, write_plots, write_trials_table
from .space import RESERVED, parse_space, split_items
from .study import StudyError, StudyFolder, StudySpec, WorkerTask, optuna

log = logging.getLogger(__name__)

FINAL = "final"
RESULT = "result.json"
REPORT = "report.md"


@dataclass
class TuneSummary:
    """What one :func:`run_tune` call found and did.

    Attributes:
        study_dir: the study folder.
        budget: the study's budget of trials.
        states: trials by state (``complete``, ``pruned``, ``fail``, ``running``).
        running_elsewhere: trials other processes run now (the study is not finished).
        failed_workers: worker -> its error, for workers that stopped with one.
        submitted: worker -> scheduler job id, for workers left running on a cluster.
        chosen: ``chosen.json``'s content (trial, value, params, overrides), once chosen.
        table: the trials table (Markdown).
        plots: the plots written; ``notes`` says why one was not.
        search_seconds: wall time from the first trial's start to the last trial's end.
        test: seed -> test metrics of the chosen setting's final run.
        test_failed: seed -> error of a final run that failed.
        report: ``report.md`` (Markdown), once the test score is known.
    """

    study_dir: Path
    budget: int
    states: dict[str, int] = field(default_factory=dict)
    running_elsewhere: int = 0
    failed_workers: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)
    chosen: dict[str, Any] | None = None
    table: str = ""
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    search_seconds: float = 0.0
    test: dict[int, dict[str, float]] = field(default_factory=dict)
    test_failed: dict[int, str] = field(default_factory=dict)
    report: str = ""

    @property
    def searched(self) -> int:
        """Trials that have ended (finished, pruned or failed)."""
        return sum(v for k, v in self.states.items() if k != "running")


def _check_names(method: str, fixed: Sequence[str], trials: int, seeds: Sequence[int]) -> None:
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials {trials}: give a budget of at least 1 trial")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if split_recipe(method)[1] is not None:
        raise ConfigError(
            f"--method {method}: a study tunes one method's runs, not a multi-run recipe; "
            f"tune {split_recipe(method)[0]} alone"
        )
    for o in fixed:
        key = o.partition("=")[0].strip()
        if key in RESERVED:
            raise ConfigError(f"{o}: {key} cannot be set for a study: {RESERVED[key]}")


def _check_out(folder: StudyFolder) -> None:
    f = folder.folder
    if f.exists() and not f.is_dir():
        raise StudyError(f"--out {f} is a file; give a folder for the study")
    if f.is_dir() and not folder.exists() and any(f.iterdir()):
        raise StudyError(
            f"--out {f} holds other files and no study ({folder.manifest_path.name}): give a new "
            "or empty folder for the study"
        )


def run_tune(
    method: str,
    dataset: str,
    *,
    out: str | Path,
    trials: int,
    space: Sequence[str] = (),
    space_file: str | Path | None = None,
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    data_root: str = ".",
    sampler: str = "tpe",
    pruner: str = "median",
    metric: str = "accuracy",
    storage: str | None = None,
    launcher: str | Launcher = "inline",
    launcher_settings: Mapping[str, Any] | None = None,
    workers: int | None = None,
    retries: int = 0,
    final: bool = True,
    backbone=None,
) -> TuneSummary:
    """Choose hyper-parameters of ``method`` on ``dataset``'s few-shot validation split, then
    train the chosen setting once per seed on the normal protocol and score it on test once.

    Args:
        method, dataset: what to tune (a registered name or a custom dataset's path).
        out: the study folder (created; the same command resumes it).
        trials: the study's budget of trials (finished, pruned and failed ones count).
        space: ``KEY=LOW..HIGH[:log]`` and ``KEY=A,B,C`` items are searched; any other
            ``KEY=VALUE`` is set for every run of the study (trials and final runs).
        space_file: a YAML search space (:mod:`promptalign.tune.space`).
        shots: labelled images per class (the validation split has min(shots, 4)).
        seeds: the final runs' seeds; the trials use the first.
        data_root: folder holding the datasets.
        sampler: ``tpe`` (default), ``random`` or ``grid``.
        pruner: ``median`` (default), ``halving`` or ``none``.
        metric: the validation metric maximised (``accuracy`` or ``macro_f1``).
        storage: an SQLAlchemy URL for Optuna's storage (default: ``study.db`` in ``out``).
        launcher, launcher_settings: where the workers run (``inline``, ``local``, ``slurm``).
        workers: workers sharing the study (default: the launcher's, e.g. ``--parallel``).
        retries: times a failed worker or final run is tried again.
        final: re-train and test the chosen setting (False: stop once it is chosen).
        backbone: a built backbone shared by the runs (inline launcher only).

    Raises:
        ConfigError: bad input (an empty or malformed space, an unknown key, low > high, a
            budget of 0, a dataset without a validation split, a study folder made for another
            study), before anything runs or is written.
    """
    from ..data.base import DatasetError

    searched, fixed = split_items(space)
    _check_names(method, fixed, trials, seeds)
    seed = int(seeds[0])
    # the final runs' plan checks the method, the dataset and the fixed overrides
    folder = StudyFolder(out)
    plan_jobs(
        "fewshot",
        methods=[method],
        datasets=[dataset],
        seeds=list(seeds),
        data_root=data_root,
        out_dir=folder.folder / FINAL / "fewshot",
        shots=[shots],
        overrides=fixed,
    )
    draft = StudySpec(method, dataset, shots, (), tuple(fixed), "tpe", pruner, metric, seed)
    base = draft.trial_config(data_root)
    params = parse_space(searched, base=base, space_file=space_file)
    spec = StudySpec(
        method, dataset, shots, tuple(params), tuple(fixed), sampler, pruner, metric, seed
    )
    resolve_config(base)  # a bad method name, preset or option: ConfigError, before any folder
    _check_out(folder)
    if folder.exists():
        folder.check_same(spec, storage)
    data = load_data(base, seed)  # reads the split lists, not the images
    if not data.val:
        raise DatasetError(
            f"{data.name}: no validation split, and promptalign tune chooses on it: give one (a "
            "val/ folder of class folders beside train/ in an ImageFolder dataset, or a 'val' "
            "list in its split file, data.split_file=FILE)"
        )
    optuna()  # installed: else one line, before anything is written
    lch = launcher if isinstance(launcher, Launcher) else get_launcher(launcher, launcher_settings)
    if backbone is None:  # its weights are there (else one line now, not a failure per trial);
        # the inline launcher's trials share it
        backbone = load_backbone(base.backbone.arch, base.backbone.weights, device="cpu")
    n = workers if workers is not None else lch.workers()
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"workers {n}: give at least 1 worker")
    sid = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    tasks = [
        WorkerTask(folder.folder.resolve(), i, sid, base.run.device, retries, package_folder())
        for i in range(n)
    ]
    lch.check(tasks)
    folder.create_or_update(spec, trials=trials, data_root=data_root, storage=storage)
    folder.optuna_study(create=True)
    summary = TuneSummary(folder.folder, trials)
    for o in lch.run(tasks, folder, backbone=backbone):
        if o.status == "failed":
            summary.failed_workers[o.key] = o.detail
        elif o.status == "submitted":
            summary.submitted[o.key] = o.detail
    if summary.submitted:
        return summary
    return finish(
        folder, summary, seeds=seeds, final=final, launcher=lch, retries=retries, backbone=backbone
    )


def finish(
    folder: StudyFolder,
    summary: TuneSummary,
    *,
    seeds: Sequence[int],
    final: bool,
    launcher: Launcher,
    retries: int = 0,
    backbone=None,
) -> TuneSummary:
    """Tables and plots from the study's storage; once its search has ended, the chosen
    setting, its final runs (one per seed, scored on test once) and the report."""
    spec, data_root = folder.spec(), folder.data_root()
    study = folder.optuna_study()
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        state = t.state.name.lower()
        summary.states[state] = summary.states.get(state, 0) + 1
    summary.running_elsewhere = sum(
        t.state.name == "RUNNING" and holder_of(folder.trial_dir(t.number)) is not None
        for t in trials
    )
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if starts and ends:
        summary.search_seconds = (max(ends) - min(starts)).total_seconds()
    summary.table = write_trials_table(folder, spec, trials)
    summary.plots, summary.notes = write_plots(folder, study, spec.metric)
    grid = spec.grid_size()
    planned = min(summary.budget, grid) if grid else summary.budget
    if summary.running_elsewhere or summary.searched < planned:
        return summary  # not ended: workers elsewhere still run, or ours failed
    best = best_trial(trials)
    if best is None:
        return summary
    summary.chosen = write_chosen(folder, spec, best, data_root)
    if not final:
        return summary
    overrides = [*spec.fixed, *summary.chosen["overrides"]]
    out = folder.folder / FINAL
    run_benchmark(
        "fewshot",
        methods=[spec.method],
        datasets=[spec.dataset],
        seeds=list(seeds),
        data_root=data_root,
        out=out,
        shots=[spec.shots],
        overrides=overrides,
        backbone=backbone,
        launcher=launcher,
        retries=retries,
        new_settings=True,  # a study given more trials may choose anew: new final runs
    )
    plan = plan_jobs(
        "fewshot",
        methods=[spec.method],
        datasets=[spec.dataset],
        seeds=list(seeds),
        data_root=data_root,
        out_dir=out / "fewshot",
        shots=[spec.shots],
        overrides=overrides,
    )
    for job, _, jdir in plan:
        if (jdir / "result.json").is_file():
            summary.test[job.seed] = read_json(jdir / "result.json")["result"]
        else:
            attempts = read_json(jdir / "state.json") if (jdir / "state.json").is_file() else {}
            last = (attempts.get("attempts") or [{}])[-1]
            summary.test_failed[job.seed] = last.get("error", "no result (see its folder)")
    summary.report = write_report(folder, spec, summary, seeds)
    return summary


def write_report(
    folder: StudyFolder, spec: StudySpec, summary: TuneSummary, seeds: Sequence[int]
) -> str:
    """``report.md`` and ``result.json``: the search, the chosen setting, its test score."""
    chosen = summary.chosen or {}
    accs = [summary.test[s]["accuracy"] for s in seeds if s in summary.test]
    mean = statistics.mean(accs) if accs else None
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary.states.items()))
    per_seed = ", ".join(
        f"seed {s}: {summary.test[s]['accuracy']:.2f}" for s in seeds if s in summary.test
    )
    md = (
        f"# Study {folder.folder.name}: {spec.method} on {spec.dataset}, "
        f"{shots_text(spec.shots)}\n\n"
        f"Search: {summary.searched} of {summary.budget} trials ({states}); sampler "
        f"{spec.sampler}, pruner {spec.pruner}; scored on the few-shot validation split "
        f"(seed {spec.seed}); search wall time {summary.search_seconds:.0f} s.\n\n"
        f"Chosen: trial {chosen.get('trial')}, validation {spec.metric} "
        f"{chosen.get('value', float('nan')):.2f}: {' '.join(chosen.get('overrides', []))}\n\n"
    )
    if mean is not None:
        md += (
            f"Test accuracy of the chosen setting (trained once per seed on the training split, "
            f"scored once on the test split): **{mean:.2f} ± {std:.2f}** ({per_seed}).\n"
        )
    for s, err in summary.test_failed.items():
        md += f"\nFinal run of seed {s} failed: {err}\n"
    write_text(folder.folder / REPORT, md)
    result = {
        "method": spec.method,
        "dataset": spec.dataset,
        "shots": spec.shots,
        "budget": summary.budget,
        "trials": summary.states,
        "search_seconds": summary.search_seconds,
        "chosen": chosen,
        "test": {str(s): summary.test[s] for s in seeds if s in summary.test},
        "test_accuracy_mean": mean,
        "test_accuracy_std": std,
    }
    write_text(folder.folder / RESULT, json.dumps(result, indent=1))
    return md
