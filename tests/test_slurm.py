"""The slurm launcher against a real Slurm: a single-node cluster on this machine
(scripts/slurm_single_node.sh, started here when it is not running and this is root; .ci/run
installs it). Skipped, saying why, where Slurm cannot run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import promptalign
from promptalign.benchmark import Grid, grid_status, run_benchmark
from promptalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_single_node.sh"
OVERRIDES = [
    "backbone.arch=tiny-shapes",
    "backbone.weights=null",
    "run.device=cpu",
    "data.workers=0",
    "optim.epochs=1",
    "optim.batch_size=32",
    "optim.eval_batch_size=256",
    "coop:optim.epochs=20",  # a wide window between its first epoch and its end for scancel
    "coop:optim.batch_size=16",
]
SETTINGS = {"poll_s": 0.5, "cpus_per_job": 1, "time": 15}


def _node_ready() -> bool:
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and any(
        s.startswith(("idle", "mix", "alloc")) for s in p.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm():
    pytest.importorskip("submitit", reason="the slurm launcher needs submitit: promptalign[slurm]")
    if not shutil.which("sbatch"):
        pytest.skip(
            "Slurm is not installed: apt-get install slurm-wlm munge, then (as root) "
            "scripts/slurm_single_node.sh start"
        )
    if not _node_ready():
        if os.geteuid() != 0:
            pytest.skip(
                "Slurm is not running and starting it needs root: run "
                "scripts/slurm_single_node.sh start as root"
            )
        p = subprocess.run(
            ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300
        )
        if p.returncode != 0 or not _node_ready():
            why = (p.stderr or p.stdout).strip().splitlines()
            pytest.skip(f"Slurm could not be started: {why[-1] if why else p.returncode}")


@pytest.fixture(scope="module")
def bb():
    return promptalign.load_backbone("tiny-shapes")


def _squeue(job: str) -> list[str]:
    p = subprocess.run(
        ["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], capture_output=True, text=True, timeout=30
    )
    return p.stdout.split("\n") if p.returncode == 0 and p.stdout.strip() else []


def _wait(cond, timeout: float, what: str, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_grid_on_slurm_resumes_a_killed_job_and_equals_inline(tmp_path, slurm, bb):
    kw = {
        "methods": ["coop", "zeroshot"],
        "datasets": ["synthetic_shapes"],
        "seeds": [1],
        "data_root": str(tmp_path / "data"),
        "overrides": OVERRIDES,
    }
    inline = run_benchmark("base2new", out=tmp_path / "inline", backbone=bb, **kw)
    assert len(inline.ran) == 2 and not inline.failed

    grid = Grid(tmp_path / "slurm" / "base2new")
    box: dict = {}

    def submit():
        try:
            box["summary"] = run_benchmark(
                "base2new",
                out=tmp_path / "slurm",
                launcher="slurm",
                launcher_settings=SETTINGS,
                retries=1,
                **kw,
            )
        except BaseException as e:  # reported by the main thread
            box["error"] = e

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    key = "synthetic_shapes/coop/shots16-seed1"
    subs = _wait(lambda: grid.exists() and grid.submissions(), 120, "the submission")
    slurm_id = subs[0]["slurm_jobs"][key]
    jdir = dict((j.key, d) for j, d in grid.jobs())[key]

    def epoch_done():  # mid-way: after its first epoch's checkpoint, before its last
        info = jdir / "run" / "run.json"
        try:
            return json.loads(info.read_text())["epoch"] >= 1
        except (OSError, ValueError, KeyError):
            return False

    _wait(epoch_done, 240, f"the first epoch of {key}")
    # killed mid-training, as the OOM killer would kill it: scancel sends SIGTERM, which submitit
    # lets pass (srun then waits its KillWait before SIGKILL), and a job of a few seconds can
    # finish in that time, so the job's process gets SIGKILL itself
    running = json.loads((jdir / "state.json").read_text())["attempts"][-1]
    assert running["job_id"] == slurm_id and running["outcome"] == "running"
    os.kill(running["pid"], signal.SIGKILL)
    submitter.join(timeout=480)
    assert not submitter.is_alive(), "the submitter did not finish"
    if "error" in box:
        raise box["error"]
    s = box["summary"]
    assert sorted(s.ran) == sorted(inline.ran) and not s.failed

    st = {j.job.key: j for j in grid_status(tmp_path / "slurm")[0].jobs}
    attempts = st[key].attempts
    assert attempts[0]["job_id"] == slurm_id and attempts[0]["outcome"] == "killed"
    assert attempts[-1]["outcome"] == "finished" and attempts[-1]["job_id"] != slurm_id
    assert attempts[-1]["resumed_from"][1] >= 1  # resumed from its last epoch, not from scratch
    assert len(grid.submissions()) == 2  # the array, then the killed job again
    assert all(j.attempts[-1]["scheduler"] == "slurm" for j in st.values())

    def results(out):
        return {
            p.parent.name.rsplit("-", 1)[0] + p.parent.parent.name: json.loads(p.read_text())[
                "result"
            ]
            for p in out.rglob("result.json")
        }

    assert results(tmp_path / "slurm") == results(tmp_path / "inline")
    md = "base2new/base2new.md"
    assert (tmp_path / "slurm" / md).read_text() == (tmp_path / "inline" / md).read_text()


def test_an_interrupted_submitter_leaves_the_jobs_running_until_cancel(tmp_path, slurm):
    out = tmp_path / "b"
    cmd = [
        sys.executable,
        "-m",
        "promptalign.cli",
        "benchmark",
        "base2new",
        "--methods",
        "coop",
        "--datasets",
        "synthetic_shapes",
        "--seeds",
        "1",
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--launcher",
        "slurm",
        "--slurm-time",
        "0:15:00",
        "--slurm-cpus-per-job",
        "1",
        *OVERRIDES,
        "optim.epochs=200",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    grid = Grid(out / "base2new")
    sub = _wait(lambda: grid.exists() and grid.submissions(), 120, "the submission")[0]
    array = sub["array"]
    _wait(lambda: _squeue(array), 60, "the job in the queue")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "keep running" in lines[0] and f"array {array}" in lines[0]
    assert f"promptalign benchmark cancel {out / 'base2new'}" in lines[0]
    assert _squeue(array)  # still queued or running

    assert main(["benchmark", "cancel", str(out)]) == 0
    _wait(lambda: not _squeue(array), 90, "the cancelled job to leave the queue", step=0.5)
    assert grid.submission(sub["id"])["state"] == "cancelled"
    assert main(["benchmark", "cancel", str(out)]) == 0  # nothing left: says so
    st = _wait(
        lambda: (s := grid_status(out)[0]).counts()["running"] == 0 and s,
        60,
        "its claim to go stale",
        step=0.5,
    )
    assert st.counts()["pending"] == 1


@pytest.mark.slow  # Slurm holds a requeued job back for a while: 2-3 minutes here
def test_a_preempted_job_is_requeued_and_resumes_from_its_last_epoch(tmp_path, slurm):
    """Slurm's warning signal (sent before the time limit, or on preemption; here with scancel
    --signal=USR2): submitit checkpoints, the job is requeued under the same id and resumes."""
    kw = {
        "methods": ["coop"],
        "datasets": ["synthetic_shapes"],
        "seeds": [1],
        "data_root": str(tmp_path / "data"),
        "overrides": OVERRIDES,
    }
    grid = Grid(tmp_path / "b" / "base2new")
    box: dict = {}

    def submit():
        try:
            box["summary"] = run_benchmark(
                "base2new", out=tmp_path / "b", launcher="slurm", launcher_settings=SETTINGS, **kw
            )
        except BaseException as e:
            box["error"] = e

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    subs = _wait(lambda: grid.exists() and grid.submissions(), 120, "the submission")
    slurm_id = next(iter(subs[0]["slurm_jobs"].values()))
    jdir = grid.jobs()[0][1]

    def epoch_done():
        try:
            return json.loads((jdir / "run" / "run.json").read_text())["epoch"] >= 1
        except (OSError, ValueError, KeyError):
            return False

    _wait(epoch_done, 240, "the first epoch")
    subprocess.run(["scancel", "--signal=USR2", slurm_id], check=True, timeout=30)
    submitter.join(timeout=480)
    assert not submitter.is_alive()
    if "error" in box:
        raise box["error"]
    assert len(box["summary"].ran) == 1 and not box["summary"].failed
    attempts = grid_status(tmp_path / "b")[0].jobs[0].attempts
    assert [a["outcome"] for a in attempts] == ["interrupted", "finished"]
    assert {a["job_id"] for a in attempts} == {slurm_id}  # requeued, not submitted again
    assert attempts[-1]["resumed_from"][1] >= 1
    assert len(grid.submissions()) == 1
