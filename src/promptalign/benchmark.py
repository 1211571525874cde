"""Benchmark protocols in one call: base-to-new, few-shot, cross-dataset, domain generalisation.

Every (dataset, method, shots, seed) training is an independent job with its own run folder under
``<out>/<protocol>/jobs/<dataset>/<method>/shots<K>-seed<S>-<fingerprint>/``, where the fingerprint
is a hash of the job's resolved run config (method preset filled in; loader workers and the
progress bar left out, since they do not change results). A finished job leaves ``result.json``
(written atomically, with its config). Re-running with the same settings skips finished jobs and
resumes an interrupted one from its last epoch; re-running with other settings (e.g.
``optim.epochs=3`` after 2) gives new fingerprints, so old results are never reported as new ones.
Every job's config is built and checked before any job runs, so a typo in an override, a method or
a dataset name fails once, with one message; a job that fails while running is recorded
(``error.txt``) and reported in the summary without stopping the others. Tables are written as
Markdown and CSV (mean ± std over seeds, the published numbers beside ours where they exist) and
few-shot curves as PNG.

Defaults come from each method's published preset for the protocol (``presets/``); ``overrides``
(``key=value``) apply to every job, and ``method:key=value`` only to that method's jobs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import statistics
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, apply_overrides, resolve_optim, to_dict
from .engine import evaluate_run, harmonic_mean, train
from .engine.checkpoint import RESUME_STATE, RUN_INFO, write_text
from .presets import make_preset

log = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "fewshot", "cross_dataset", "domain_generalisation")
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
CROSS_TARGETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)


def default_datasets(protocol: str) -> tuple[str, ...]:
    """The datasets the papers report for ``protocol`` (ImageNet + 10 others, or ImageNet as
    source)."""
    return (
        ("imagenet",)
        if protocol in ("cross_dataset", "domain_generalisation")
        else ("imagenet", *CROSS_TARGETS)
    )


@dataclass(frozen=True)
class Job:
    protocol: str
    dataset: str
    method: str
    shots: int
    seed: int
    targets: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/shots{self.shots}-seed{self.seed}"


@dataclass
class BenchmarkSummary:
    out_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)  # job -> who runs it (another process)
    tables: dict[str, str] = field(default_factory=dict)  # file name -> markdown


def published() -> dict[str, Any]:
    return yaml.safe_load(
        (resources.files("promptalign") / "published.yaml").read_text(encoding="utf-8")
    )


def make_jobs(
    protocol: str,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    targets: Sequence[str] | None = None,
) -> list[Job]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} unknown; use one of {PROTOCOLS}")
    jobs = []
    if protocol == "fewshot":
        for d in datasets:
            for m in methods:
                for k in shots:
                    for s in seeds:
                        jobs.append(Job(protocol, d, m, k, s))
        return jobs
    default = {"cross_dataset": CROSS_TARGETS, "domain_generalisation": DG_TARGETS}.get(
        protocol, ()
    )
    for d in datasets:
        for m in methods:
            for s in seeds:
                jobs.append(
                    Job(protocol, d, m, 16, s, tuple(targets if targets is not None else default))
                )
    return jobs


def split_recipe(method: str) -> tuple[str, str | None]:
    """``"plot@two_stage"`` -> ("plot", "two_stage"): a method run as one of its multi-run
    recipes (its config class's ``RECIPES``); ``"plot"`` -> ("plot", None)."""
    name, _, recipe = method.partition("@")
    return name, recipe or None


def recipe_stages(method: str) -> tuple[Mapping[str, Any], ...]:
    """The per-run config changes of ``method``'s recipe, in order; ``({},)`` without a recipe."""
    from .methods import list_methods
    from .registry import METHODS

    name, recipe = split_recipe(method)
    if recipe is None:
        return ({},)
    list_methods()
    recipes = getattr(METHODS.get(name).config_class, "RECIPES", {})
    if recipe not in recipes:
        raise ValueError(
            f"method {name!r} has no recipe {recipe!r}; recipes: {sorted(recipes) or 'none'} "
            f"(use {name!r} alone for one run)"
        )
    return tuple(recipes[recipe])


def job_config(job: Job, base_overrides: Sequence[str], data_root: str) -> RunConfig:
    preset_protocol = {"domain_generalisation": "cross_dataset"}.get(job.protocol, job.protocol)
    name, _ = split_recipe(job.method)
    cfg = make_preset(name, preset_protocol)
    generic = [o for o in base_overrides if ":" not in o.split("=", 1)[0]]
    specific = [
        o.split(":", 1)[1]
        for o in base_overrides
        if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] in (name, job.method)
    ]
    cfg = apply_overrides(
        cfg,
        {
            "data.dataset": job.dataset,
            "data.root": data_root,
            "data.shots": job.shots,
            "run.seed": job.seed,
            "run.progress": False,
        },
    )
    return apply_overrides(cfg, generic + specific)


def resolved_job_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every method field and the method's published optimisation preset filled in
    (what training uses) and the dataset's training crop, without building the model or reading
    the data; a bad method name, preset or option is a ConfigError."""
    from .data.base import DEFAULT_CROP_SCALE
    from .engine.build import resolve_method
    from .registry import DATASETS

    # unknown method / preset / option: ConfigError; the release's per-dataset settings in
    spec = resolve_method(cfg.method, dataset=cfg.data.dataset)
    optim = resolve_optim(cfg.optim, spec.build().optim, cfg.data.shots)
    crop = cfg.data.crop_scale or (
        DATASETS.get(cfg.data.dataset).crop_scale
        if cfg.data.dataset in DATASETS
        else DEFAULT_CROP_SCALE  # a custom ImageFolder / CSV dataset
    )
    data = dataclasses.replace(cfg.data, crop_scale=tuple(crop))
    return dataclasses.replace(cfg, method=spec, optim=optim, data=data)


# settings that never change a job's result (the data order and augmentation do not depend on them)
_NOT_IN_FINGERPRINT = {("data", "workers"), ("run", "progress")}
# optimisation settings added after jobs were recorded, with the values every earlier job ran with
# (set or unset): left out of the fingerprint (of the run's and the method's optim sections)
# there, so adding them re-runs only the jobs they change
_ADDED_OPTIM = {"adam_eps": (None, 1e-8)}


def _drop_added(d: Any) -> None:
    if isinstance(d, dict):
        optim = d.get("optim")
        if isinstance(optim, dict):
            for key, earlier in _ADDED_OPTIM.items():
                if key in optim and optim[key] in earlier:
                    del optim[key]
        for v in d.values():
            _drop_added(v)


def config_fingerprint(cfg: RunConfig) -> str:
    """A short hash of the resolved config that identifies a job's result."""
    d = to_dict(resolved_job_config(cfg))
    for section, key in _NOT_IN_FINGERPRINT:
        d[section].pop(key, None)
    _drop_added(d)
    d["data"]["root"] = str(Path(d["data"]["root"]).expanduser().resolve())
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def job_dir(out_dir: Path, job: Job, fingerprint: str) -> Path:
    return out_dir / "jobs" / f"{job.key}-{fingerprint}"


def _check_names(
    protocol: str,
    methods: Sequence[str],
    datasets: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    targets: Sequence[str] | None,
    overrides: Sequence[str],
) -> None:
    from .data import list_datasets
    from .methods import list_methods

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} unknown; use one of {', '.join(PROTOCOLS)}")
    known_methods, known_data = list_methods(), list_datasets()
    for m in methods:
        if split_recipe(m)[0] not in known_methods:
            raise ConfigError(
                f"unknown method {m!r} (--methods); choose from {', '.join(known_methods)}"
            )
        try:
            recipe_stages(m)
        except ValueError as e:
            raise ConfigError(f"--methods {m}: {e}") from None
    for d in [*datasets, *(targets or ())]:
        if d not in known_data and not Path(d).expanduser().exists():
            raise ConfigError(
                f"unknown dataset {d!r}: neither a registered dataset "
                "(promptalign list datasets) nor an existing folder / CSV path"
            )
    if protocol == "fewshot":
        bad = [k for k in shots if k < 1]
        if bad or not shots:
            raise ConfigError(
                f"--shots {bad[0] if bad else '(none)'}: shots per class must be >= 1"
            )
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    for o in overrides:
        head = o.split("=", 1)[0]
        if ":" in head and split_recipe(head.split(":", 1)[0])[0] not in known_methods:
            raise ConfigError(
                f"override {o!r} is for method {head.split(':', 1)[0]!r}, which does not "
                f"exist; methods: {', '.join(known_methods)}"
            )


def plan_jobs(
    protocol: str,
    *,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    data_root: str,
    out_dir: Path,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    targets: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
) -> list[tuple[Job, RunConfig, Path]]:
    """Every job with its config and folder, all checked before anything runs (ConfigError)."""
    _check_names(protocol, methods, datasets, shots, seeds, targets, overrides)
    plan = []
    for job in make_jobs(protocol, methods, datasets, seeds, shots, targets):
        cfg = job_config(job, overrides, data_root)
        plan.append((job, cfg, job_dir(out_dir, job, config_fingerprint(cfg))))
    return plan


def run_job(job: Job, cfg: RunConfig, job_dir: Path, backbone=None) -> dict[str, Any]:
    """Train (or resume) one job and evaluate it as its protocol requires."""
    stages = recipe_stages(job.method)
    run_dir = job_dir / "run"
    for i, changes in enumerate(stages):
        if len(stages) > 1:  # recipe: run i starts from run i-1's prompts
            prev, run_dir = run_dir, job_dir / f"run-stage{i + 1}"
            if _finished(run_dir):
                continue
            stage_cfg = apply_overrides(cfg, {f"method.options.{k}": v for k, v in changes.items()})
            if i:
                stage_cfg = apply_overrides(stage_cfg, {"method.init_from": str(prev)})
        else:
            stage_cfg = cfg
        _train_or_resume(stage_cfg, run_dir, backbone)
    dev = cfg.run.device
    if job.protocol == "base2new":
        base = evaluate_run(run_dir, subsample="base", device=dev, backbone=backbone)["accuracy"]
        new = evaluate_run(run_dir, subsample="new", device=dev, backbone=backbone)["accuracy"]
        return {"base": base, "new": new, "H": harmonic_mean(base, new)}
    own = evaluate_run(run_dir, subsample="all", device=dev, backbone=backbone)["accuracy"]
    out = {"accuracy": own}
    for t in job.targets:
        out[t] = evaluate_run(run_dir, dataset=t, subsample="all", device=dev, backbone=backbone)[
            "accuracy"
        ]
    return out


def _train_or_resume(cfg: RunConfig, run_dir: Path, backbone) -> None:
    if run_dir.exists():
        if (run_dir / RESUME_STATE).exists():
            train(None, run_dir, resume=True, backbone=backbone)
        else:  # interrupted before its first checkpoint: start over
            shutil.rmtree(run_dir)
            train(cfg, run_dir, backbone=backbone)
    else:
        train(cfg, run_dir, backbone=backbone)


LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_job(job_dir: Path) -> str | None:
    """Claim ``job_dir`` for this process (a ``.lock`` file created exclusively, holding host and
    pid). Returns None when claimed, else who holds it: benchmark processes sharing an ``--out``
    folder (e.g. one per method) then never run the same job at once. A lock left by a process
    that is gone on this host is taken over."""
    job_dir.mkdir(parents=True, exist_ok=True)
    lock = job_dir / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text(encoding="utf-8").split()
                holder_alive = host != socket.gethostname() or _pid_alive(int(pid))
            except (OSError, ValueError):  # unreadable / half-written: treat as held
                return "another process"
            if holder_alive:
                return f"process {pid} on {host}"
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return None
    return "another process"


def release_job(job_dir: Path) -> None:
    (job_dir / LOCK).unlink(missing_ok=True)


def _finished(run_dir: Path) -> bool:
    """A run whose final evaluation was written (its run.json holds metrics)."""
    try:
        return bool(json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("metrics"))
    except (OSError, ValueError):
        return False


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
) -> BenchmarkSummary:
    """Run every job of ``protocol`` (skipping finished ones) and write tables and plots.

    Args:
        protocol: "base2new", "fewshot", "cross_dataset" or "domain_generalisation".
        methods: method names; ``METHOD@RECIPE`` runs a method's multi-stage recipe as one job.
        datasets: datasets to train on (for cross-dataset / DG: the source, ImageNet).
        seeds: seeds, one job each.
        data_root: the folder holding the datasets (CoOp's layout).
        out: output folder; jobs and tables go under ``out/protocol/``.
        shots: shot counts (few-shot protocol; 16 for the others).
        targets: target datasets (cross-dataset / DG; None: the protocol's).
        overrides: ``KEY=VALUE`` for every job, ``METHOD:KEY=VALUE`` for one method's jobs.
        backbone: an already built backbone to share between jobs.
        on_job_done: called with each finished job and its result.

    Returns:
        What ran, what was skipped (finished before), busy (run by another process) or failed,
        and the tables as Markdown.
    """
    out_dir = Path(out).expanduser() / protocol
    summary = BenchmarkSummary(out_dir)
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
    for job, cfg, jdir in plan:
        result_path = jdir / "result.json"
        if result_path.is_file():
            summary.skipped.append(job.key)
            continue
        holder = acquire_job(jdir)
        if holder is not None:  # another benchmark process on the same folder runs it now
            summary.busy[job.key] = holder
            continue
        try:
            if result_path.is_file():  # finished by that other process meanwhile
                summary.skipped.append(job.key)
                continue
            result = run_job(job, cfg, jdir, backbone)
            (jdir / "error.txt").unlink(missing_ok=True)
            write_text(
                result_path,
                json.dumps(
                    {"job": dataclasses.asdict(job), "result": result, "config": to_dict(cfg)},
                    indent=2,
                ),
            )
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failed job is reported (once, by the caller), the others go on
            first = str(e).splitlines()[0] if str(e) else ""
            log.info("job %s failed (details in %s): %s", job.key, jdir / "error.txt", first)
            write_text(jdir / "error.txt", traceback.format_exc())
            summary.failed[job.key] = f"{type(e).__name__}: {first}"
            continue
        finally:
            release_job(jdir)
        summary.ran.append(job.key)
        if on_job_done:
            on_job_done(job, result)
    jobs = [job for job, _, _ in plan]
    summary.tables = write_tables(
        protocol, jobs, out_dir, summary.failed, job_dirs={job: jdir for job, _, jdir in plan}
    )
    return summary


# --------------------------------------------------------------------------- tables and plots
def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _load_results(jobs: Sequence[Job], job_dirs: dict[Job, Path]) -> dict[Job, dict]:
    found = {}
    for job in jobs:
        p = job_dirs[job] / "result.json"
        if p.is_file():
            found[job] = json.loads(p.read_text())["result"]
    return found


def _write_table(
    out_dir: Path, name: str, header: list[str], rows: list[list[str]], note: str = ""
) -> str:
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    if note:
        md += f"\n{note}\n"
    write_text(out_dir / f"{name}.md", md)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    write_text(out_dir / f"{name}.csv", buf.getvalue())
    return md


def write_tables(
    protocol: str,
    jobs: Sequence[Job],
    out_dir: Path,
    failed: dict[str, str],
    job_dirs: dict[Job, Path],
) -> dict[str, str]:
    """Tables (and few-shot plots) from the results in ``job_dirs`` (the folders of these jobs'
    current configs, see :func:`plan_jobs`)."""
    results = _load_results(jobs, job_dirs)
    pub = published()
    methods = list(dict.fromkeys(j.method for j in jobs))
    datasets = list(dict.fromkeys(j.dataset for j in jobs))
    tables: dict[str, str] = {}
    note = f"{len(failed)} job(s) failed: {', '.join(failed)}" if failed else ""

    def vals(method, dataset, key, shots=None):
        return [
            r[key]
            for j, r in results.items()
            if j.method == method
            and j.dataset == dataset
            and (shots is None or j.shots == shots)
            and key in r
        ]

    if protocol == "base2new":
        rows = []
        for m in methods:
            for d in datasets:
                rows.append(
                    [m, d] + [_mean_std(vals(m, d, k)) for k in ("base", "new", "H")] + ["", "", ""]
                )
            avg = {
                k: [statistics.mean(vals(m, d, k)) for d in datasets if vals(m, d, k)]
                for k in ("base", "new", "H")
            }
            p = pub.get("base2new", {}).get(split_recipe(m)[0])
            rows.append(
                [m, "**average**"]
                + [
                    _mean_std([statistics.mean(avg[k])]) if avg[k] else "–"
                    for k in ("base", "new", "H")
                ]
                + ([f"{x:.2f}" for x in p] if p else ["–", "–", "–"])
            )
        tables["base2new"] = _write_table(
            out_dir,
            "base2new",
            [
                "method",
                "dataset",
                "base",
                "new",
                "H",
                "published base",
                "published new",
                "published H",
            ],
            rows,
            note,
        )
    elif protocol == "fewshot":
        shot_list = sorted({j.shots for j in jobs})
        rows = []
        for m in methods:
            for d in datasets:
                rows.append([m, d] + [_mean_std(vals(m, d, "accuracy", k)) for k in shot_list])
            p = pub.get("fewshot", {}).get(split_recipe(m)[0])
            if p:
                rows.append(
                    [m, "published average"] + [f"{p[k]:.2f}" if k in p else "–" for k in shot_list]
                )
        tables["fewshot"] = _write_table(
            out_dir,
            "fewshot",
            ["method", "dataset"] + [f"{k} shots" for k in shot_list],
            rows,
            note,
        )
        _plot_fewshot(results, methods, datasets, shot_list, out_dir)
    else:
        targets = list(dict.fromkeys(t for j in jobs for t in j.targets))
        rows = []
        for m in methods:
            for d in datasets:
                cells = [_mean_std(vals(m, d, "accuracy"))] + [
                    _mean_std(vals(m, d, t)) for t in targets
                ]
                tgt = [statistics.mean(vals(m, d, t)) for t in targets if vals(m, d, t)]
                rows.append([m, d] + cells + [f"{statistics.mean(tgt):.2f}" if tgt else "–"])
        tables[protocol] = _write_table(
            out_dir,
            protocol,
            ["method", "source", "source acc", *targets, "target average"],
            rows,
            note,
        )
    return tables


def _plot_fewshot(results, methods, datasets, shot_list, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(m, ds):
        ys = []
        for k in shot_list:
            per = [
                statistics.mean(
                    [
                        r["accuracy"]
                        for j, r in results.items()
                        if j.method == m and j.dataset == d and j.shots == k
                    ]
                )
                for d in ds
                if any(j.method == m and j.dataset == d and j.shots == k for j in results)
            ]
            ys.append(statistics.mean(per) if per else float("nan"))
        return ys

    for name, ds in [*((d, [d]) for d in datasets), ("average", datasets)]:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
        for m in methods:
            ax.plot(shot_list, curve(m, ds), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shot_list, [str(k) for k in shot_list])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"few-shot: {name}")
        ax.legend()
        fig.tight_layout()
        tmp = out_dir / f".fewshot-{name}.png"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(out_dir / f"fewshot-{name}.png")
