"""Benchmark protocols end to end on the synthetic world with the tiny model."""

from __future__ import annotations

import json

import pytest

import promptalign
from promptalign.benchmark import make_jobs, run_benchmark
from promptalign.cli import main

OVERRIDES = [
    "backbone.arch=tiny-shapes",
    "backbone.weights=null",
    "run.device=cpu",
    "data.workers=0",
    "optim.epochs=1",
    "optim.batch_size=32",
    "optim.eval_batch_size=256",
    "maple:method.options.depth=2",
]


@pytest.fixture(scope="module")
def bb():
    return promptalign.load_backbone("tiny-shapes")


def test_base2new_interrupted_and_resumed_without_redoing_jobs(tmp_path, bb):
    kw = {
        "methods": ["coop", "maple"],
        "datasets": ["synthetic_colour_shapes"],
        "seeds": [1, 2],
        "data_root": str(tmp_path / "data"),
        "out": tmp_path / "bench",
        "overrides": OVERRIDES,
        "backbone": bb,
    }
    done = []

    def stop_after_two(job, result):
        done.append(job.key)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_benchmark("base2new", on_job_done=stop_after_two, **kw)
    finished = {p.parent for p in (tmp_path / "bench" / "base2new" / "jobs").rglob("result.json")}
    mtimes = {p: (p / "result.json").stat().st_mtime_ns for p in finished}
    summary = run_benchmark("base2new", **kw)
    assert sorted(summary.skipped) == sorted(done) and len(summary.ran) == 2 and not summary.failed
    assert all((p / "result.json").stat().st_mtime_ns == t for p, t in mtimes.items())
    md = (tmp_path / "bench" / "base2new" / "base2new.md").read_text()
    assert "| maple | **average** |" in md and "78.55" in md  # published MaPLe H beside ours
    assert " ± " in md  # two seeds: mean ± std
    rows = (tmp_path / "bench" / "base2new" / "base2new.csv").read_text().splitlines()
    assert rows[0].startswith("method,dataset,base,new,H") and len(rows) == 1 + 2 * 2


def test_fewshot_tables_plots_and_failures(tmp_path, bb, capsys):
    s = run_benchmark(
        "fewshot",
        methods=["coop", "zeroshot"],
        datasets=["synthetic_colour_shapes", "dtd"],
        seeds=[1, 2],
        shots=[1, 2],
        data_root=str(tmp_path / "data"),
        out=tmp_path / "bench",
        overrides=OVERRIDES,
        backbone=bb,
    )
    assert (
        len(s.ran) == 8 and len(s.failed) == 8
    )  # dtd is not under the root: its jobs fail, the others run
    assert all("dtd" in k for k in s.failed)
    assert all("\n" not in e and "dtd" in e for e in s.failed.values())
    out = tmp_path / "bench" / "fewshot"
    md = (out / "fewshot.md").read_text()
    assert "| 1 shots | 2 shots |" in md and "job(s) failed" in md
    for name in ("synthetic_colour_shapes", "average"):
        assert (out / f"fewshot-{name}.png").stat().st_size > 1000
    err = next(out.rglob("error.txt")).read_text()
    assert "dtd" in err


def test_domain_generalisation_jobs_evaluate_targets(tmp_path, bb):
    s = run_benchmark(
        "domain_generalisation",
        methods=["coop"],
        datasets=["synthetic_colour_shapes"],
        seeds=[1],
        targets=["synthetic_colour_shapes_sketch"],
        data_root=str(tmp_path / "data"),
        out=tmp_path / "bench",
        overrides=OVERRIDES,
        backbone=bb,
    )
    assert not s.failed
    result = json.loads(next((tmp_path / "bench").rglob("result.json")).read_text())["result"]
    assert set(result) == {"accuracy", "synthetic_colour_shapes_sketch"}
    assert "synthetic_colour_shapes_sketch" in s.tables["domain_generalisation"]


def test_job_matrix():
    assert len(make_jobs("fewshot", ["a", "b"], ["d"], [1, 2, 3])) == 2 * 5 * 3
    assert len(make_jobs("base2new", ["a"], ["d", "e"], [1, 2, 3])) == 6
    assert make_jobs("cross_dataset", ["a"], ["imagenet"], [1])[0].targets[0] == "caltech101"
    with pytest.raises(ValueError, match="protocol"):
        make_jobs("zero", ["a"], ["d"], [1])


def test_cli_benchmark(tmp_path, capsys):
    code = main(
        [
            "benchmark",
            "base2new",
            "--methods",
            "zeroshot",
            "--datasets",
            "synthetic_shapes",
            "--seeds",
            "1",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "b"),
            *OVERRIDES,
        ]
    )
    assert code == 0
    assert "| zeroshot | synthetic_shapes |" in capsys.readouterr().out


def test_rerun_with_other_settings_does_not_reuse_old_results(tmp_path, bb):
    """Issue 12 item 3: a re-run with optim.epochs=3 after epochs=2 reported the old job."""
    kw = {
        "methods": ["coop"],
        "datasets": ["synthetic_shapes"],
        "seeds": [1],
        "data_root": str(tmp_path / "data"),
        "out": tmp_path / "bench",
        "backbone": bb,
    }
    base = [o for o in OVERRIDES if not o.startswith("optim.epochs")]
    first = run_benchmark("base2new", overrides=[*base, "optim.epochs=1"], **kw)
    assert len(first.ran) == 1
    same = run_benchmark("base2new", overrides=[*base, "optim.epochs=1", "data.workers=2"], **kw)
    assert same.skipped == first.ran and not same.ran  # workers do not change results
    from promptalign.benchmark import GridError

    with pytest.raises(GridError, match=r"other settings.*optim\.epochs 1 -> 2.*--new-settings"):
        run_benchmark("base2new", overrides=[*base, "optim.epochs=2"], **kw)  # asked first
    other = run_benchmark("base2new", overrides=[*base, "optim.epochs=2"], new_settings=True, **kw)
    assert other.ran == first.ran and not other.skipped
    results = sorted((tmp_path / "bench").rglob("result.json"))
    assert len(results) == 2
    epochs = sorted(json.loads(p.read_text())["config"]["optim"]["epochs"] for p in results)
    assert epochs == [1, 2]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"overrides": ["optim.lrr=0.1"]}, "optim.lrr"),
        ({"methods": ["cop"]}, "unknown method 'cop'"),
        ({"datasets": ["synthetic_shapez"]}, "unknown dataset 'synthetic_shapez'"),
        ({"overrides": ["mapel:optim.lr=0.1"]}, "'mapel', which does not exist"),
        ({"overrides": ["method.options.n_ctxx=3"]}, "n_ctxx"),
    ],
)
def test_typos_fail_once_before_any_job_runs(tmp_path, kw, match):
    from promptalign.config import ConfigError

    args = {
        "methods": ["coop", "zeroshot"],
        "datasets": ["synthetic_shapes"],
        "seeds": [1, 2],
        "data_root": str(tmp_path / "data"),
        "out": tmp_path / "bench",
        "overrides": OVERRIDES,
    }
    args.update(kw)
    if "overrides" in kw:
        args["overrides"] = OVERRIDES + kw["overrides"]
    with pytest.raises(ConfigError, match=match):
        run_benchmark("base2new", **args)
    assert not (tmp_path / "bench").exists()


def test_cli_benchmark_typo_is_one_line_and_zero_shots_is_clear(tmp_path, capsys):
    common = [
        "--datasets",
        "synthetic_shapes",
        "--seeds",
        "1",
        "2",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "b"),
        *OVERRIDES,
    ]
    assert (
        main(["benchmark", "base2new", "--methods", "coop", "zeroshot", *common, "optim.lrr=1"])
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "optim.lrr" in err
    assert main(["benchmark", "fewshot", "--methods", "coop", "--shots", "0", *common]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "promptalign benchmark: error: --shots 0: shots per class must be >= 1"
    ]


def test_a_job_run_by_another_process_is_left_to_it_and_a_stale_claim_is_taken_over(tmp_path, bb):
    """Two benchmark processes on one --out folder (e.g. one per method) each ran the same
    unfinished job: the second wiped the first's run folder and the first failed. A job is now
    claimed with a lock file; a claim of a live process is respected, that of a dead one is not."""
    import os
    import socket
    import subprocess
    import sys

    from promptalign.benchmark import LOCK, acquire_job, plan_jobs, release_job

    kw = {
        "methods": ["coop"],
        "datasets": ["synthetic_shapes"],
        "seeds": [1],
        "data_root": str(tmp_path / "data"),
        "out": tmp_path / "bench",
        "overrides": OVERRIDES,
        "backbone": bb,
    }
    plan = plan_jobs(
        "base2new",
        methods=kw["methods"],
        datasets=kw["datasets"],
        seeds=kw["seeds"],
        data_root=kw["data_root"],
        out_dir=tmp_path / "bench" / "base2new",
        overrides=OVERRIDES,
    )
    (job, _, jdir) = plan[0]
    host = socket.gethostname()
    jdir.mkdir(parents=True)
    (jdir / LOCK).write_text(f"{host} {os.getppid()}")  # a live process holds it
    held = run_benchmark("base2new", **kw)
    assert not held.ran and list(held.busy) == [job.key] and str(os.getppid()) in held.busy[job.key]
    assert not (jdir / "result.json").exists() and not (jdir / "run").exists()

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    (jdir / LOCK).write_text(f"{host} {int(gone.stdout)}")  # its process has exited: stale
    took = run_benchmark("base2new", **kw)
    assert took.ran == [job.key] and not took.busy and (jdir / "result.json").is_file()
    assert not (jdir / LOCK).exists()  # released after the job

    assert acquire_job(jdir) is None and acquire_job(jdir) is not None  # exclusive
    release_job(jdir)
    assert acquire_job(jdir) is None
    release_job(jdir)


def test_the_training_crop_is_part_of_the_job_fingerprint(tmp_path):
    from promptalign.benchmark import plan_jobs

    def folder(dataset, *overrides):
        plan = plan_jobs(
            "base2new",
            methods=["coop"],
            datasets=[dataset],
            seeds=[1],
            data_root=str(tmp_path),
            out_dir=tmp_path,
            overrides=overrides,
        )
        return plan[0][2].name

    # unset = the dataset's crop, so spelling out that default names the same job
    assert folder("dtd") == folder("dtd", "data.crop_scale=[0.08,1]")
    assert folder("dtd") != folder("dtd", "data.crop_scale=[0.5,1]")
    # the synthetic world's readers keep half the image or more: its own default, same rule
    synth = "synthetic_colour_shapes"
    assert folder(synth) == folder(synth, "data.crop_scale=[0.5,1]")
    assert folder(synth) != folder(synth, "data.crop_scale=[0.08,1]")
