"""Tables (Markdown and CSV) and few-shot plots of a benchmark grid, from its finished jobs."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import load_yaml_file
from ..engine.checkpoint import write_text
from .jobs import Job, split_recipe

log = logging.getLogger(__name__)

MISSING = "missing"


def _mean_std(values: list[float], planned: int | None = None) -> str:
    """Mean ± std; ``missing`` without values, and how many of the ``planned`` values there are
    when some are not finished yet."""
    if not values:
        return MISSING if planned else "–"
    text = (
        f"{values[0]:.2f}"
        if len(values) == 1
        else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    )
    if planned and len(values) < planned:
        text += f" ({len(values)} of {planned})"
    return text


def _average(means: list[float], planned: int) -> str:
    """The mean of per-dataset means, saying how many of the ``planned`` datasets it covers."""
    if not means:
        return MISSING
    text = f"{statistics.mean(means):.2f}"
    return text + (f" ({len(means)} of {planned})" if len(means) < planned else "")


def published() -> dict[str, Any]:
    return load_yaml_file(Path(str(resources.files("promptalign") / "published.yaml")))


def _load_results(jobs: Sequence[Job], job_dirs: dict[Job, Path]) -> dict[Job, dict]:
    found = {}
    for job in jobs:
        p = job_dirs[job] / "result.json"
        if p.is_file():
            try:
                found[job] = json.loads(p.read_text(encoding="utf-8"))["result"]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("%s is unreadable; its job counts as not finished", p)
    return found


def write_table(
    out_dir: Path, name: str, header: list[str], rows: list[list[str]], note: str = ""
) -> str:
    """Write ``out_dir/<name>.md`` (with ``note`` under the table) and ``<name>.csv``; returns
    the Markdown."""
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
    current configs, see :func:`plan_jobs`), from whatever has finished: a cell without any
    finished job reads ``missing``, one with some of its seeds says how many, e.g.
    ``65.86 ± 1.64 (2 of 3)``, and a note under the table counts the jobs not finished."""
    results = _load_results(jobs, job_dirs)
    pub = published()
    methods = list(dict.fromkeys(j.method for j in jobs))
    datasets = list(dict.fromkeys(j.dataset for j in jobs))
    tables: dict[str, str] = {}
    notes = [f"{len(failed)} job(s) failed: {', '.join(failed)}"] if failed else []
    unfinished = len(jobs) - len(results) - len([j for j in jobs if j.key in failed])
    if unfinished > 0:
        notes.append(
            f"{unfinished} job(s) not finished yet: their cells read '{MISSING}' or say how "
            "many of their seeds have finished"
        )
    note = "\n\n".join(notes)

    def vals(method, dataset, key, shots=None):
        return [
            r[key]
            for j, r in results.items()
            if j.method == method
            and j.dataset == dataset
            and (shots is None or j.shots == shots)
            and key in r
        ]

    def planned(method, dataset, shots=None):
        return sum(
            j.method == method and j.dataset == dataset and (shots is None or j.shots == shots)
            for j in jobs
        )

    if protocol == "base2new":
        rows = []
        for m in methods:
            for d in datasets:
                rows.append(
                    [m, d]
                    + [_mean_std(vals(m, d, k), planned(m, d)) for k in ("base", "new", "H")]
                    + ["", "", ""]
                )
            avg = {
                k: [statistics.mean(vals(m, d, k)) for d in datasets if vals(m, d, k)]
                for k in ("base", "new", "H")
            }
            p = pub.get("base2new", {}).get(split_recipe(m)[0])
            rows.append(
                [m, "**average**"]
                + [_average(avg[k], len(datasets)) for k in ("base", "new", "H")]
                + ([f"{x:.2f}" for x in p] if p else ["–", "–", "–"])
            )
        tables["base2new"] = write_table(
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
                rows.append(
                    [m, d]
                    + [_mean_std(vals(m, d, "accuracy", k), planned(m, d, k)) for k in shot_list]
                )
            p = pub.get("fewshot", {}).get(split_recipe(m)[0])
            if p:
                rows.append(
                    [m, "published average"] + [f"{p[k]:.2f}" if k in p else "–" for k in shot_list]
                )
        tables["fewshot"] = write_table(
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
                n = planned(m, d)
                cells = [_mean_std(vals(m, d, "accuracy"), n)] + [
                    _mean_std(vals(m, d, t), n) for t in targets
                ]
                tgt = [statistics.mean(vals(m, d, t)) for t in targets if vals(m, d, t)]
                rows.append([m, d] + cells + [_average(tgt, len(targets)) if targets else "–"])
        tables[protocol] = write_table(
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
