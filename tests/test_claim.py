"""Exclusive claims (promptalign.claim): one holder at a time, on one host and across hosts, stale
claims taken over, and a run folder that two `train` processes cannot share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptalign import claim as cl
from promptalign.claim import LOCK, Claim, ClaimBusy, ClaimLost, Holder

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _gone_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(p.stdout)


def _write_holder(path: Path, holder: Holder, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tmp-holder")
    tmp.write_text(holder.to_json())
    t = time.time() - age_s
    os.utime(tmp, (t, t))
    tmp.replace(path)  # as a takeover replaces it: at once


def test_one_holder_at_a_time_and_release(tmp_path):
    a, b = Claim(tmp_path / LOCK), Claim(tmp_path / LOCK)
    assert a.try_acquire() is None
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    who = b.try_acquire()
    assert who is not None and f"process {os.getpid()} on {socket.gethostname()}" in who
    with pytest.raises(ClaimBusy, match=rf"{tmp_path} is in use by process {os.getpid()}"):
        b.acquire()
    b.release()  # not its claim: nothing removed
    assert (tmp_path / LOCK).exists()
    a.release()
    assert not (tmp_path / LOCK).exists()
    with b:
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_processes_racing_for_one_claim_get_one_winner(tmp_path):
    """Six processes try at the same instant; exactly one gets the claim."""
    start = time.time() + 3.0
    code = (  # the claim module alone (it imports nothing else from the package): fast to start
        "import importlib.util as u, sys, time;"
        "s = u.spec_from_file_location('claim', sys.argv[1]); m = u.module_from_spec(s);"
        "sys.modules['claim'] = m; s.loader.exec_module(m); c = m.Claim(sys.argv[2]);"
        "time.sleep(max(0.0, float(sys.argv[3]) - time.time()));"
        "won = c.try_acquire() is None; time.sleep(1.5); print('won' if won else 'lost')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, cl.__file__, str(tmp_path / LOCK), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["lost"] * 5 + ["won"]


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    lock = tmp_path / LOCK
    dead = Holder(host=socket.gethostname(), pid=_gone_pid(), token="x", started=time.time())
    _write_holder(lock, dead)
    c = Claim(lock)
    assert c.try_acquire() is None
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    c.release()
    # an earlier version's "host pid" claim is read the same way
    lock.write_text(f"{socket.gethostname()} {_gone_pid()}")
    assert c.try_acquire() is None
    c.release()
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # alive: respected
    assert str(os.getppid()) in c.try_acquire()


def test_a_recycled_pid_does_not_keep_a_claim(tmp_path):
    """Same host, the pid alive but started later than the holder: another process."""
    lock = tmp_path / LOCK
    recycled = Holder(
        host=socket.gethostname(), pid=os.getppid(), token="x", started=1.0, proc_start=1
    )
    _write_holder(lock, recycled)
    assert Claim(lock).try_acquire() is None


def test_another_hosts_claim_lives_by_its_heartbeat_never_by_a_pid(tmp_path):
    lock = tmp_path / LOCK
    # a pid that does not exist here means nothing for another host: the claim holds
    other = Holder(host="node-b", pid=_gone_pid(), token="t", started=time.time() - 30)
    _write_holder(lock, other, age_s=10)
    who = Claim(lock, stale_after_s=60).try_acquire()
    assert who is not None and "on node-b" in who and "heartbeat 10 s ago" in who
    _write_holder(lock, other, age_s=120)  # silent for longer than the timeout: stale
    c = Claim(lock, stale_after_s=60)
    assert c.try_acquire() is None
    c.release()


def test_scheduler_job_ids_decide_across_hosts(tmp_path, monkeypatch):
    lock = tmp_path / LOCK
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert cl.scheduler_job() == ("slurm", "70_3")
    # the same Slurm job on another node: this job was requeued there, its old claim is stale
    earlier = Holder(host="node-b", pid=1, token="t", scheduler="slurm", job_id="70_3")
    _write_holder(lock, earlier)
    c = Claim(lock)
    assert c.try_acquire() is None
    c.release()
    # another job that the scheduler says has ended: stale at once, whatever its heartbeat
    calls = []
    monkeypatch.setitem(cl.SCHEDULER_PROBES, "slurm", lambda j: calls.append(j) or False)
    _write_holder(lock, Holder(host="node-c", pid=1, token="u", scheduler="slurm", job_id="70_4"))
    assert c.try_acquire() is None and calls == ["70_4"]
    c.release()
    # ... and one it says runs holds
    monkeypatch.setitem(cl.SCHEDULER_PROBES, "slurm", lambda j: True)
    _write_holder(lock, Holder(host="node-c", pid=1, token="v", scheduler="slurm", job_id="70_5"))
    assert "slurm job 70_5" in Claim(lock).try_acquire()


@pytest.mark.parametrize("content", ["", "{not json", "\x00\x01"])
def test_an_unreadable_claim_waits_for_the_timeout_then_is_taken_over(tmp_path, content):
    lock = tmp_path / LOCK
    lock.write_text(content)
    who = Claim(lock, stale_after_s=60).try_acquire()
    assert who is not None and "unreadable claim file" in who and "taken over after 60 s" in who
    old = time.time() - 61
    os.utime(lock, (old, old))
    c = Claim(lock, stale_after_s=60)
    assert c.try_acquire() is None
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    c.release()


def test_claims_are_written_atomically(tmp_path, monkeypatch):
    """The claim file appears complete (hard link of a written file); no temporary is left."""
    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append(json.loads(Path(src).read_text()))  # complete before it gets its name
        return real_link(src, dst)

    monkeypatch.setattr(cl.os, "link", link)
    c = Claim(tmp_path / LOCK)
    assert c.try_acquire() is None
    assert seen and seen[0]["pid"] == os.getpid()
    c.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_heartbeat_and_a_lost_claim(tmp_path):
    lock = tmp_path / LOCK
    c = Claim(lock, heartbeat_s=0.1)
    c.acquire()
    old = time.time() - 100
    os.utime(lock, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.stat().st_mtime < 5  # the heartbeat touched it
    c.check()
    # another process took the claim over (this one was stopped too long): noticed
    _write_holder(lock, Holder(host="node-b", pid=1, token="other"))
    time.sleep(0.4)
    assert c.lost is not None
    with pytest.raises(ClaimLost, match="taken over by process 1 on node-b"):
        c.check()
    c.release()
    assert lock.exists()  # not ours: left alone


def test_two_train_processes_on_one_run_folder(tmp_path):
    """Issue: both exited 0 and the folder mixed their outputs. The second now stops at once
    with one line naming the holder; the folder holds one run."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "promptalign.cli",
        "train",
        "--method",
        "coop",
        "--dataset",
        "synthetic_shapes",
        "--data-root",
        str(tmp_path / "data"),
        "--arch",
        "tiny-shapes",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        "optim.epochs=3",
        "optim.batch_size=32",
        "optim.eval_batch_size=256",
    ]
    env = {**os.environ, "PYTHONPATH": SRC}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / LOCK).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--out {out} is in use by process {first.pid}" in lines[0]
    assert "choose another --out" in lines[0]
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("final" in r for r in log) == 1
    steps = [r["step"] for r in log if "step" in r]
    assert steps == list(range(1, len(steps) + 1))
    assert not (out / LOCK).exists()
