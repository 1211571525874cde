"""What the slurm launcher costs on top of running the jobs: on a running Slurm (e.g. the one-node
cluster of ``scripts/slurm_single_node.sh``), the same small grid is run inline and as a job array
with one job at a time (``array_parallelism=1``, so both run the jobs one after another).

Prints, in seconds: the inline wall time, the Slurm wall time (submission to the last result
seen by the submitter), the delay from submission to the first job's start and the gap between one
job's end and the next one's start (both as seen inside the job: its Python has started and
imported promptalign), and the overhead per job = (Slurm wall - inline wall) / jobs.

    python benchmarks/slurm_overhead.py --seeds 1 2 3 --data-root bench-data
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from promptalign.benchmark import Grid, grid_status, run_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["coop"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--dataset", default="synthetic_shapes")
    p.add_argument("--data-root", default=None, help="default: a temporary folder")
    p.add_argument("--arch", default="tiny-shapes-v3")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--partition", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slurm-overhead-"))
    kw = {
        "methods": args.methods,
        "datasets": [args.dataset],
        "seeds": args.seeds,
        "data_root": args.data_root or str(work / "data"),
        "overrides": [
            f"backbone.arch={args.arch}",
            "backbone.weights=null",
            "run.device=cpu",
            "data.workers=0",
            f"optim.epochs={args.epochs}",
            "optim.batch_size=32",
            "optim.eval_batch_size=256",
        ],
    }
    # render the data first, so neither run pays for it
    run_benchmark("base2new", **{**kw, "methods": ["zeroshot"], "seeds": [1]}, out=work / "warm")
    t = time.perf_counter()
    inline = run_benchmark("base2new", out=work / "inline", **kw)
    inline_s = time.perf_counter() - t
    settings = {"array_parallelism": 1, "poll_s": 0.5, "cpus_per_job": 1, "time": 30}
    if args.partition:
        settings["partition"] = args.partition
    t = time.perf_counter()
    slurm = run_benchmark(
        "base2new", out=work / "slurm", launcher="slurm", launcher_settings=settings, **kw
    )
    slurm_s = time.perf_counter() - t
    assert not inline.failed and not slurm.failed, (inline.failed, slurm.failed)
    submitted = Grid(work / "slurm" / "base2new").submissions()[0]["submitted"]
    runs = sorted(
        (float(j.attempts[-1]["started"]), float(j.attempts[-1]["ended"]))
        for j in grid_status(work / "slurm")[0].jobs
    )
    gaps = [b[0] - a[1] for a, b in zip(runs, runs[1:])]
    n = len(runs)
    print(f"jobs: {n} ({', '.join(args.methods)} x seeds {args.seeds}, {args.epochs} epoch(s))")
    print(f"inline wall: {inline_s:.1f} s")
    print(f"slurm wall (array_parallelism=1): {slurm_s:.1f} s")
    print(f"submission to first job start: {runs[0][0] - submitted:.1f} s")
    if gaps:
        print(
            f"end of a job to start of the next: mean {statistics.mean(gaps):.1f} s, "
            f"max {max(gaps):.1f} s"
        )
    print(f"overhead per job against inline: {(slurm_s - inline_s) / n:.1f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
