"""Benchmark protocols in one call: base-to-new, few-shot, cross-dataset, domain generalisation.

Every (dataset, method, shots, seed) training is an independent job with its own run folder under
``<out>/<protocol>/jobs/``; a finished job leaves ``result.json`` (written atomically). Re-running
skips finished jobs, resumes an interrupted one from its last epoch, and a failing job is recorded
(``error.txt``) and reported in the summary without stopping the others. Tables are written as
Markdown and CSV (mean ± std over seeds, the published numbers beside ours where they exist) and
few-shot curves as PNG.

Defaults come from each method's published preset for the protocol (``presets/``); ``overrides``
(``key=value``) apply to every job, and ``method:key=value`` only to that method's jobs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import shutil
import statistics
import traceback
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .config import RunConfig, apply_overrides
from .engine import evaluate_run, harmonic_mean, train
from .engine.checkpoint import RESUME_STATE, RUN_INFO, write_text
from .presets import make_preset

log = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "fewshot", "cross_dataset", "domain_generalisation")
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
CROSS_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")


def default_datasets(protocol: str) -> tuple[str, ...]:
    """The datasets the papers report for ``protocol`` (ImageNet + 10 others, or ImageNet as source)."""
    return ("imagenet",) if protocol in ("cross_dataset", "domain_generalisation") else ("imagenet", *CROSS_TARGETS)


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
    tables: dict[str, str] = field(default_factory=dict)  # file name -> markdown


def published() -> dict[str, Any]:
    return yaml.safe_load((resources.files("promptalign") / "published.yaml").read_text(encoding="utf-8"))


def make_jobs(protocol: str, methods: Sequence[str], datasets: Sequence[str], seeds: Sequence[int],
              shots: Sequence[int] = (1, 2, 4, 8, 16), targets: Sequence[str] | None = None) -> list[Job]:
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
    default = {"cross_dataset": CROSS_TARGETS, "domain_generalisation": DG_TARGETS}.get(protocol, ())
    for d in datasets:
        for m in methods:
            for s in seeds:
                jobs.append(Job(protocol, d, m, 16, s, tuple(targets if targets is not None else default)))
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
        raise ValueError(f"method {name!r} has no recipe {recipe!r}; recipes: {sorted(recipes) or 'none'} "
                         f"(use {name!r} alone for one run)")
    return tuple(recipes[recipe])


def job_config(job: Job, base_overrides: Sequence[str], data_root: str) -> RunConfig:
    preset_protocol = {"domain_generalisation": "cross_dataset"}.get(job.protocol, job.protocol)
    name, _ = split_recipe(job.method)
    cfg = make_preset(name, preset_protocol)
    generic = [o for o in base_overrides if ":" not in o.split("=", 1)[0]]
    specific = [o.split(":", 1)[1] for o in base_overrides
                if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] in (name, job.method)]
    cfg = apply_overrides(cfg, {"data.dataset": job.dataset, "data.root": data_root, "data.shots": job.shots,
                                "run.seed": job.seed, "run.progress": False})
    return apply_overrides(cfg, generic + specific)


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
        out[t] = evaluate_run(run_dir, dataset=t, subsample="all", device=dev, backbone=backbone)["accuracy"]
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
    """Run every job of ``protocol`` (skipping finished ones) and write tables and plots."""
    out_dir = Path(out).expanduser() / protocol
    summary = BenchmarkSummary(out_dir)
    jobs = make_jobs(protocol, methods, datasets, seeds, shots, targets)
    for job in jobs:
        job_dir = out_dir / "jobs" / job.key
        result_path = job_dir / "result.json"
        if result_path.is_file():
            summary.skipped.append(job.key)
            continue
        try:
            cfg = job_config(job, overrides, data_root)
            result = run_job(job, cfg, job_dir, backbone)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failed job is reported, the others go on
            log.error("job %s failed: %s", job.key, e)
            write_text(job_dir / "error.txt", traceback.format_exc())
            summary.failed[job.key] = f"{type(e).__name__}: {e}"
            continue
        (job_dir / "error.txt").unlink(missing_ok=True)
        write_text(result_path, json.dumps({"job": dataclasses.asdict(job), "result": result}, indent=2))
        summary.ran.append(job.key)
        if on_job_done:
            on_job_done(job, result)
    summary.tables = write_tables(protocol, jobs, out_dir, summary.failed)
    return summary


# --------------------------------------------------------------------------- tables and plots
def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _load_results(jobs: Sequence[Job], out_dir: Path) -> dict[Job, dict]:
    found = {}
    for job in jobs:
        p = out_dir / "jobs" / job.key / "result.json"
        if p.is_file():
            found[job] = json.loads(p.read_text())["result"]
    return found


def _write_table(out_dir: Path, name: str, header: list[str], rows: list[list[str]], note: str = "") -> str:
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    if note:
        md += f"\n{note}\n"
    write_text(out_dir / f"{name}.md", md)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    write_text(out_dir / f"{name}.csv", buf.getvalue())
    return md


def write_tables(protocol: str, jobs: Sequence[Job], out_dir: Path, failed: dict[str, str]) -> dict[str, str]:
    results = _load_results(jobs, out_dir)
    pub = published()
    methods = list(dict.fromkeys(j.method for j in jobs))
    datasets = list(dict.fromkeys(j.dataset for j in jobs))
    tables: dict[str, str] = {}
    note = f"{len(failed)} job(s) failed: {', '.join(failed)}" if failed else ""

    def vals(method, dataset, key, shots=None):
        return [r[key] for j, r in results.items() if j.method == method and j.dataset == dataset
                and (shots is None or j.shots == shots) and key in r]

    if protocol == "base2new":
        rows = []
        for m in methods:
            for d in datasets:
                rows.append([m, d] + [_mean_std(vals(m, d, k)) for k in ("base", "new", "H")] + ["", "", ""])
            avg = {k: [statistics.mean(vals(m, d, k)) for d in datasets if vals(m, d, k)] for k in ("base", "new", "H")}
            p = pub.get("base2new", {}).get(split_recipe(m)[0])
            rows.append([m, "**average**"] + [_mean_std([statistics.mean(avg[k])]) if avg[k] else "–" for k in ("base", "new", "H")]
                        + ([f"{x:.2f}" for x in p] if p else ["–", "–", "–"]))
        tables["base2new"] = _write_table(out_dir, "base2new", ["method", "dataset", "base", "new", "H",
                                          "published base", "published new", "published H"], rows, note)
    elif protocol == "fewshot":
        shot_list = sorted({j.shots for j in jobs})
        rows = []
        for m in methods:
            for d in datasets:
                rows.append([m, d] + [_mean_std(vals(m, d, "accuracy", k)) for k in shot_list])
            p = pub.get("fewshot", {}).get(split_recipe(m)[0])
            if p:
                rows.append([m, "published average"] + [f"{p[k]:.2f}" if k in p else "–" for k in shot_list])
        tables["fewshot"] = _write_table(out_dir, "fewshot", ["method", "dataset"] + [f"{k} shots" for k in shot_list], rows, note)
        _plot_fewshot(results, methods, datasets, shot_list, out_dir)
    else:
        targets = list(dict.fromkeys(t for j in jobs for t in j.targets))
        rows = []
        for m in methods:
            for d in datasets:
                cells = [_mean_std(vals(m, d, "accuracy"))] + [_mean_std(vals(m, d, t)) for t in targets]
                tgt = [statistics.mean(vals(m, d, t)) for t in targets if vals(m, d, t)]
                rows.append([m, d] + cells + [f"{statistics.mean(tgt):.2f}" if tgt else "–"])
        tables[protocol] = _write_table(out_dir, protocol, ["method", "source", "source acc", *targets, "target average"], rows, note)
    return tables


def _plot_fewshot(results, methods, datasets, shot_list, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(m, ds):
        ys = []
        for k in shot_list:
            per = [statistics.mean([r["accuracy"] for j, r in results.items() if j.method == m and j.dataset == d and j.shots == k])
                   for d in ds if any(j.method == m and j.dataset == d and j.shots == k for j in results)]
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
