"""The built-in demo: zero-shot vs prompt learning on the synthetic world, offline, on a CPU.

Base-to-new on the synthetic colour x shape task with the shipped tiny CLIP ("tiny-shapes-v3"): each
method of ``demo.yaml`` is trained on the base classes (16 shots, one seed) through the ordinary
trainer and evaluated on base and new classes. Writes under the output folder: one run folder per
method (resolved config, prompts, metrics), ``results.md`` / ``results.json`` (base / new / H) and
``results.png`` (a bar chart).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .backbone import load_backbone
from .config import (
    BackboneConfig,
    DataConfig,
    MethodSpec,
    OptimConfig,
    RunConfig,
    RunSettings,
    load_yaml_file,
)
from .engine import evaluate_run, harmonic_mean, train
from .engine.checkpoint import write_text

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    rows: list[dict[str, Any]]  # method, base, new, H, seconds
    out_dir: Path
    seconds: float

    def table(self) -> str:
        lines = ["| method | base | new | H | train s |", "|---|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(
                f"| {r['method']} | {r['base']:.2f} | {r['new']:.2f} | {r['H']:.2f} "
                f"| {r['seconds']:.1f} |"
            )
        return "\n".join(lines)


def demo_spec() -> dict[str, Any]:
    return load_yaml_file(Path(str(resources.files("promptalign") / "demo.yaml")))


def run_demo(
    out_dir: str | Path = "promptalign-demo",
    *,
    seed: int | None = None,
    progress: bool = True,
    data_root: str | Path | None = None,
    spec: dict[str, Any] | None = None,
    workers: int = 0,
) -> DemoResult:
    """Run the demo and write its outputs under ``out_dir`` (existing method runs are replaced).
    ``spec`` replaces keys of the shipped demo.yaml (e.g. fewer methods or epochs). The numbers do
    not depend on ``progress`` or ``workers`` (data order and augmentation are a function of the
    seed, the epoch and the sample; see :mod:`promptalign.data.loader`)."""
    spec = {**demo_spec(), **(spec or {})}
    seed = spec["seed"] if seed is None else seed
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root else out / "data"
    start = time.perf_counter()
    backbone = load_backbone(spec["backbone"])
    rows = []
    for entry in spec["methods"]:
        name = entry["name"]
        run_dir = out / f"{name}-seed{seed}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cfg = RunConfig(
            backbone=BackboneConfig(spec["backbone"], None),
            method=MethodSpec(name, entry.get("preset"), entry.get("options", {})),
            data=DataConfig(
                dataset=spec["dataset"],
                root=str(root),
                shots=spec["shots"],
                subsample="base",
                workers=workers,
            ),
            optim=OptimConfig(
                epochs=spec["epochs"], batch_size=spec["batch_size"], eval_batch_size=256
            ),
            run=RunSettings(seed=seed, device="cpu", progress=progress),
        )
        t = time.perf_counter()
        res = train(cfg, run_dir, backbone=backbone)
        seconds = time.perf_counter() - t
        base = res.metrics["accuracy"]
        new = evaluate_run(run_dir, subsample="new", device="cpu", backbone=backbone)["accuracy"]
        rows.append(
            {
                "method": name,
                "base": base,
                "new": new,
                "H": harmonic_mean(base, new),
                "seconds": seconds,
            }
        )
        log.info("demo %s: base %.2f new %.2f", name, base, new)
    result = DemoResult(rows, out, time.perf_counter() - start)
    write_text(out / "results.md", result.table() + "\n")
    write_text(
        out / "results.json", json.dumps({"rows": rows, "seed": seed, "spec": spec}, indent=2)
    )
    _plot(rows, out / "results.png")
    return result


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    width = 0.27
    xs = range(len(rows))
    for i, key in enumerate(("base", "new", "H")):
        ax.bar([x + (i - 1) * width for x in xs], [r[key] for r in rows], width, label=key)
    ax.set_xticks(list(xs), [r["method"] for r in rows])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("base-to-new, synthetic colour x shape, tiny CLIP, 16 shots")
    ax.legend(ncol=3, loc="upper left")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
