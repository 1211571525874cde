"""A small fuzzer over the command line: random flags and ``KEY=VALUE`` overrides with values of
random types and sizes (numbers of every range, NaN, long and non-ASCII strings, control
characters, YAML fragments and alias bombs, paths that do not exist), run in-process through
``promptalign.cli.main``.

Every case must end with an exit status (0, 1, 2; never an exception escaping ``main``, i.e. a
raw traceback), a last stderr line of the ``promptalign ...`` form when it fails, and within a
time limit (a hang fails the case). Bounded: a fixed seed, at most ``CASES`` cases and
``BUDGET_S`` seconds in all; a training case always ends with ``optim.epochs=0`` (evaluation
only), so a valid random combination stays fast.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
import typing
from pathlib import Path

import pytest
from test_bad_inputs import _folder, _noise

from promptalign.cli import main
from promptalign.config import RunConfig

CASES = 100
BUDGET_S = 45.0
CASE_LIMIT_S = 60
SEED = 30
LOG_PREFIXES = ("WARNING ", "INFO ")

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")


def _config_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            keys += _config_keys(tp, key + ".")
        else:
            keys.append(key)
    return keys


# data.root / data.dataset could point a generated dataset at the working folder: they get paths
# under the test's own folder only (see _value)
KEYS = [k for k in _config_keys() if k not in ("data.root",)]
METHOD_OPTIONS = ["n_ctx", "depth", "ctx_init", "eps", "max_iter", "n_sets", "beta", "template"]


def _value(rng: random.Random, tmp: Path) -> str:
    kind = rng.randrange(14)
    if kind == 0:
        return str(rng.choice([0, 1, -1, 2, 7, 2**31, 2**63, -(2**70)]))
    if kind == 1:
        return "9" * rng.choice([20, 400, 4400, 5000])  # beyond float range / int digit limits
    if kind == 2:
        return rng.choice(["0.5", "-0.0", "1e-320", "1e308", "1e999", ".nan", ".inf", "-.inf"])
    if kind == 3:
        return rng.choice(["true", "false", "yes", "null", "none", "~", "", " ", "None"])
    if kind == 4:
        n = rng.choice([1, 10, 1000, 100_000])
        return "".join(rng.choice("abcXYZ_-./ ") for _ in range(n))
    if kind == 5:
        return rng.choice(["caf\u00e9", "\u7a7a", "\U0001f600", "\u202eabc", "a\tb", "\x1b[31m"])
    if kind == 6:
        return rng.choice(["\x00", "a\x00b", "\x7f", "\r\n", "\n"])
    if kind == 7:
        return rng.choice(["[1, 2]", "[0.9, 0.5]", "{a: 1}", "[[[]]]", "{", "]", "[1,", "a: b"])
    if kind == 8:
        levels = rng.choice([3, 6, 9])
        flow = "[&a0 [x, x, x, x, x, x, x, x, x, x], " + ", ".join(["*a0"] * 9) + "]"
        for level in range(1, levels):
            flow = f"[&a{level} {flow}, " + ", ".join([f"*a{level}"] * 9) + "]"
        return flow
    if kind == 9:
        return "[" * rng.choice([50, 200, 3000]) + "]" * rng.choice([0, 50, 3000])
    if kind == 10:
        return "&a [*a]"
    if kind == 11:
        return str(tmp / rng.choice(["missing", "missing.csv", "missing.json", "x/../y"]))
    if kind == 12:
        return rng.choice(["cpu", "cuda", "cuda:7", "mps", "tpu", "auto", "cpu:0", "cuda:-1"])
    return rng.choice(["coop", "align", "zeroshot", "base", "new", "all", "sgd", "auto"])


def _overrides(rng: random.Random, tmp: Path, keys: list[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.7:
            key = rng.choice(keys)
        elif roll < 0.85:
            key = f"method.options.{rng.choice(METHOD_OPTIONS)}"
        else:
            key = rng.choice(["optim", "data.x", "x.y.z", "", ".", "optim.lr.x", "=", "a" * 300])
        out.append(f"{key}={_value(rng, tmp)}")
    return out


def _case(rng: random.Random, tmp: Path, data: Path, run: Path, image: Path) -> list[str]:
    command = rng.choice(["train", "train", "train", "eval", "eval", "predict", "explain", "list"])
    v = lambda: _value(rng, tmp)  # noqa: E731
    if command == "train":
        args = ["train", "--out", str(tmp / f"run{rng.randrange(10**6)}"), "--no-progress"]
        flags = {
            "--method": lambda: rng.choice(["coop", "align", "zeroshot", "tip_adapter", v()]),
            "--dataset": lambda: rng.choice([str(data), str(data), v()]),
            "--arch": lambda: rng.choice(["tiny-shapes", "tiny-shapes", "pa-tiny-vit", v()]),
            "--shots": v,
            "--seed": v,
            "--subsample": lambda: rng.choice(["all", "base", "new", v()]),
            "--workers": v,
            "--device": lambda: rng.choice(["cpu", "cpu", v()]),
            "--preset": v,
            "--weights": v,
            "--split-file": v,
            "--init-from": lambda: rng.choice([str(run), v()]),
        }
        chosen = {"--method": flags["--method"], "--dataset": flags["--dataset"]}
        chosen.update(dict(rng.sample(sorted(flags.items()), rng.randrange(4))))
        chosen.setdefault("--arch", lambda: "tiny-shapes")
        chosen.setdefault("--device", lambda: "cpu")
        chosen.setdefault("--workers", lambda: "0")
        for flag, make in chosen.items():
            args += [flag, make()]
        keys = [k for k in KEYS if k not in ("optim.epochs", "optim.epochs_by_shots")]
        return args + _overrides(rng, tmp, keys, rng.randrange(4)) + ["optim.epochs=0"]
    if command == "eval":
        args = ["eval", rng.choice([str(run), str(run), v()]), "--device", "cpu"]
        for flag in rng.sample(
            ["--subsample", "--dataset", "--data-root", "--json", "--base-new"], 2
        ):
            args += [flag] if flag in ("--json", "--base-new") else [flag, v()]
        reading = ["data.skip_corrupt", "data.max_image_pixels", "optim.lr", "data.workers"]
        return args + _overrides(rng, tmp, reading, rng.randrange(3))
    if command == "predict":
        args = ["predict", str(run), rng.choice([str(image), str(image.parent), v()])]
        for flag in rng.sample(["--classes", "--topk", "--max-image-pixels", "--json"], 2):
            args += [flag] if flag == "--json" else [flag, v()]
        return args + ["--device", "cpu"]
    if command == "explain":
        args = ["explain", str(run), rng.choice([str(image), v()]), "--out", str(tmp / "x")]
        if rng.random() < 0.3:  # the embedding map instead of images
            args = ["explain", str(run), "--embeddings", "--out", str(tmp / "x")]
            args += ["--max-images", rng.choice(["2", v()]), "--projection", "pca"]
        for flag in rng.sample(["--classes", "--topk", "--panels", "--dataset", "--subsample"], 2):
            args += [flag, v()]
        return args + ["--device", "cpu"]
    return ["list", rng.choice(["methods", "datasets", "presets", v()])]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    t = tmp_path_factory.mktemp("fuzz")
    data = _folder(t / "data")
    run = t / "run"
    base = ["train", "--out", str(run), "--method", "zeroshot", "--dataset", str(data)]
    assert main([*base, "--arch", "tiny-shapes", "--device", "cpu", "--no-progress"]) == 0
    _noise(t / "images" / "a.png", 3)
    return t, data, run, t / "images" / "a.png"


def test_random_flags_and_values_end_in_an_exit_status_not_a_traceback(setup, capsys):
    tmp, data, run, image = setup
    rng = random.Random(SEED)
    previous = signal.signal(signal.SIGALRM, _alarm)
    start, done = time.perf_counter(), 0
    try:
        while done < CASES and time.perf_counter() - start < BUDGET_S:
            argv = _case(rng, tmp, data, run, image)
            shown = [a if len(a) < 80 else a[:80] + "..." for a in argv]
            capsys.readouterr()
            signal.alarm(CASE_LIMIT_S)
            try:
                code = main(argv)
            except Hang:
                pytest.fail(f"no answer within {CASE_LIMIT_S} s: {shown}")
            except BaseException as e:  # noqa: BLE001 - what would reach the user as a traceback
                pytest.fail(f"raw {type(e).__name__} ({str(e)[:300]}) escaped main: {shown}")
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            assert code in (0, 1, 2), (code, shown)
            assert "Traceback" not in err and "internal error" not in err, (shown, err[-2000:])
            if code == 2:  # one error line (besides logged warnings), bounded
                lines = [x for x in err.splitlines() if x and not x.startswith(LOG_PREFIXES)]
                assert len(lines) == 1 and lines[0].startswith("promptalign"), (shown, err[-2000:])
                assert len(lines[0]) <= 2300, (shown, len(lines[0]))
            done += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert done >= 20, f"only {done} cases in {BUDGET_S} s"
