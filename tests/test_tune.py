"""`promptalign tune`: search spaces, trials scored on validation only, the study folder (resume,
refusal, pruning, parallel workers), the final test runs, `benchmark --tuned` and bad input."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import promptalign
from promptalign.cli import main
from promptalign.config import ConfigError, RunConfig, apply_overrides, load_yaml
from promptalign.tune import (
    StudyFolder,
    StudySpec,
    parse_space,
    run_tune,
    split_items,
    tuned_overrides,
)

optuna = pytest.importorskip("optuna", reason="promptalign tune needs optuna: promptalign[tune]")

FIXED = [
    "backbone.arch=tiny-shapes-v3",
    "backbone.weights=null",
    "run.device=cpu",
    "data.workers=0",
    "optim.epochs=1",
    "optim.eval_batch_size=256",
]
DATASET = "synthetic_shapes"  # 8 classes: at 1 shot, 8 training and 8 validation images
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def bb():
    return promptalign.load_backbone("tiny-shapes-v3")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The synthetic shapes task rendered once."""
    from promptalign.data import load_dataset

    root = tmp_path_factory.mktemp("shapes")
    load_dataset(DATASET, root, cache_dir=root / ".cache")
    return root


def _garbage_test_images(shapes: Path, into: Path) -> int:
    """A copy of the shapes data whose test images are garbage bytes (chmod does not stop
    root); returns how many were overwritten."""
    from promptalign.data.base import get_reader

    shutil.copytree(shapes, into)
    task = get_reader(DATASET).dataset_dir(into)
    split = json.loads((task / "split.json").read_text())
    for rel, _, _ in split["test"]:
        (task / "images" / rel).write_bytes(b"\x00 not an image \xff" * 8)
    return len(split["test"])


def _tune(tmp_path, data, bb, *items, **kw):
    kw.setdefault("trials", 2)
    kw.setdefault("shots", 1)
    kw.setdefault("seeds", (1,))
    return run_tune(
        "coop",
        DATASET,
        out=tmp_path / kw.pop("out", "study"),
        space=[*items, *FIXED, *kw.pop("fixed", [])],
        data_root=str(data),
        backbone=bb,
        **kw,
    )


# --------------------------------------------------------------------------- search spaces
def _base(method: str = "coop") -> RunConfig:
    return apply_overrides(RunConfig(), {"method.name": method, "data.dataset": "x"})


def test_search_space_syntax_and_types():
    space = parse_space(
        [
            "optim.lr=1e-4..1e-2:log",
            "optim.epochs=5..20",
            "method.options.n_ctx=2,4,8",
            "optim.scheduler=cosine,constant",
            "data.crop_scale=[0.5,1],[0.08,1]",
        ],
        base=_base(),
    )
    lr, epochs, n_ctx, sched, crop = space
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 1e-2, True)
    assert (epochs.kind, epochs.low, epochs.high, epochs.log) == ("int", 5, 20, False)
    assert n_ctx.choices == (2, 4, 8) and sched.choices == ("cosine", "constant")
    assert crop.choices == ((0.5, 1.0), (0.08, 1.0))  # converted by the field's type
    assert crop.optuna_choices() == ["[0.5, 1.0]", "[0.08, 1.0]"]
    assert crop.value_of("[0.08, 1.0]") == (0.08, 1.0)
    assert epochs.grid_values() == list(range(5, 21)) and lr.grid_values() is None
    assert split_items(["optim.lr=1e-3..1e-1", "optim.epochs=3", "a.b=1,2", "c=[1,2]"]) == (
        ["optim.lr=1e-3..1e-1", "a.b=1,2"],
        ["optim.epochs=3", "c=[1,2]"],
    )


def test_search_space_file(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(
        "optim.lr: 1e-4..1e-2:log\n"
        "optim.epochs: {low: 2, high: 6}\n"
        "method.options.n_sets: [1, 2, 4]\n"
        "method.options.eps: {low: 0.05, high: 0.5, log: true}\n"
    )
    lr, epochs, n_sets, eps = parse_space(base=_base("align"), space_file=f)
    assert lr.log and (epochs.kind, epochs.low, epochs.high) == ("int", 2, 6)
    assert n_sets.choices == (1, 2, 4) and (eps.kind, eps.log) == ("float", True)


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "no search space: give KEY=LOW..HIGH"),
        (["optim.lrr=1e-4..1e-2"], "unknown key 'optim.lrr'; allowed: ["),
        (["method.options.n_ctxx=1,2"], "coop has no option 'n_ctxx'"),
        (["optim.lr=1e-2..1e-4"], "low 0.01 is above high 0.0001; give LOW..HIGH"),
        (["optim.scheduler=1..3"], "a range needs a number field"),
        (["optim.lr=0..1"], "optim.lr: 0.0 must be > 0"),
        (["optim.epochs=0..4:log"], "a log scale needs low > 0"),
        (["optim.lr=1,,2"], "an empty choice"),
        (["optim.lr=1,1.0"], "a choice is given twice"),
        (["optim.lr=1..2", "optim.lr=3,4"], "optim.lr is searched twice"),
        (["data.shots=1,2"], "data.shots: cannot be searched"),
        (["run.eval_split=val,test"], "run.eval_split: cannot be searched"),
        (["optim=1,2"], "optim is a section"),
        (["optim.scheduler=cosine,linear"], "is not allowed; choose one of"),
    ],
)
def test_a_bad_search_space_is_one_clear_error(items, message):
    with pytest.raises(ConfigError, match=None) as e:
        parse_space(items, base=_base())
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the search space file is empty"),
        ("optim.lr: [\n", "not valid YAML"),
        ("- optim.lr\n", "expected a mapping"),
        ("optim:\n  lr: 1..2\n", "write dotted keys (optim.KEY: ...)"),
        ("optim.lr: 0.1\n", "0.1 is not a search"),
        ("optim.lr: {low: 1}\n", "a range is {low: L, high: H}"),
        ("optim.lr: {low: 1, high: 2, log: yes please}\n", "log must be true or false"),
    ],
)
def test_a_bad_search_space_file_is_one_clear_error(tmp_path, text, message):
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_space(base=_base(), space_file=f)
    assert message in str(e.value) and str(f) in str(e.value)


# --------------------------------------------------------------------------- scored on validation
def test_a_run_scored_on_validation_never_reads_the_test_images(tmp_path, shapes, bb):
    """run.eval_split=val: the pre-flight check, eval_every and the final evaluation use the
    validation split; the test images (garbage bytes here) are never opened. The same run on
    test refuses the garbage, so the images really are unreadable."""
    from promptalign.data import DatasetError
    from promptalign.engine import train

    data = tmp_path / "data"
    assert _garbage_test_images(shapes, data) == 200
    cfg = apply_overrides(
        RunConfig(),
        [
            "method.name=coop",
            f"data.dataset={DATASET}",
            f"data.root={data}",
            "data.shots=1",
            "optim.epochs=2",
            "run.eval_every=1",
            "run.eval_split=val",
            *FIXED[2:4],
            "optim.eval_batch_size=256",
        ],
    )
    ends = []
    res = train(cfg, tmp_path / "run", backbone=bb, epoch_callbacks=[ends.append])
    assert res.split == "val" and res.metrics["n"] == 8  # 1 validation image per class
    assert [e["epoch"] for e in ends] == [0, 1] and {e["split"] for e in ends} == {"val"}
    assert ends[0]["eval"]["n"] == 8 and ends[1]["eval"] is None  # the last: final evaluation
    assert load_yaml(tmp_path / "run" / "config.yaml").run.eval_split == "val"
    with pytest.raises(DatasetError, match="200 of 208 image"):
        train(apply_overrides(cfg, {"run.eval_split": "test"}), tmp_path / "run2", backbone=bb)


def test_the_new_setting_leaves_benchmark_fingerprints_as_they_were():
    from promptalign.benchmark import Job, config_fingerprint, job_config

    job = Job("fewshot", "synthetic_colour_shapes", "coop", 4, 1)
    cfg = job_config(job, ["data.workers=0"], "/data")
    assert config_fingerprint(cfg) == "c00497fe34"  # as before run.eval_split existed
    assert config_fingerprint(apply_overrides(cfg, {"run.eval_split": "val"})) != "c00497fe34"


def test_the_search_never_reads_the_test_split(tmp_path, shapes, bb):
    """The whole search (trials, their pre-flight checks, the choice) runs with every test image
    unreadable; only the final runs read the test split, and they refuse the garbage."""
    data = tmp_path / "data"
    _garbage_test_images(shapes, data)
    s = _tune(tmp_path, data, bb, "optim.lr=1e-3..1e-1:log", final=False)
    assert s.states == {"complete": 2} and s.chosen is not None and not s.test
    for n in (0, 1):
        assert (
            load_yaml(s.study_dir / "trials" / f"000{n}" / "run" / "config.yaml").run.eval_split
            == "val"
        )
    s = _tune(tmp_path, data, bb, "optim.lr=1e-3..1e-1:log")  # resumes: the final runs now
    assert s.states == {"complete": 2} and not s.test
    assert "cannot be read" in s.test_failed[1]


# --------------------------------------------------------------------------- a whole study
def test_a_study_end_to_end_through_the_cli(tmp_path, shapes, capsys):
    study = tmp_path / "study"
    argv = [
        "tune",
        "--method",
        "coop",
        "--dataset",
        DATASET,
        "--trials",
        "3",
        "--out",
        str(study),
        "--shots",
        "1",
        "--seeds",
        "1",
        "2",
        "--data-root",
        str(shapes),
        "--arch",
        "tiny-shapes-v3",
        "--device",
        "cpu",
        "optim.lr=1e-3..1e-1:log",
        "method.options.n_ctx=2,4",
        "data.workers=0",
        "optim.epochs=1",
        "optim.eval_batch_size=256",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 of 3 trials ended" in out and "Test accuracy of the chosen setting" in out
    for name in ("trials.md", "trials.csv", "chosen.json", "chosen.yaml", "history.png"):
        assert (study / name).is_file(), name
    assert (study / "importance.png").is_file() or "importance.png: not drawn" in out
    rows = (study / "trials.csv").read_text().splitlines()
    assert rows[0] == "trial,state,val accuracy,epochs,time (s),optim.lr,method.options.n_ctx,note"
    assert len(rows) == 4 and sum("(chosen)" in r for r in rows) == 1
    chosen = json.loads((study / "chosen.json").read_text())
    result = json.loads((study / "result.json").read_text())
    assert set(result["test"]) == {"1", "2"} and result["chosen"]["trial"] == chosen["trial"]
    # the chosen config trains as is, and is the final run of seed 1
    cfg = load_yaml(study / "chosen.yaml")
    assert (
        cfg.run.eval_split == "test"
        and cfg.method.options["n_ctx"] == chosen["params"]["method.options.n_ctx"]
    )
    final = next((study / "final" / "fewshot" / "jobs").rglob("shots1-seed1-*"))
    job_cfg = yaml.safe_load((final / "job.json").read_text())["config"]
    assert job_cfg["optim"]["lr"] == pytest.approx(chosen["params"]["optim.lr"])
    assert json.loads((final / "result.json").read_text())["result"] == result["test"]["1"]
    # trials are run folders scored on validation (8 images), the final runs on test (200)
    trial = study / "trials" / f"{chosen['trial']:04d}" / "run" / "run.json"
    assert json.loads(trial.read_text())["metrics"]["n"] == 8
    final_run = json.loads((final / "run" / "run.json").read_text())
    assert final_run["metrics"]["n"] == 200

    # the same command again: nothing to train, the same report
    assert main(argv) == 0
    assert "3 of 3 trials ended" in capsys.readouterr().out

    # benchmark --tuned: the study's chosen values for the study's method's jobs
    overrides = tuned_overrides(study)
    assert f"coop:optim.lr={chosen['params']['optim.lr']!r}" in overrides
    assert "coop:optim.epochs=1" in overrides and not any("backbone" in o for o in overrides)
    from promptalign.benchmark import plan_jobs
    from promptalign.cli import build_parser
    from promptalign.cli.bench import benchmark_overrides

    args = build_parser().parse_args(
        ["benchmark", "fewshot", "--methods", "coop", "zeroshot", "--tuned", str(study)]
    )
    plan = plan_jobs(
        "fewshot",
        methods=args.methods,
        datasets=[DATASET],
        seeds=[1],
        shots=[4],
        data_root=str(shapes),
        out_dir=tmp_path / "b",
        overrides=benchmark_overrides(args),
    )
    by = {job.method: cfg for job, cfg, _ in plan}
    assert by["coop"].optim.lr == pytest.approx(chosen["params"]["optim.lr"])
    untuned = plan_jobs(
        "fewshot",
        methods=["zeroshot"],
        datasets=[DATASET],
        seeds=[1],
        shots=[4],
        data_root=str(shapes),
        out_dir=tmp_path / "b",
    )
    assert by["zeroshot"] == untuned[0][1]  # another method's jobs keep their own settings


def test_an_interrupted_study_resumes_its_trial_from_its_last_epoch(tmp_path, shapes, bb, caplog):
    """A worker killed after the first epoch of a trial leaves it running in the storage with a
    stale claim; the same command takes it over and resumes its run from that epoch."""
    kw = {"items": ["optim.lr=1e-3..1e-1:log"], "fixed": [*FIXED, "optim.epochs=2"]}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from promptalign.tune import run_tune;"
        "import promptalign.engine.checkpoint as ck, os, signal;"
        "save = ck.save_resume;"
        "ck.save_resume = lambda *a, **k: (save(*a, **k), os.kill(os.getpid(), signal.SIGKILL));"
        f"run_tune('coop', {DATASET!r}, out=sys.argv[3], trials=2, shots=1, seeds=(1,), "
        f"data_root=sys.argv[2], space={kw['items'] + kw['fixed']!r})"
    )
    study = tmp_path / "study"
    p = subprocess.run(
        [sys.executable, "-c", code, SRC, str(shapes), str(study)], capture_output=True
    )
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    folder = StudyFolder(study)
    trials = folder.optuna_study().get_trials()
    assert [t.state.name for t in trials] == ["RUNNING"]
    assert json.loads((study / "trials" / "0000" / "run" / "run.json").read_text())["epoch"] == 1
    with caplog.at_level(logging.INFO):
        s = run_tune(
            "coop",
            DATASET,
            out=study,
            trials=2,
            shots=1,
            seeds=(1,),
            data_root=str(shapes),
            space=kw["items"] + kw["fixed"],
            backbone=bb,
            final=False,
        )
    assert s.states == {"complete": 2}  # the budget counts the resumed trial once
    assert "trial 0: its worker is gone; resuming it" in caplog.text
    assert "after epoch 1" in caplog.text  # the engine resumed the run, not a new one
    first = [t for t in folder.optuna_study().get_trials() if t.number == 0][0]
    assert first.params["optim.lr"] == trials[0].params["optim.lr"]


def test_a_study_folder_refuses_another_study_and_keeps_it(tmp_path, shapes, capsys):
    from promptalign.tune.space import Param

    study = tmp_path / "study"
    spec = StudySpec(
        "coop", DATASET, 1, (Param("optim.lr", "float", 1e-3, 1e-1, True),), tuple(FIXED)
    )
    StudyFolder(study).create_or_update(spec, trials=2, data_root=str(shapes), storage=None)
    before = (study / "study.json").read_bytes()
    base = [
        "tune",
        "--trials",
        "2",
        "--out",
        str(study),
        "--shots",
        "1",
        "--data-root",
        str(shapes),
        "--arch",
        "tiny-shapes-v3",
        "--device",
        "cpu",
        "data.workers=0",
        "optim.epochs=1",
        "optim.eval_batch_size=256",
    ]
    cases = [
        (["--method", "align", "--dataset", DATASET, "optim.lr=1e-3..1e-1:log"], "method coop"),
        (
            ["--method", "coop", "--dataset", "synthetic_colour_shapes", "optim.lr=1e-3..1e-1:log"],
            f"on dataset {DATASET}",
        ),
        (
            ["--method", "coop", "--dataset", DATASET, "optim.lr=1e-3..1e-2:log"],
            "holds a study with space optim.lr=0.001..0.1:log",
        ),
        (
            [
                "--method",
                "coop",
                "--dataset",
                DATASET,
                "optim.lr=1e-3..1e-1:log",
                "--pruner",
                "none",
            ],
            "holds a study with pruner median",
        ),
        (
            [
                "--method",
                "coop",
                "--dataset",
                DATASET,
                "optim.lr=1e-3..1e-1:log",
                "--storage",
                f"sqlite:///{tmp_path}/other.db",
            ],
            "drop --storage",
        ),
    ]
    for extra, message in cases:
        assert main([*base[:1], *extra, *base[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert "give another --out" in err or "drop --storage" in err
    assert (study / "study.json").read_bytes() == before
    assert sorted(p.name for p in study.iterdir()) == [".study.lock", "study.json"] or sorted(
        p.name for p in study.iterdir()
    ) == ["study.json"]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, shapes, capsys):
    from data_fixtures import image

    nova = tmp_path / "noval"  # train and test folders, no val/
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            for i in range(2):
                image(nova / split / c / f"{i}.jpg", i)
    common = ["--out", str(tmp_path / "s"), "--data-root", str(shapes), "--arch", "tiny-shapes-v3"]
    cases = [
        (["--dataset", DATASET, "--trials", "0", "optim.lr=1e-3..1e-1"], "--trials: 0 is not"),
        (["--dataset", DATASET, "--trials", "2"], "no search space"),
        (["--dataset", DATASET, "--trials", "2", "optim.lr=1e-1..1e-3"], "low 0.1 is above"),
        (["--dataset", DATASET, "--trials", "2", "optim.lrr=1..2"], "unknown key 'optim.lrr'"),
        (
            ["--dataset", DATASET, "--trials", "2", "optim.lr=1..2", "optim.bogus=3"],
            "unknown key 'optim.bogus'",
        ),
        (
            ["--dataset", str(nova), "--trials", "2", "--shots", "1", "optim.lr=1e-3..1e-1"],
            "noval: no validation split, and promptalign tune chooses on it: give one (a val/",
        ),
        (
            ["--dataset", DATASET, "--trials", "2", "--sampler", "grid", "optim.lr=1e-3..1e-1"],
            "--sampler grid: optim.lr is a real range",
        ),
        (
            ["--dataset", DATASET, "--trials", "2", "optim.lr=1e-3..1e-1", "run.eval_every=0"],
            "run.eval_every=0 leaves the median pruner no intermediate scores",
        ),
        (
            ["--dataset", DATASET, "--trials", "2", "optim.lr=1e-3..1e-1", "run.seed=3"],
            "run.seed cannot be set for a study",
        ),
    ]
    for extra, message in cases:
        assert main(["tune", "--method", "coop", *common, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    assert (
        main(
            [
                "tune",
                "--method",
                "coop",
                *common,
                "--dataset",
                DATASET,
                "--trials",
                "2",
                "optim.lr=1e-3..1e-1",
            ]
        )
        == 2
    )
    assert "holds other files and no study" in capsys.readouterr().err
    assert main(["benchmark", "fewshot", "--methods", "coop", "--tuned", str(tmp_path / "s")]) == 2
    assert "is not a study folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- pruning, failures
def test_a_pruned_trial_leaves_a_consistent_run_and_a_failed_one_its_error(
    tmp_path, shapes, bb, monkeypatch
):
    """Pruning stops a trial at an epoch's end: its run folder holds that epoch's checkpoint and
    resume state (a consistent, resumable run). A trial that raises is recorded as failed with
    its error, and the study goes on."""
    from promptalign.engine import NonFiniteError
    from promptalign.tune import study as study_module

    monkeypatch.setattr(
        optuna.trial.Trial, "should_prune", lambda self: self.params["method.options.n_ctx"] == 4
    )
    train = study_module.train_or_resume

    def failing(cfg, run_dir, backbone=None, **kw):
        if cfg.method.options["n_ctx"] == 3:
            raise NonFiniteError("training diverged at epoch 1, step 1: loss nan")
        return train(cfg, run_dir, backbone, **kw)

    monkeypatch.setattr(study_module, "train_or_resume", failing)
    s = _tune(
        tmp_path,
        shapes,
        bb,
        "method.options.n_ctx=2,3,4",
        fixed=["optim.epochs=3"],
        trials=5,  # the grid has 3 points
        sampler="grid",
        final=False,
    )
    assert s.states == {"pruned": 1, "fail": 1, "complete": 1}
    trials = {
        json.loads((p / "trial.json").read_text())["params"]["method.options.n_ctx"]: p
        for p in (s.study_dir / "trials").iterdir()
    }
    pruned = trials["4"]
    info = json.loads((pruned / "run" / "run.json").read_text())
    assert info["epoch"] == 1 and info["metrics"] == {}  # stopped after epoch 1 of 3
    assert (pruned / "run" / "resume.safetensors").is_file()
    assert json.loads((pruned / "trial.json").read_text())["state"] == "pruned"
    table = (s.study_dir / "trials.md").read_text()
    assert "pruned after epoch 1" in table and "NonFiniteError: training diverged" in table
    assert "NonFiniteError" in (trials["3"] / "error.txt").read_text()
    assert json.loads((trials["3"] / "trial.json").read_text())["state"] == "failed"


# --------------------------------------------------------------------------- parallel workers
def test_local_workers_share_one_study_and_its_budget(tmp_path, shapes):
    s = run_tune(
        "coop",
        DATASET,
        out=tmp_path / "study",
        trials=3,
        shots=1,
        seeds=(1,),
        data_root=str(shapes),
        space=["optim.lr=1e-3..1e-1:log", *FIXED],
        launcher="local",
        launcher_settings={"parallel": 2},
        final=False,
    )
    assert s.states == {"complete": 3} and not s.failed_workers
    ran = []
    for p in (tmp_path / "study" / "workers").rglob("result.json"):
        ran += json.loads(p.read_text())["result"]["trials"]
    assert sorted(ran) == [0, 1, 2]  # every trial run once, by one of the two workers
    subs = json.loads((tmp_path / "study" / "study.json").read_text())["submissions"]
    assert subs[-1]["launcher"] == "local" and subs[-1]["parallel"] == 2


def test_the_median_pruner_compares_trials_at_the_same_point_of_their_schedules():
    """Trials of 4 and of 20 epochs are compared at the same percent of their schedules; none is
    pruned in its first quarter (the warm-up), a lagging one is after it."""
    optuna = pytest.importorskip("optuna")
    from promptalign.tune.study import PRUNE_AFTER, StudySpec, _pruner, progress_step, report_epoch

    assert [progress_step(e, 4) for e in range(4)] == [25, 50, 75, 100]
    assert [progress_step(e, 3) for e in range(3)] == [34, 67, 100]
    spec = StudySpec("coop", "d", 1, (), (), "tpe", "median", "accuracy", 1)
    study = optuna.create_study(direction="maximize", pruner=_pruner(optuna, spec))
    for _ in range(3):  # finished 4-epoch trials scoring 50 all along
        t = study.ask()
        for e in range(4):
            report_epoch(t, 50.0, e, 4)
        study.tell(t, 50.0)
    assert sorted(study.trials[0].intermediate_values) == list(range(1, 101))
    lagging = study.ask()  # a 20-epoch trial at 10 throughout
    pruned_at = None
    for e in range(20):
        report_epoch(lagging, 10.0, e, 20)
        if lagging.should_prune():
            pruned_at = progress_step(e, 20)
            break
    assert pruned_at == PRUNE_AFTER  # at the first step it may be: after epoch 5 of 20, not 1
