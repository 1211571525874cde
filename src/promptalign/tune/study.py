"""The study folder and its workers: trials as ordinary run folders scored on validation.

Layout of a study folder ``STUDY/``::

    study.json      format, promptalign version, the study's definition (method, dataset,
                    shots, search space, fixed overrides, sampler, pruner, metric, seed), its
                    budget, the Optuna storage URL when not the default, and every submission
    study.db        Optuna's storage (SQLite) unless another SQLAlchemy URL was given
    trials/NNNN/    trial NNNN: ``.lock`` while a worker runs it, ``trial.json`` (its values and
                    state), ``error.txt`` (a failed trial's traceback) and ``run/``, an ordinary
                    run folder scored on the few-shot validation split (``run.eval_split=val``)
    workers/        one folder per launched worker (the launchers' records)

A worker (:class:`WorkerTask`, run by any launcher) loops: under a short lock on the study it
takes over a trial whose worker is gone (a RUNNING trial whose folder's claim is stale: its run
resumes from its last epoch) or asks Optuna for a new one while the budget allows, claims the
trial's folder, trains it with an epoch hook that reports the validation score and stops
(``optuna.TrialPruned``) when the pruner says so, and tells Optuna the result. Workers on any
number of hosts share one study through the storage and the folder, so an interrupted study
resumes where it stopped, and its folder is the one record of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import traceback
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promptalign

from ..benchmark.grid import JobState, Submissions, folder_state
from ..benchmark.jobs import Job, job_config, run_finished, train_or_resume
from ..claim import LOCK, Claim, ClaimLost, holder_of
from ..config import ConfigError, RunConfig, apply_overrides, to_dict
from ..engine.build import RESUMABLE, _flatten
from ..engine.checkpoint import RUN_INFO, read_json, write_text
from .space import Param, override_text

log = logging.getLogger(__name__)

STUDY_FORMAT = 1
MANIFEST = "study.json"
DATABASE = "study.db"
TRIALS = "trials"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
METRICS = ("accuracy", "macro_f1")
_LOCK = ".study.lock"
_ASK_LOCK = ".ask.lock"


class StudyError(ConfigError):
    """The study folder cannot be used as asked (made for another study, another format, a
    storage that does not hold it); nothing in it was changed."""


def optuna():
    """Optuna, imported on first use, its messages sent through :mod:`logging` (its own
    handler off); a missing install is one line saying how to add it."""
    try:
        import optuna as op
    except ImportError:
        raise ConfigError(
            "promptalign tune needs optuna: pip install 'promptalign[tune]'"
        ) from None
    op.logging.disable_default_handler()
    op.logging.enable_propagation()
    return op


# --------------------------------------------------------------------------- the definition
@dataclass(frozen=True)
class StudySpec:
    """What a study searches (its identity: a study folder refuses another one).

    Attributes:
        method, dataset, shots: the runs' method, dataset and labelled images per class.
        space: the searched keys.
        fixed: ``KEY=VALUE`` overrides every run of the study gets (trials and final runs).
        sampler: ``tpe``, ``random`` or ``grid``.
        pruner: ``median``, ``halving`` (successive halving) or ``none``.
        metric: the validation metric maximised (``accuracy`` or ``macro_f1``).
        seed: the trials' run seed (few-shot sample, initialisation) and the samplers' seed.
    """

    method: str
    dataset: str
    shots: int
    space: tuple[Param, ...]
    fixed: tuple[str, ...] = ()
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "accuracy"
    seed: int = 1

    def __post_init__(self) -> None:
        for name, allowed in (
            ("sampler", SAMPLERS),
            ("pruner", PRUNERS),
            ("metric", METRICS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{name} {getattr(self, name)}: choose one of {', '.join(allowed)}"
                )
        if self.sampler == "grid":
            for p in self.space:
                if p.grid_values() is None:
                    raise ConfigError(
                        f"--sampler grid: {p.key} is a real range; give its values "
                        f"({p.key}=A,B,C) or use --sampler tpe or random"
                    )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["space"] = [p.to_dict() for p in self.space]
        d["fixed"] = list(self.fixed)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudySpec:
        return cls(
            str(d["method"]),
            str(d["dataset"]),
            int(d["shots"]),
            tuple(Param.from_dict(p) for p in d["space"]),
            tuple(d.get("fixed", ())),
            d.get("sampler", "tpe"),
            d.get("pruner", "median"),
            d.get("metric", "accuracy"),
            int(d.get("seed", 1)),
        )

    def settings(self) -> dict[str, Any]:
        """The runs' config as flat ``key: value`` pairs, without the settings that do not
        change results (device, loader workers, data root, ...): what makes two fixed overrides
        lists the same study."""
        flat = _flatten(to_dict(self.run_config(".")))
        return {k: v for k, v in flat.items() if k not in RESUMABLE}

    def grid_size(self) -> int | None:
        """Points of the grid (``--sampler grid``), else None."""
        if self.sampler != "grid":
            return None
        n = 1
        for p in self.space:
            n *= len(p.grid_values() or ())
        return n

    def run_config(self, data_root: str, overrides: Sequence[str] | Mapping[str, Any] = ()):
        """The config of a run of this study: the method's published few-shot settings, the
        dataset, shots and seed, the fixed overrides, then ``overrides`` (e.g. a trial's
        values)."""
        job = Job("fewshot", self.dataset, self.method, self.shots, self.seed)
        cfg = job_config(job, list(self.fixed), data_root)
        return apply_overrides(cfg, overrides)

    def trial_config(self, data_root: str, values: Mapping[str, Any] | None = None) -> RunConfig:
        """A trial's config: scored on the validation split (the test split is never read),
        evaluated every epoch when a pruner needs intermediate scores, with ``values`` for the
        searched keys."""
        cfg = self.run_config(data_root, {"run.eval_split": "val"})
        if self.pruner != "none" and cfg.run.eval_every == 0:
            if any(f.partition("=")[0].strip() == "run.eval_every" for f in self.fixed):
                raise ConfigError(
                    f"run.eval_every=0 leaves the {self.pruner} pruner no intermediate scores: "
                    "give run.eval_every >= 1, or --pruner none"
                )
            cfg = apply_overrides(cfg, {"run.eval_every": 1})
        return apply_overrides(cfg, dict(values or {}))

    def chosen_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """``KEY=VALUE`` overrides of a trial's values (config values by key)."""
        return [f"{p.key}={override_text(params[p.key])}" for p in self.space]


# --------------------------------------------------------------------------- the folder
class StudyFolder(Submissions):
    """A study folder (see the module docstring): its definition, storage, trials and the
    launchers' submissions."""

    manifest_name = MANIFEST
    lock_name = _LOCK
    what = "study manifest"

    def trial_dir(self, number: int) -> Path:
        return self.folder / TRIALS / f"{number:04d}"

    def read(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            raise StudyError(f"{self.folder} is not a study folder: no {MANIFEST}")
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = None
        if not isinstance(m, dict) or "spec" not in m:
            raise StudyError(
                f"{self.manifest_path} is unreadable or not a study manifest; restore it, or "
                "give another --out for a new study"
            )
        if m.get("format") != STUDY_FORMAT:
            raise StudyError(
                f"{self.folder} was written by promptalign {m.get('promptalign', '?')} in study "
                f"format {m.get('format')!r}; this promptalign {promptalign.__version__} reads "
                f"format {STUDY_FORMAT}: use that version, or another --out"
            )
        return m

    def _write(self, m: dict[str, Any]) -> None:
        write_text(self.manifest_path, json.dumps(m, indent=1))

    def follow_hint(self) -> str:
        return (
            f"run the same promptalign tune command again once they end for the report "
            f"(cancel them with scancel); {self.folder / 'trials.md'} lists the trials so far"
        )

    def spec(self) -> StudySpec:
        return StudySpec.from_dict(self.read()["spec"])

    def storage_url(self) -> str:
        """The Optuna storage: the URL the study was made with, else ``study.db`` here."""
        url = self.read().get("storage")
        return url or f"sqlite:///{(self.folder / DATABASE).resolve()}"

    def check_same(self, spec: StudySpec, storage: str | None) -> None:
        """Refuse (StudyError, one line) a folder that holds another study."""
        m = self.read()
        old = StudySpec.from_dict(m["spec"])
        if (old.method, old.dataset) != (spec.method, spec.dataset):
            raise StudyError(
                f"{self.folder} holds a study of method {old.method} on dataset {old.dataset}; "
                f"this command tunes {spec.method} on {spec.dataset}: give another --out"
            )
        a, b = old.to_dict(), spec.to_dict()
        a["space"] = " ".join(p.describe() for p in old.space)
        b["space"] = " ".join(p.describe() for p in spec.space)
        diff = [(k, a[k], b[k]) for k in a if k != "fixed" and a[k] != b[k]]
        sa, sb = old.settings(), spec.settings()
        diff += [
            (k, sa.get(k, "(unset)"), sb.get(k, "(unset)"))
            for k in sorted(sa.keys() | sb.keys())
            if sa.get(k) != sb.get(k)
        ]
        if diff:
            k, was, now = diff[0]
            raise StudyError(
                f"{self.folder} holds a study with {k} {was}; this command gives {now}: run it "
                "with the study's own settings to resume it, or give another --out for a new "
                "study"
            )
        if storage is not None and storage != m.get("storage"):
            raise StudyError(
                f"{self.folder}'s study lives in {m.get('storage') or DATABASE}, not in "
                f"{storage}: drop --storage (or give that URL) to resume it"
            )

    def create_or_update(
        self, spec: StudySpec, *, trials: int, data_root: str, storage: str | None
    ) -> dict[str, Any]:
        """Write the manifest of a new study, or record the budget and data root a resumed one
        runs with now; returns the manifest."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self.exists():
                m = self.read()
            else:
                m = {
                    "format": STUDY_FORMAT,
                    "promptalign": promptalign.__version__,
                    "name": f"promptalign-{self.folder.name}-{uuid.uuid4().hex[:8]}",
                    "created": time.time(),
                    "spec": spec.to_dict(),
                    "storage": storage,
                    "submissions": [],
                }
            m["spec"] = spec.to_dict()  # the same study; its device or loader workers may change
            m.update(trials=trials, data_root=str(Path(data_root).expanduser().resolve()))
            self._write(m)
        return m

    # ------------------------------------------------------------------ Optuna
    def optuna_study(self, worker: int = 0, *, create: bool = False):
        """The study in its storage, with this process's sampler (seeded from the study's seed
        and ``worker``, so parallel workers draw differently) and pruner."""
        op = optuna()
        m = self.read()
        spec = StudySpec.from_dict(m["spec"])
        url = self.storage_url()
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):  # workers wait for each other's writes instead of failing
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        try:
            storage = op.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # SQLAlchemy: a bad URL, a driver missing, no server
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StudyError(f"storage {url}: cannot open it ({first})") from None
        sampler, pruner = _sampler(op, spec, worker), _pruner(op, spec)
        if create:
            return op.create_study(
                storage=storage,
                study_name=m["name"],
                direction="maximize",
                load_if_exists=True,
                sampler=sampler,
                pruner=pruner,
            )
        try:
            return op.load_study(
                study_name=m["name"], storage=storage, sampler=sampler, pruner=pruner
            )
        except KeyError:
            raise StudyError(
                f"storage {url} holds no study {m['name']} (the study of {self.folder}); was "
                "it deleted or moved?"
            ) from None

    def budget(self) -> int:
        return int(self.read()["trials"])

    def data_root(self) -> str:
        return str(self.read()["data_root"])


def _seed(seed: int, worker: int) -> int:
    return int(hashlib.sha256(f"{seed}:{worker}".encode()).hexdigest()[:8], 16)


def _sampler(op, spec: StudySpec, worker: int):
    seed = _seed(spec.seed, worker)
    if spec.sampler == "random":
        return op.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        grid = {p.key: p.grid_values() for p in spec.space}
        return op.samplers.GridSampler(grid, seed=seed)
    return op.samplers.TPESampler(seed=seed)


# Trials report their validation score at their progress through their own schedule, in percent
# (epoch 3 of 10 is step 30), so trials with other epoch counts are compared at the same point of
# their learning-rate schedules, not at the same epoch (where a 10-epoch cosine schedule has
# annealed and a 100-epoch one has not). No trial is pruned in its first quarter: it holds the
# methods' warm-up epochs (CoOp's first epoch trains at a constant 1e-5 whatever optim.lr is,
# so its score there says nothing about the setting).
PRUNE_AFTER = 25


def progress_step(epoch: int, epochs: int) -> int:
    """The Optuna step of the end of 0-based ``epoch`` of ``epochs``: percent of the schedule."""
    return -(-100 * (epoch + 1) // max(epochs, 1))


def report_epoch(trial: Any, value: float, epoch: int, epochs: int) -> None:
    """Report ``value``, the score after 0-based ``epoch`` of ``epochs``, to an Optuna trial at
    every percent of the schedule since the previous epoch's, so a trial of any epoch count has
    a value at each step another trial is compared at."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step reported before an interruption: kept as it was
        for step in range(progress_step(epoch - 1, epochs) + 1, progress_step(epoch, epochs) + 1):
            trial.report(value, step)


def _pruner(op, spec: StudySpec):
    if spec.pruner == "median":  # below the median of earlier trials at the same progress
        return op.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_AFTER)
    if spec.pruner == "halving":
        return op.pruners.SuccessiveHalvingPruner(min_resource=PRUNE_AFTER)
    return op.pruners.NopPruner()


# --------------------------------------------------------------------------- the workers
@dataclass(frozen=True)
class WorkerTask:
    """One worker of a study, as a launcher runs it (see :class:`~promptalign.benchmark.
    launchers.LaunchTask`): it runs trials until the study's budget is spent.

    Attributes:
        study_dir: the study folder.
        index: the worker's number in its submission (seeds its sampler).
        submission: the id of the submission that launched it (its folder's name).
        device: the device its trials train on.
        retries: times a worker that failed is started again in the same process.
        package: the submitter's promptalign folder.
    """

    study_dir: Path
    index: int
    submission: str
    device: str = "auto"
    retries: int = 0
    package: str = ""
    what = "tune worker"
    name = "tune"

    @property
    def key(self) -> str:
        return f"worker-{self.index}"

    @property
    def folder(self) -> Path:
        return self.study_dir / "workers" / self.submission / self.key

    def work(self, backbone=None) -> dict[str, Any]:
        return {"trials": run_worker(self.study_dir, self.index, backbone=backbone)}

    def progress(self) -> tuple[int, int, int] | None:
        return None

    def result_record(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"worker": self.key, "result": result}

    def state(self) -> JobState:
        return folder_state(self.folder)


def _counted(op) -> tuple:
    s = op.trial.TrialState
    return (s.COMPLETE, s.PRUNED, s.FAIL, s.RUNNING)


def next_trial(folder: StudyFolder, study, op) -> tuple[Any, Claim, bool] | None:
    """Under the study's ask lock: a trial whose worker is gone (resumed) or a new one while
    the budget allows, with its folder claimed; None when the budget is spent. Returns
    (trial, claim, resumed)."""
    lock = Claim(folder.folder / _ASK_LOCK, what="tune: taking a trial", stale_after_s=120)
    lock.acquire(wait_s=600)
    try:
        running = study.get_trials(deepcopy=False, states=(op.trial.TrialState.RUNNING,))
        for t in running:
            tdir = folder.trial_dir(t.number)
            if holder_of(tdir) is None:  # its worker is gone: take it over, resume its run
                claim = Claim(tdir / LOCK, what="tune trial")
                if claim.try_acquire() is None:
                    log.info("trial %d: its worker is gone; resuming it", t.number)
                    return op.trial.Trial(study, t._trial_id), claim, True
        spent = len(study.get_trials(deepcopy=False, states=_counted(op)))
        budget = folder.budget()
        grid = folder.spec().grid_size()
        if spent >= (min(budget, grid) if grid else budget):
            return None
        trial = study.ask()
        tdir = folder.trial_dir(trial.number)
        if (tdir / "run").exists():
            raise StudyError(
                f"{tdir} already holds a run, but the storage gives trial {trial.number} as "
                "new: the study's storage and its folder disagree (was study.db replaced?)"
            )
        claim = Claim(tdir / LOCK, what="tune trial")
        claim.acquire()
        return trial, claim, False
    finally:
        lock.release()


def run_worker(study_dir: str | Path, worker: int = 0, *, backbone=None) -> list[int]:
    """Run trials of the study in ``study_dir`` until its budget is spent; returns the numbers
    of the trials this worker ended (finished, pruned or failed). A trial that fails is
    recorded (``error.txt``, state FAIL) and the worker goes on; Ctrl-C leaves the trial
    running in the storage with its folder unclaimed, so the next worker resumes it."""
    op = optuna()
    folder = StudyFolder(study_dir)
    spec = folder.spec()
    study = folder.optuna_study(worker)
    data_root = folder.data_root()
    ended = []
    while (taken := next_trial(folder, study, op)) is not None:
        trial, claim, resumed = taken
        try:
            if run_trial(study, trial, spec, folder, data_root, backbone, resumed, op):
                ended.append(trial.number)
        finally:
            claim.release()
    return ended


def run_trial(study, trial, spec, folder, data_root, backbone, resumed, op) -> bool:
    """Train one trial (or resume it) and tell the study how it ended; False when this process
    lost the trial to another one (nothing told)."""
    tdir = folder.trial_dir(trial.number)
    run_dir = tdir / "run"
    started = time.monotonic()
    before = float(trial.user_attrs.get("seconds", 0.0)) if resumed else 0.0
    values = {p.key: p.suggest(trial) for p in spec.space}
    record = {"trial": trial.number, "params": {k: override_text(v) for k, v in values.items()}}

    def seconds() -> float:
        return before + time.monotonic() - started

    def on_epoch(end: dict[str, Any]) -> None:
        trial.set_user_attr("seconds", seconds())
        trial.set_user_attr("epochs_done", end["epoch"] + 1)
        if end["eval"] is None:
            return
        report_epoch(trial, float(end["eval"][spec.metric]), end["epoch"], end["epochs"])
        if trial.should_prune():
            raise op.TrialPruned(f"pruned after epoch {end['epoch'] + 1} of {end['epochs']}")

    state = op.trial.TrialState
    try:
        cfg = spec.trial_config(data_root, values)
        write_text(tdir / "trial.json", json.dumps({**record, "state": "running"}, indent=1))
        if run_finished(run_dir):  # trained before its worker stopped: its score is on disk
            value = float(read_json(run_dir / RUN_INFO)["metrics"][spec.metric])
        else:
            result = train_or_resume(cfg, run_dir, backbone, epoch_callbacks=[on_epoch])
            value = float(result.metrics[spec.metric])
    except op.TrialPruned as e:
        trial.set_user_attr("seconds", seconds())
        study.tell(trial, state=state.PRUNED)
        write_text(tdir / "trial.json", json.dumps({**record, "state": "pruned", "note": str(e)}))
        return True
    except ClaimLost as e:  # another process took the trial over while this one was stopped
        log.warning("trial %d: %s", trial.number, e)
        return False
    except Exception as e:  # a setting that fails (diverges, cannot be built): the study goes on
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        write_text(tdir / "error.txt", traceback.format_exc())
        trial.set_user_attr("error", f"{type(e).__name__}: {first}"[:500])
        trial.set_user_attr("seconds", seconds())
        study.tell(trial, state=state.FAIL)
        write_text(tdir / "trial.json", json.dumps({**record, "state": "failed", "error": first}))
        log.warning("trial %d failed (details in %s): %s", trial.number, tdir / "error.txt", first)
        return True
    trial.set_user_attr("seconds", seconds())
    study.tell(trial, value)
    write_text(tdir / "trial.json", json.dumps({**record, "state": "complete", "value": value}))
    return True
