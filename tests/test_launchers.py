"""Benchmark launchers and the grid folder: the same results whatever runs the jobs, job states
read from the folder, retries, status and cancel, a launcher of one's own, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import promptalign
from promptalign.benchmark import (
    Grid,
    LauncherError,
    cancel_grid,
    grid_status,
    run_benchmark,
    write_grid_tables,
)
from promptalign.claim import LOCK, Claim
from promptalign.cli import main

OVERRIDES = [
    "backbone.arch=tiny-shapes",
    "backbone.weights=null",
    "run.device=cpu",
    "data.workers=0",
    "optim.epochs=1",
    "optim.batch_size=32",
    "optim.eval_batch_size=256",
]


@pytest.fixture(scope="module")
def bb():
    return promptalign.load_backbone("tiny-shapes")


def grid_kw(tmp_path, out="bench", **kw):
    base = {
        "methods": ["coop", "zeroshot"],
        "datasets": ["synthetic_shapes"],
        "seeds": [1, 2],
        "data_root": str(tmp_path / "data"),
        "out": tmp_path / out,
        "overrides": OVERRIDES,
    }
    return {**base, **kw}


def results(out: Path) -> dict[str, dict]:
    found = {}
    for p in out.rglob("result.json"):
        r = json.loads(p.read_text())
        job = r["job"]
        found[f"{job['dataset']}/{job['method']}/{job['shots']}/{job['seed']}"] = r["result"]
    return found


def test_inline_and_local_parallel_give_identical_results_and_tables(tmp_path, bb):
    kw = {"seeds": [1]}
    inline = run_benchmark("base2new", backbone=bb, **grid_kw(tmp_path, "inline", **kw))
    local = run_benchmark(
        "base2new",
        launcher="local",
        launcher_settings={"parallel": 2},
        **grid_kw(tmp_path, "lo", **kw),
    )
    assert len(inline.ran) == len(local.ran) == 2 and not inline.failed and not local.failed
    a, b = results(tmp_path / "inline"), results(tmp_path / "lo")
    assert len(a) == 2 and a == b
    md = "base2new/base2new.md"
    assert (tmp_path / "inline" / md).read_text() == (tmp_path / "lo" / md).read_text()
    # the grid folder records who ran each job and where
    st = grid_status(tmp_path / "lo")[0]
    assert st.counts() == {"finished": 2, "running": 0, "failed": 0, "pending": 0}
    pids = {j.attempts[-1]["pid"] for j in st.jobs}
    assert os.getpid() not in pids and len(pids) == 2  # two worker processes
    sub = Grid(tmp_path / "lo" / "base2new").submissions()
    assert sub[-1]["launcher"] == "local" and sub[-1]["parallel"] == 2


def test_local_workers_get_a_gpu_each_or_a_share_of_the_cpu_threads():
    from promptalign.benchmark.launchers.local import worker_env

    assert [worker_env(i, 3, ["4", "6"])["CUDA_VISIBLE_DEVICES"] for i in range(3)] == [
        "4",
        "6",
        "4",
    ]
    env = worker_env(0, 2, [])
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_states_status_and_partial_tables_from_the_folder(tmp_path, bb, capsys):
    kw = grid_kw(tmp_path, seeds=[1, 2], methods=["zeroshot", "coop"])
    kw["datasets"] = ["synthetic_shapes", "dtd"]  # dtd is not under the root: its jobs fail
    done = []

    def stop(job, result):
        done.append(job.key)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_benchmark("base2new", backbone=bb, on_job_done=stop, **kw)
    grid = Grid(tmp_path / "bench" / "base2new")
    jobs = dict((j.key, d) for j, d in grid.jobs())
    assert len(jobs) == 8
    # one job runs in another process (its live claim), one failed earlier
    running_key = "synthetic_shapes/coop/shots16-seed1"
    claim = Claim(jobs[running_key] / LOCK, what="benchmark job")
    claim.acquire()
    try:
        st = grid_status(tmp_path / "bench")[0]
        by = {j.job.key: j for j in st.jobs}
        assert by[running_key].state == "running" and by[running_key].holder.pid == os.getpid()
        assert [by[k].state for k in done] == ["finished", "finished"]
        assert st.counts() == {"finished": 2, "running": 1, "failed": 0, "pending": 5}
        assert st.eta() is not None and st.eta() > 0
        assert main(["benchmark", "status", str(tmp_path / "bench"), "--tables"]) == 0
        out = capsys.readouterr().out
        assert "8 jobs: 2 finished, 1 running, 0 failed, 5 pending" in out
        assert f"RUNNING {running_key}: process {os.getpid()}" in out
        assert "| zeroshot | synthetic_shapes | 29.00 ± 0.00 |" in out
        assert "| zeroshot | **average** | 29.00 (1 of 2) |" in out  # 1 of 2 datasets
        assert "| coop | synthetic_shapes | missing | missing | missing |" in out
        assert "not finished yet" in out
        s = run_benchmark("base2new", backbone=bb, retries=1, **kw)
    finally:
        claim.release()
    assert s.busy == {running_key: s.busy[running_key]} and str(os.getpid()) in s.busy[running_key]
    assert sorted(s.failed) == sorted(k for k in jobs if k.startswith("dtd/"))
    assert all("dtd" in e and "\n" not in e for e in s.failed.values())
    st = {j.job.key: j for j in grid_status(tmp_path / "bench")[0].jobs}
    failed = st["dtd/coop/shots16-seed2"]
    assert failed.state == "failed" and "dtd" in failed.error
    assert [a["outcome"] for a in failed.attempts] == ["failed", "failed"]  # --retries 1
    assert st[running_key].state == "pending"
    md = write_grid_tables(tmp_path / "bench")["base2new"]
    assert "4 job(s) failed" in md and "(1 of 2)" in md  # coop seed 1 still missing


def test_a_launcher_of_ones_own_in_one_file(tmp_path, bb, monkeypatch):
    (tmp_path / "my_launchers.py").write_text(
        "from promptalign.benchmark.grid import execute\n"
        "from promptalign.benchmark.launchers import LAUNCHERS, Launcher\n"
        "RAN = []\n"
        "@LAUNCHERS.register('reversed')\n"
        "class Reversed(Launcher):\n"
        "    def run(self, tasks, grid, *, backbone=None, on_done=None):\n"
        "        out = [self.done(execute(t, backbone), t, on_done) for t in reversed(tasks)]\n"
        "        RAN.extend(t.job.key for t in reversed(tasks))\n"
        "        return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from promptalign.benchmark import LAUNCHERS

    try:
        s = run_benchmark(
            "base2new",
            backbone=bb,
            launcher="my_launchers:reversed",
            **grid_kw(tmp_path, methods=["zeroshot"]),
        )
        import my_launchers

        assert my_launchers.RAN == sorted(s.ran, reverse=True) and len(s.ran) == 2
    finally:  # leave the registry as it was for the other tests
        LAUNCHERS._items.pop("reversed", None)
        sys.modules.pop("my_launchers", None)


def test_cancel_interrupts_a_run_of_this_host(tmp_path):
    grid = Grid(tmp_path / "base2new")
    grid.folder.mkdir(parents=True)
    grid.register("base2new", [])
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sleeper.stdout.readline().strip() == "ready"
    grid.add_submission(
        {"id": "a1", "launcher": "local", "host": os.uname().nodename, "pid": sleeper.pid}
        | {"state": "active", "jobs": []}
    )
    lines = cancel_grid(tmp_path)
    assert sleeper.wait(timeout=30) == -signal.SIGINT
    assert len(lines) == 1 and f"interrupted process {sleeper.pid}" in lines[0]
    assert grid.submission("a1")["state"] == "cancelled"
    assert cancel_grid(tmp_path) == []


# --------------------------------------------------------------------------- bad input
def _cli(tmp_path, *extra):
    return [
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
        *extra,
    ]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_launcher_input_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    assert main(_cli(tmp_path)) == 0
    finished = next((tmp_path / "b").rglob("result.json"))
    mtime = finished.stat().st_mtime_ns
    capsys.readouterr()

    assert main(_cli(tmp_path, "--launcher", "ray")) == 2
    assert "--launcher ray: unknown launcher; choose from inline, local, slurm" in _one_error_line(
        capsys
    )
    assert main(_cli(tmp_path, "--launcher", "local", "--parallel", "0")) == 2
    assert "--parallel: 0 is not allowed: must be >= 1" in _one_error_line(capsys)
    with pytest.raises(LauncherError, match="at least 1 worker"):
        run_benchmark(
            "base2new", launcher="local", launcher_settings={"parallel": 0}, **grid_kw(tmp_path)
        )
    assert main(_cli(tmp_path, "--parallel", "2", "--launcher", "slurm")) == 2
    assert "--parallel is for --launcher local, not slurm" in _one_error_line(capsys)
    assert main(_cli(tmp_path, "--slurm-partition", "gpu")) == 2
    assert "--slurm-partition is for --launcher slurm, not inline" in _one_error_line(capsys)

    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    assert main(_cli(tmp_path, "--launcher", "slurm")) == 2
    assert "needs submitit: pip install 'promptalign[slurm]'" in _one_error_line(capsys)
    monkeypatch.delitem(sys.modules, "submitit")
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(_cli(tmp_path, "--launcher", "slurm")) == 2
    assert "sbatch is not on PATH" in _one_error_line(capsys)
    monkeypatch.undo()

    conf = tmp_path / "launcher.yaml"
    conf.write_text("launcher: slurm\npartiton: gpu\n")
    assert main(_cli(tmp_path, "--launcher-config", str(conf))) == 2
    assert "launcher 'slurm' has no option 'partiton'" in _one_error_line(capsys)
    conf.write_text("launcher: slurm\ntime: 4h\n")
    assert main(_cli(tmp_path, "--launcher-config", str(conf))) == 2
    line = _one_error_line(capsys)
    assert "--slurm-time 4h: not a Slurm time limit" in line or "sbatch is not on PATH" in line
    assert finished.stat().st_mtime_ns == mtime


def test_a_grid_folder_of_another_version_or_other_settings(tmp_path, capsys):
    assert main(_cli(tmp_path)) == 0
    finished = next((tmp_path / "b").rglob("result.json"))
    mtime = finished.stat().st_mtime_ns
    manifest = tmp_path / "b" / "base2new" / "grid.json"
    capsys.readouterr()

    assert main(_cli(tmp_path, "optim.epochs=2")) == 2
    line = _one_error_line(capsys)
    assert "holds this grid with other settings" in line and "optim.epochs 1 -> 2" in line
    assert "--new-settings" in line

    m = json.loads(manifest.read_text())
    good = manifest.read_text()
    manifest.write_text(json.dumps({**m, "format": 9, "promptalign": "9.0"}))
    for cmd in (_cli(tmp_path), ["benchmark", "status", str(tmp_path / "b")]):
        assert main(cmd) == 2
        line = _one_error_line(capsys)
        assert "written by promptalign 9.0 in grid format 9" in line
        assert f"this promptalign {promptalign.__version__} reads format 1" in line

    manifest.write_text(json.dumps({**json.loads(good), "promptalign": "0.0.1"}))
    assert main(_cli(tmp_path, "optim.epochs=2")) == 2
    assert "planned by promptalign 0.0.1, this is" in _one_error_line(capsys)
    assert finished.stat().st_mtime_ns == mtime
    manifest.unlink()  # a grid of an earlier version: no manifest
    assert main(["benchmark", "status", str(tmp_path / "b")]) == 2
    assert "written by an earlier promptalign" in _one_error_line(capsys)
    assert main(_cli(tmp_path)) == 0  # running it records the grid again; nothing re-run
    assert "0 job(s) run, 1 already finished" in capsys.readouterr().out
    assert finished.stat().st_mtime_ns == mtime


def test_an_empty_or_unparsable_job_claim_is_taken_over_after_the_timeout(tmp_path, capsys):
    """It blocked its job forever while the command exited 0."""
    from promptalign.benchmark import plan_jobs
    from promptalign.claim import STALE_AFTER_S

    (_, _, jdir), *_ = plan_jobs(
        "base2new",
        methods=["zeroshot"],
        datasets=["synthetic_shapes"],
        seeds=[1],
        data_root=str(tmp_path / "data"),
        out_dir=tmp_path / "b" / "base2new",
        overrides=OVERRIDES,
    )
    jdir.mkdir(parents=True)
    (jdir / LOCK).write_text("")  # a claim cut short (an earlier version wrote it in two steps)
    assert main(_cli(tmp_path)) == 3  # not finished, and says why
    out = capsys.readouterr().out
    assert "0 job(s) run" in out and "BUSY" in out and "unreadable claim file" in out
    old = time.time() - STALE_AFTER_S - 1
    os.utime(jdir / LOCK, (old, old))
    assert main(_cli(tmp_path)) == 0
    assert "1 job(s) run" in capsys.readouterr().out and (jdir / "result.json").is_file()


def test_overrides_after_list_options(tmp_path, capsys):
    """`--seeds 1 optim.epochs=1` read the override as a seed."""
    args = [
        "benchmark",
        "base2new",
        "--datasets",
        "synthetic_shapes",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "b"),
        *OVERRIDES[:-1],
        "--methods",
        "zeroshot",
        "optim.eval_batch_size=128",
        "--seeds",
        "1",
        "run.eval_every=0",
    ]
    assert main(args) == 0
    cfg = json.loads(next((tmp_path / "b").rglob("result.json")).read_text())["config"]
    assert cfg["run"]["seed"] == 1 and cfg["optim"]["eval_batch_size"] == 128
    assert cfg["run"]["eval_every"] == 0
    capsys.readouterr()
    assert main([*args[:-3], "--seeds", "one"]) == 2
    assert "--seeds one: not an integer" in _one_error_line(capsys)


def test_slurm_time_limits():
    from promptalign.benchmark.launchers.slurm import time_minutes

    assert [time_minutes(t) for t in (90, "90", "1:30:00", "10:30", "1-00:00:00", "2-1")] == [
        90,
        90,
        90,
        11,
        1440,
        2940,
    ]
    for bad in ("4h", "0", "", "1:2:3:4"):
        with pytest.raises(LauncherError, match="--slurm-time"):
            time_minutes(bad)


def test_an_interrupted_grid_resumes_its_job_from_its_last_epoch(tmp_path, bb):
    """A job stopped mid-way (here: its process killed after one epoch) resumes from that epoch
    when the grid runs again, and the attempt says so."""
    kw = grid_kw(tmp_path, methods=["coop"], seeds=[1])
    kw["overrides"] = [*OVERRIDES, "optim.epochs=3"]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from promptalign.benchmark import run_benchmark;"
        "import promptalign.engine.checkpoint as ck, os, signal;"
        "save = ck.save_resume;"
        "ck.save_resume = lambda *a, **k: (save(*a, **k), os.kill(os.getpid(), signal.SIGKILL));"
        f"run_benchmark('base2new', methods=['coop'], datasets=['synthetic_shapes'], seeds=[1], "
        f"data_root=sys.argv[2], out=sys.argv[3], overrides={kw['overrides']!r})"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    p = subprocess.run(
        [sys.executable, "-c", code, src, kw["data_root"], str(kw["out"])], capture_output=True
    )
    assert p.returncode == -signal.SIGKILL
    st = grid_status(kw["out"])[0].jobs[0]
    assert st.state == "pending" and st.progress == (1, 1, 3)  # killed: its claim is stale
    s = run_benchmark("base2new", backbone=bb, **kw)
    assert len(s.ran) == 1
    st = grid_status(kw["out"])[0].jobs[0]
    assert st.state == "finished" and st.attempts[-1]["resumed_from"] == [1, 1, 3]
    assert [a["outcome"] for a in st.attempts] == ["killed", "finished"]
