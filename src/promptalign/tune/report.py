"""What a study leaves besides its trials: the trials table, the chosen setting, the plots.

Written into the study folder from its storage, whatever ran the trials:

* ``trials.md`` / ``trials.csv``: every trial with its state, validation score, epochs trained,
  training time and searched values (failed trials with their error);
* ``chosen.json`` and ``chosen.yaml``: the best finished trial's values, and the config of a run
  with them that ``promptalign train --config chosen.yaml`` accepts (it trains the first seed's
  final run again);
* ``history.png`` and ``importance.png``: Optuna's optimisation history and parameter
  importances (``optuna.visualization.matplotlib``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..benchmark.tables import write_table
from ..config import dump_yaml
from ..engine.checkpoint import write_text
from .space import override_text
from .study import StudyError, StudyFolder, StudySpec, optuna

log = logging.getLogger(__name__)

CHOSEN = "chosen.json"
CHOSEN_CONFIG = "chosen.yaml"
# fixed settings `benchmark --tuned` carries with the searched ones (the others describe where
# and what the study ran: the benchmark command sets them itself)
CARRIED = ("method.", "optim.", "data.crop_scale=")


def best_trial(trials: Sequence[Any]) -> Any | None:
    """The finished trial with the highest validation score (the first of equal ones)."""
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def chosen_values(spec: StudySpec, trial: Any) -> dict[str, Any]:
    """A trial's values, as the config holds them, by key."""
    return {p.key: p.value_of(trial.params[p.key]) for p in spec.space}


def shots_text(n: int) -> str:
    return f"{n} shot{'' if n == 1 else 's'}"


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else override_text(value)


def write_trials_table(folder: StudyFolder, spec: StudySpec, trials: Sequence[Any]) -> str:
    """``trials.md`` and ``trials.csv``; returns the Markdown."""
    best = best_trial(trials)
    header = ["trial", "state", f"val {spec.metric}", "epochs", "time (s)"]
    header += [p.key for p in spec.space] + ["note"]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        state = t.state.name.lower() + (" (chosen)" if best is not None and t is best else "")
        value = f"{t.value:.2f}" if t.value is not None else "–"
        if t.state.name == "PRUNED" and t.intermediate_values:
            value = f"{t.intermediate_values[max(t.intermediate_values)]:.2f}"
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        params = [
            _shown(p.value_of(t.params[p.key])) if p.key in t.params else "–" for p in spec.space
        ]
        note = t.user_attrs.get("error", "")
        if t.state.name == "PRUNED":
            done = t.user_attrs.get("epochs_done")  # the steps are percent of the schedule
            note = f"pruned after epoch {done}" if done else "pruned"
        rows.append(
            [
                str(t.number),
                state,
                value,
                str(t.user_attrs.get("epochs_done", "–")),
                f"{seconds:.0f}" if seconds is not None else "–",
                *params,
                note.replace("|", "/"),
            ]
        )
    note = (
        f"Validation {spec.metric} on the few-shot validation split ({spec.dataset}, "
        f"{shots_text(spec.shots)}, seed {spec.seed}); a pruned trial shows its last score."
    )
    return write_table(folder.folder, "trials", header, rows, note)


def write_plots(
    folder: StudyFolder, study: Any, metric: str = "accuracy"
) -> tuple[list[Path], list[str]]:
    """``history.png`` and ``importance.png`` (Optuna's matplotlib plots); returns the files
    written and why any was not (too few finished trials)."""
    op = optuna()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    written, notes = [], []
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return written, ["plots: not drawn (no trial has finished)"]
    plots = (
        ("history.png", vis.plot_optimization_history),
        ("importance.png", vis.plot_param_importances),
    )
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", op.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # matplotlib: an empty legend
            try:
                ax = plot(study, target_name=f"validation {metric}")
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                notes.append(f"{name}: not drawn ({str(e).splitlines()[0] if str(e) else e})")
                plt.close("all")
                continue
        fig = getattr(ax, "figure", None) or ax.flat[0].figure
        fig.set_size_inches(7, 4.2)
        fig.tight_layout()
        tmp = folder.folder / f".{name}"
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        tmp.replace(folder.folder / name)
        written.append(folder.folder / name)
    return written, notes


def write_chosen(
    folder: StudyFolder, spec: StudySpec, trial: Any, data_root: str
) -> dict[str, Any]:
    """``chosen.json`` (the trial, its score, values and overrides) and ``chosen.yaml`` (a run
    config with them, for ``promptalign train --config``); returns chosen.json's content."""
    values = chosen_values(spec, trial)
    chosen = {
        "trial": trial.number,
        "value": trial.value,
        "metric": spec.metric,
        "params": values,
        "overrides": spec.chosen_overrides(values),
        "method": spec.method,
        "dataset": spec.dataset,
        "shots": spec.shots,
        "fixed": list(spec.fixed),
    }
    write_text(folder.folder / CHOSEN, json.dumps(chosen, indent=1))
    cfg = spec.run_config(data_root, chosen["overrides"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=True))
    head = (
        f"# chosen by promptalign tune: trial {trial.number} of {folder.folder}, validation "
        f"{spec.metric} {trial.value:.2f}\n"
    )
    write_text(folder.folder / CHOSEN_CONFIG, head + dump_yaml(cfg))
    return chosen


def tuned_overrides(study_dir: str | Path) -> list[str]:
    """The overrides ``promptalign benchmark --tuned STUDY`` adds: the study's chosen values and
    its fixed ``method.*``, ``optim.*`` and ``data.crop_scale`` settings, for the study's
    method's jobs only (``METHOD:KEY=VALUE``).

    Raises:
        StudyError: not a study folder, or one without a chosen setting yet.
    """
    folder = StudyFolder(study_dir)
    folder.read()  # not a study folder: StudyError
    path = folder.folder / CHOSEN
    if not path.is_file():
        raise StudyError(
            f"--tuned {study_dir}: the study has no chosen setting yet; run its promptalign "
            "tune command until its search ends"
        )
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))
        carried = [o.strip() for o in chosen["fixed"] if o.strip().startswith(CARRIED)]
        return [f"{chosen['method']}:{o}" for o in [*carried, *chosen["overrides"]]]
    except (OSError, ValueError, KeyError, TypeError):
        raise StudyError(
            f"--tuned {study_dir}: {path} is unreadable; run the study's tune command again to "
            "write it"
        ) from None
