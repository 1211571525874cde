"""Does ALIGN learn different modes? Base-to-new on the synthetic world per number of prompt sets.

For M = N in ``--sets`` x the schedules in ``--schedules`` x the initialisations in ``--inits``,
3 seeds each, ALIGN is trained on the 24 base classes of ``synthetic_colour_shapes`` (16 shots,
``tiny-shapes-v3``, CPU) through the benchmark machinery (:mod:`promptalign.benchmark`: one job
folder per (cell, seed) named by its resolved config, ``result.json`` when done, resume from the
last epoch, a lock so two processes never run one job), and measured:

* base / new / H (the benchmark's own evaluation);
* the prompt-level and token-level plan entropies as ratios to the uniform plan (1.0 = uniform),
  means over the base test images: the run's ``metrics.diagnostics`` (what ``promptalign eval``
  prints and ``explain`` reports);
* the mean pairwise cosine distance between the M visual sets' global image features (mean over
  the base test images) and between the N text sets' global features (mean over the base
  classes): :func:`promptalign.explain.set_separation`.

Schedules: ``short`` is the demo's and the README's short table's (``optim.epochs=10
optim.batch_size=32``, ALIGN's published SGD and lr); ``published`` is ALIGN's published
base-to-new preset (20 epochs of batch 4, lr 0.0025). Initialisations: ``released`` is the
released code's default, and promptalign's (set 0 from "a photo of a", sets n >= 1 random
N(0, 0.02)); ``phrases`` gives set i its own phrase, as the released code's tab-separated
``CTX_INIT`` allows (the phrases its config keeps commented out). With M = 1 both are one run.

Every job's measurements are cached in its folder (``modes.json``), so an interrupted table
finishes on re-run. The jobs of the M = 4 ``released`` cells have the fingerprints of the README's
ALIGN rows (same overrides), so ``--out`` pointing at that benchmark's folder reuses them.
Writes ``<out>/align-modes.md`` (the table, the command above it) and ``<out>/align-modes.jsonl``
(one JSON line per row) and prints both.

    python benchmarks/align_modes.py --out bench-modes --data-root bench-data
    # quicker look: one seed, the short schedule only
    python benchmarks/align_modes.py --out bench-modes --data-root bench-data --seeds 1 \
        --schedules short
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from promptalign.benchmark import acquire_job, plan_jobs, release_job, run_job
from promptalign.config import to_dict
from promptalign.engine.checkpoint import RUN_INFO
from promptalign.explain import set_separation
from promptalign.io import atomic_write_text

log = logging.getLogger("align_modes")

SCHEDULES = {
    "short": ["optim.epochs=10", "optim.batch_size=32"],  # the demo's / README's short table
    "published": [],  # ALIGN's base-to-new preset
}
# the released code's commented-out CTX_INIT list (configs/trainers/MMP/vit_b16_c2_ep5_batch4_2ctx
# .yaml), one phrase per text prompt set
PHRASES = ("a photo of a", "a nice photo of", "a large picture of", "a small photo of a")
INITS = ("released", "phrases")
# as the README's base-to-new tables, so the M = 4 released jobs share their fingerprints
COMMON = [
    "backbone.arch=tiny-shapes-v3",
    "backbone.weights=null",
    "run.device=cpu",
    "data.workers=0",
    "optim.eval_batch_size=256",
]
MODES_FILE = "modes.json"
KEYS = ("base", "new", "H", "prompt_entropy", "token_entropy", "image_distance", "text_distance")


def cell_overrides(sets: int, schedule: str, init: str, extra: list[str] = ()) -> list[str]:
    """The benchmark overrides of one cell (M = N = ``sets``), then ``extra``."""
    out = [*COMMON, *SCHEDULES[schedule], f"method.options.n_sets={sets}", *extra]
    if init == "phrases" and sets > 1:
        if sets > len(PHRASES):
            raise ValueError(f"--sets {sets}: only {len(PHRASES)} phrases for the phrases init")
        out.append("method.options.ctx_init=" + "\t".join(PHRASES[:sets]))
    return out


def measure(job_dir: Path, device: str) -> dict:
    """The job's entropies and set distances (cached in its ``modes.json``)."""
    cached = job_dir / MODES_FILE
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    run_dir = job_dir / "run"
    diag = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8"))["metrics"]["diagnostics"]
    sep = set_separation(run_dir, subsample="base", device=device)
    found = {
        "prompt_entropy": diag["ot_prompt_entropy"],
        "token_entropy": diag["ot_token_entropy"],
        **dataclasses.asdict(sep),
    }
    atomic_write_text(cached, json.dumps(found, indent=1))
    return found


def run_cell(sets: int, schedule: str, init: str, a: argparse.Namespace) -> list[dict]:
    """Train (or resume, or skip) the cell's seeds and return one record per finished seed."""
    plan = plan_jobs(
        "base2new",
        methods=["align"],
        datasets=["synthetic_colour_shapes"],
        seeds=a.seeds,
        data_root=a.data_root,
        out_dir=Path(a.out).expanduser() / "base2new",
        overrides=cell_overrides(sets, schedule, init, a.override),
    )
    records, name = [], f"M={sets} {schedule} {init}"
    for job, cfg, jdir in plan:
        result_path = jdir / "result.json"
        if not result_path.is_file():
            if a.dry_run:
                log.info("to run: %s seed %d -> %s", name, job.seed, jdir)
                continue
            holder = acquire_job(jdir)
            if holder is not None:
                log.info("busy: %s is run by %s", jdir, holder)
                continue
            try:
                t = time.perf_counter()
                result = run_job(job, cfg, jdir)
                record = {"job": dataclasses.asdict(job), "result": result, "config": to_dict(cfg)}
                atomic_write_text(result_path, json.dumps(record, indent=2))
                (jdir / "error.txt").unlink(missing_ok=True)
                took = time.perf_counter() - t
                log.info("%s seed %d: H %.2f (%.0f s)", name, job.seed, result["H"], took)
            except Exception as e:  # recorded as the benchmark does; the other jobs go on
                atomic_write_text(jdir / "error.txt", traceback.format_exc())
                log.error("%s seed %d failed: %s (%s)", name, job.seed, e, jdir / "error.txt")
                continue
            finally:
                release_job(jdir)
        result = json.loads(result_path.read_text(encoding="utf-8"))["result"]
        records.append({"seed": job.seed, "job_dir": str(jdir), **result, **measure(jdir, "cpu")})
    return records


def _fmt(values: list[float], spec: str) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(statistics.stdev(values), spec)}"


# accuracies in points, entropy ratios to 1e-5 (the prompt plan is at 0.9999x), distances 1e-x
SPECS = {"prompt_entropy": ".5f", "token_entropy": ".4f", "image_distance": ".2e"}
SPECS |= {"text_distance": ".2e", "base": ".2f", "new": ".2f", "H": ".2f"}


def table(rows: list[dict], command: str) -> str:
    head = (
        "| M = N | schedule | init | seeds | base | new | H | prompt plan entropy | token plan "
        "entropy | image-set distance | text-set distance |\n|---:|---|---|---:|"
        + "---:|" * 7
        + "\n"
    )
    lines = []
    for r in rows:
        cells = [_fmt(r["values"][k], SPECS[k]) for k in KEYS]
        lines.append(
            f"| {r['sets']} | {r['schedule']} | {r['init']} | {len(r['seeds'])} | "
            + " | ".join(cells)
            + " |"
        )
    return f"```bash\n{command}\n```\n\n" + head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-modes", help="benchmark folder (jobs and tables)")
    p.add_argument("--data-root", default="bench-data")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sets", type=int, nargs="+", default=[1, 2, 4], help="M = N values")
    p.add_argument("--schedules", nargs="+", choices=sorted(SCHEDULES), default=list(SCHEDULES))
    p.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (results do not depend)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more benchmark override for every job (e.g. method.options.eps=0.01)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the jobs still to run, train none")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(a.threads)
    command = "python benchmarks/align_modes.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    rows = []
    for schedule in a.schedules:
        for sets in a.sets:
            for init in a.inits:
                records = run_cell(sets, schedule, init, a)
                values = {k: [r[k] for r in records] for k in KEYS}
                rows.append(
                    {
                        "sets": sets,
                        "schedule": schedule,
                        "init": init,
                        "seeds": [r["seed"] for r in records],
                        "values": values,
                        "per_seed": records,
                    }
                )
    out = Path(a.out).expanduser()
    md = table(rows, command)
    lines = []
    for r in rows:
        mean = {k: statistics.mean(v) if v else None for k, v in r["values"].items()}
        lines.append(
            json.dumps(
                {
                    **{k: r[k] for k in ("sets", "schedule", "init", "seeds")},
                    "mean": mean,
                    "per_seed": r["per_seed"],
                }
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "align-modes.md", md)
    atomic_write_text(out / "align-modes.jsonl", "\n".join(lines) + "\n")
    print(md)
    print("\n".join(lines))
    missing = sum(len(a.seeds) - len(r["seeds"]) for r in rows)
    if missing:
        print(f"{missing} job(s) not finished (busy, dry run or interrupted): re-run to finish")
    return 0


if __name__ == "__main__":
    sys.exit(main())
