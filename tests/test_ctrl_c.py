"""Ctrl-C: one line, exit status 130, a run folder that resumes to exactly the uninterrupted
result, and a second Ctrl-C that exits at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_inputs import _folder, _train

from promptalign.cli import main

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs POSIX signals")


def test_ctrl_c_in_train_is_one_line_and_the_run_resumes_bit_identically(
    tmp_path, capsys, monkeypatch
):
    import promptalign.engine.checkpoint as ck

    data = _folder(tmp_path / "d")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_train(data, whole, "optim.epochs=4")) == 0
    save_resume = ck.save_resume

    def save_then_ctrl_c(run_dir, method, opt, scaler, names, epoch, steps):
        save_resume(run_dir, method, opt, scaler, names, epoch, steps)
        if epoch == 2:  # the user presses Ctrl-C after the second epoch's checkpoint
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal lands here at the latest

    monkeypatch.setattr(ck, "save_resume", save_then_ctrl_c)
    capsys.readouterr()
    assert main(_train(data, cut, "optim.epochs=4")) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"promptalign train: interrupted at epoch 2 step 4; "
        f"resume with: promptalign train --resume --out {cut}"
    ]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(ck, "save_resume", save_resume)
    assert main(["train", "--resume", "--out", str(cut)]) == 0
    a, b = load_file(whole / "prompts.safetensors"), load_file(cut / "prompts.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x).get("step") for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == list(range(1, 9))  # no step logged twice


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(
    tmp_path, capsys, monkeypatch
):
    import promptalign.engine.loop as loop

    def ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    monkeypatch.setattr(loop, "train_epoch", ctrl_c)
    out = tmp_path / "run"
    assert main(_train(_folder(tmp_path / "d"), out)) == 130
    line = capsys.readouterr().err.strip()
    assert line == (
        "promptalign train: interrupted before its first epoch was saved (nothing to resume); "
        "run the command again"
    )
    assert not out.exists()  # nothing half-made left behind: the same command starts cleanly


def test_ctrl_c_in_benchmark_gives_the_command_to_re_run(tmp_path, capsys, monkeypatch):
    import promptalign.benchmark as benchmark

    def ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    monkeypatch.setattr(benchmark, "run_benchmark", ctrl_c)
    argv = ["benchmark", "base2new", "--methods", "coop", "--out", str(tmp_path / "b")]
    assert main(argv) == 130
    line = capsys.readouterr().err.strip()
    assert line.startswith("promptalign benchmark: interrupted; finished work is kept")
    assert line.endswith(f"promptalign benchmark base2new --methods coop --out {tmp_path / 'b'}")


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The first Ctrl-C starts a slow clean-up; the second one ends the process there."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from promptalign import cli
        from promptalign.cli import tools

        def slow(args):
            try:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
                time.sleep(60)
            finally:  # a clean-up that would take a minute
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again
                time.sleep(60)

        tools.cmd_list = slow
        sys.exit(cli.main(["list", "methods"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["promptalign list: interrupted"]
    assert time.perf_counter() - start < 50  # neither minute-long sleep ran out
