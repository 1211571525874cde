"""Trainer, evaluation, checkpoints, resume, configs and the CLI, end to end on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import promptalign
from promptalign.cli import main
from promptalign.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_yaml,
    method_config_class,
    resolve_optim,
)
from promptalign.engine import CheckpointError, evaluate_run, lr_at, metrics_from_predictions, train
from promptalign.presets import PROTOCOLS, list_presets, make_preset

from conftest import ALL_METHODS as ALL
from conftest import small_config
from data_fixtures import make_json_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    make_json_dataset(root / "data", "oxford_pets")
    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items()}, str(weights))
    return root, weights


def _args(setup, out, method="coop", extra=()):
    root, weights = setup
    opts = [f"method.options.{k}={json.dumps(v)}" for k, v in small_config(method).items()]
    return [
        "train",
        "--method",
        method,
        "--dataset",
        "oxford_pets",
        "--data-root",
        str(root / "data"),
        "--shots",
        "2",
        "--seed",
        "1",
        "--out",
        str(out),
        "--arch",
        "pa-tiny-vit",
        "--weights",
        str(weights),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "optim.epochs=1",
        "optim.batch_size=4",
        "optim.eval_batch_size=8",
        *opts,
        *extra,
    ]


@pytest.mark.parametrize("method", ALL)
def test_every_method_trains_and_evaluates_through_the_cli(setup, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(_args(setup, out, method, ["--subsample", "base"])) == 0
    assert "test accuracy" in capsys.readouterr().out
    for f in ("config.yaml", "prompts.safetensors", "run.json", "metrics.jsonl"):
        assert (out / f).is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["sampling"] == {
        "dataset": "oxford_pets",
        "shots": 2,
        "seed": 1,
        "subsample": "base",
        "num_classes": 3,
    }
    assert load_yaml(out / "config.yaml").optim.lr is not None  # resolved from the method preset
    assert main(["eval", str(out), "--subsample", "new", "--device", "cpu", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["num_classes"] == 2 and m["n"] == 4 and 0 <= m["accuracy"] <= 100


def test_base_new_eval_and_predict(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "maple", ["--subsample", "base"])) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--base-new", "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["H"] == pytest.approx(
        2 * r["base"] * r["new"] / (r["base"] + r["new"]) if r["base"] + r["new"] else 0
    )
    images = setup[0] / "data" / "oxford_pets" / "images"
    assert (
        main(
            [
                "predict",
                str(out),
                str(images / "beagle"),
                "--topk",
                "2",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 11 and len(preds[0]["top"]) == 2
    assert {t["label"] for p in preds for t in p["top"]} <= {
        "abyssinian",
        "american bulldog",
        "beagle",
    }
    assert (
        main(
            ["predict", str(out), str(images / "beagle"), "--classes", "dog,cat", "--device", "cpu"]
        )
        == 0
    )


def test_resume_after_interrupt_is_bit_identical(setup, tmp_path):
    def cfg(out):
        from promptalign.cli import build_parser
        from promptalign.cli.runs import train_config as _train_config

        return _train_config(
            build_parser().parse_args(_args(setup, out, "coop", ["optim.epochs=3"]))
        )

    full = train(cfg(tmp_path / "full"), tmp_path / "full")

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(record):
        if record["step"] == 5:  # in the middle of epoch 2 (3 steps per epoch)
            raise Stop

    with pytest.raises(Stop):
        train(cfg(tmp_path / "cut"), tmp_path / "cut", callbacks=[interrupt])
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["epoch"] == 1
    (tmp_path / "cut" / ".prompts.safetensors.x1y2").write_bytes(b"half")  # a killed write
    resumed = train(None, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "prompts.safetensors"))
    b = load_file(str(tmp_path / "cut" / "prompts.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == full.steps == 9
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    assert not [p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")]
    # the steps the interrupted epoch had logged are not repeated
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if "step" in json.loads(ln)
    ]
    assert steps == list(range(1, 10))
    # every run file has the mode the user's umask gives
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "cut").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_existing_run_is_not_overwritten(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    before = (out / "prompts.safetensors").read_bytes()
    assert main(_args(setup, out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "prompts.safetensors").read_bytes() == before


def test_corrupt_checkpoint_and_config_give_clear_errors(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, extra=["optim.epochs=2"])) == 0
    prompts = (out / "prompts.safetensors").read_bytes()
    (out / "resume.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="resume.safetensors is corrupt"):
        train(None, out, resume=True)
    assert (out / "prompts.safetensors").read_bytes() == prompts  # earlier checkpoint intact
    capsys.readouterr()
    (out / "prompts.safetensors").write_bytes(b"\x00" * 10)
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    assert "prompts.safetensors is corrupt" in capsys.readouterr().err
    (out / "config.yaml").write_text("optim: {lr: [unclosed")
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    assert "config.yaml: not valid YAML" in capsys.readouterr().err


def test_interrupted_write_leaves_previous_checkpoint(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    before = (out / "prompts.safetensors").read_bytes()
    import promptalign.engine.checkpoint as ck

    def broken(tensors, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError):
        ck.write_tensors(out / "prompts.safetensors", {"x": torch.zeros(2)})
    assert (out / "prompts.safetensors").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_config_overrides_are_typed():
    cfg = apply_overrides(
        RunConfig(),
        [
            "optim.lr=0.01",
            "data.shots=4",
            "method.name=coop",
            "method.options.n_ctx=8",
            "data.shots=none",
            "backbone.weights=null",
        ],
    )
    assert cfg.optim.lr == 0.01 and cfg.data.shots is None and cfg.method.options == {"n_ctx": 8}
    with pytest.raises(
        ConfigError,
        match=r"optim.amp: 'fp8' is not allowed; choose one of \['auto', 'none', 'bf16', 'fp16'\]",
    ):
        apply_overrides(RunConfig(), ["optim.amp=fp8"])
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        apply_overrides(RunConfig(), ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'.*optim.lr"):
        apply_overrides(RunConfig(), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(RunConfig(), ["optim.lr"])


def test_shipped_presets_match_the_method_configs():
    assert len(list_presets()) == len(ALL) * len(PROTOCOLS)
    for method in ALL:
        for protocol in PROTOCOLS:
            from promptalign.presets import load_preset

            assert load_preset(f"{method}-{protocol}") == make_preset(method, protocol), (
                method,
                protocol,
            )
    assert load_preset("maple-cross_dataset").optim.epochs == 2
    assert load_preset("coop-fewshot").optim.epochs is None  # shot-dependent
    # a method's config preset named after the protocol is what the protocol's run preset uses
    b2n = load_preset("proda-base2new")
    proda = method_config_class("proda").from_preset(b2n.method.preset)
    optim = resolve_optim(b2n.optim, proda.optim, b2n.data.shots)
    assert (proda.prompts_per_step, proda.covariance) == (4, "diagonal")
    assert (optim.lr, optim.batch_size, optim.epochs) == (0.001, 4, 100)
    assert load_preset("proda-fewshot").method.preset is None  # few-shot keeps CoOp's schedule


def test_lr_schedule_constant_warmup_then_cosine():
    kw = dict(lr=0.002, epochs=10, warmup_epochs=1, warmup_lr=1e-5)
    assert lr_at(0, **kw) == 1e-5
    assert lr_at(1, **kw) == pytest.approx(0.002)
    assert lr_at(6, **kw) == pytest.approx(0.001)
    assert lr_at(3, **kw) > lr_at(4, **kw) > lr_at(9, **kw) > 0


def test_metrics():
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    lab = torch.tensor([0, 1, 1, 2, 2, 0])
    m = metrics_from_predictions(pred, lab, 4)
    assert m["accuracy"] == pytest.approx(400 / 6)
    assert m["per_class_accuracy"][:3] == [50.0, 50.0, 100.0] and m["per_class_accuracy"][3] is None
    f1 = [2 * 0.5 * 0.5 / 1, 2 * 1 * 0.5 / 1.5, 2 * (2 / 3) * 1 / (5 / 3)]
    assert m["macro_f1"] == pytest.approx(100 * sum(f1) / 3)


def _torchrun(args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "promptalign.cli",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_process_gloo_training_and_sharded_eval(setup, tmp_path):
    one = tmp_path / "one"
    assert main(_args(setup, one, "coop", ["optim.epochs=2", "optim.batch_size=4"])) == 0
    two = tmp_path / "two"
    res = _torchrun(_args(setup, two, "coop", ["optim.epochs=2", "optim.batch_size=2"]))
    assert res.returncode == 0, res.stderr[-3000:]
    acc1 = json.loads((one / "run.json").read_text())["metrics"]["accuracy"]
    acc2 = json.loads((two / "run.json").read_text())["metrics"]["accuracy"]
    assert (
        abs(acc1 - acc2) <= 20.0
    )  # same recipe, 2 x 2 images per step vs 4: different sample order
    lines = [ln for ln in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(
        json.loads(ln).get("step", 0) <= 6 for ln in lines
    )  # rank 0 logs only its own steps once
    # sharded evaluation is exact: two processes score the same checkpoint identically to one
    res = _torchrun(["eval", str(one), "--json", "--device", "cpu"])
    assert res.returncode == 0, res.stderr[-3000:]
    out_lines = res.stdout.splitlines()
    assert len(out_lines) == 1, res.stdout  # rank 0 alone reports the result
    sharded = json.loads(out_lines[0])
    single = evaluate_run(one, device="cpu")
    assert sharded["accuracy"] == single["accuracy"] and sharded["n"] == single["n"] == 10
    assert sharded["per_class_accuracy"] == single["per_class_accuracy"]


def _cfg(setup, out, method="coop", extra=()):
    from promptalign.cli import build_parser
    from promptalign.cli.runs import train_config as _train_config

    return _train_config(build_parser().parse_args(_args(setup, out, method, list(extra))))


def test_resolved_config_alone_recreates_the_run_bit_identically(setup, tmp_path):
    first = train(_cfg(setup, tmp_path / "a", "maple", ["optim.epochs=2"]), tmp_path / "a")
    stored = load_yaml(tmp_path / "a" / "config.yaml")
    opts = stored.method.options
    assert {"n_ctx", "depth", "ctx_init", "position", "optim", "regularizers"} <= set(opts)
    assert all(
        getattr(stored.optim, f) is not None
        for f in ("optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size")
    )
    assert stored.data.workers == 0 and stored.backbone.weights is not None
    again = train(stored, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "prompts.safetensors"))
    b = load_file(str(tmp_path / "b" / "prompts.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.metrics["accuracy"] == first.metrics["accuracy"]
    assert load_yaml(tmp_path / "b" / "config.yaml") == stored


def test_crop_scale_is_the_datasets_unless_set_and_is_stored_and_used(setup, tmp_path):
    from promptalign.engine.build import build_run

    settings = {
        "default": [],
        "dassl": ["data.crop_scale=[0.08,1]"],
        "half": ["data.crop_scale=[0.5, 1]"],
    }
    for name, extra in settings.items():
        train(_cfg(setup, tmp_path / name, "coop", extra), tmp_path / name)
        stored = load_yaml(tmp_path / name / "config.yaml")
        expected = (0.5, 1.0) if name == "half" else (0.08, 1.0)  # oxford_pets: CoOp/Dassl's
        assert stored.data.crop_scale == expected
        run = build_run(stored, torch.device("cpu"))
        assert run.train_set.transform.transforms[0].scale == expected  # what training crops


def test_progress_bar_never_changes_results(setup, tmp_path, monkeypatch):
    quiet = train(_cfg(setup, tmp_path / "quiet"), tmp_path / "quiet")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = train(
        dataclasses.replace(
            _cfg(setup, tmp_path / "bar"),
            run=dataclasses.replace(_cfg(setup, tmp_path / "bar").run, progress=True),
        ),
        tmp_path / "bar",
    )
    a = load_file(str(tmp_path / "quiet" / "prompts.safetensors"))
    b = load_file(str(tmp_path / "bar" / "prompts.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and quiet.metrics == bar.metrics


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    from promptalign.engine.loop import _progress

    batches = iter([1, 2])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert _progress(batches, 2, RunConfig(), "epoch 1/1") is batches


def test_nan_in_training_and_evaluation_is_an_error_naming_where(setup, tmp_path, capsys):
    from promptalign.engine import NonFiniteError, build_run, evaluate
    from promptalign.engine.loop import _Step, train_epoch

    cfg = _cfg(setup, tmp_path / "x")
    r = build_run(cfg, torch.device("cpu"))
    with torch.no_grad():
        r.method.ctx.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="training diverged at epoch 1, step 1"):
        train_epoch(r, _Step(r.method), 0, 0, tmp_path, torch.device("cpu"))
    with pytest.raises(
        NonFiniteError, match="after epoch 3: the method's logits are NaN/inf on test batch 0"
    ):
        evaluate(r.method, r.eval_set, batch_size=4, where="evaluation after epoch 3")
    out = tmp_path / "run"
    assert main(_args(setup, out)) == 0
    state = load_file(str(out / "prompts.safetensors"))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in state.items()},
        str(out / "prompts.safetensors"),
    )
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "hold NaN/inf" in err and len(err.strip().splitlines()) == 1


def test_base_new_on_a_run_trained_on_all_classes_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(_args(setup, out, extra=["--subsample", "all"])) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--base-new", "--device", "cpu"]) == 2
    assert "trained on all classes" in capsys.readouterr().err
    assert main(["eval", str(out), "--subsample", "base", "--device", "cpu"]) == 0


def test_resume_refuses_option_changes_and_names_them(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, extra=["optim.epochs=1"])) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--seed", "5", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot change ['optim.lr', 'run.seed']" in err
    assert main(["train", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]) == 0


def test_a_failed_start_leaves_nothing_that_blocks_a_retry(setup, tmp_path):
    out = tmp_path / "run"

    def fail(record):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train(_cfg(setup, out), out, callbacks=[fail])
    assert not out.exists()
    out.mkdir()
    (out / "config.yaml").write_text("a run killed before its first checkpoint")
    (out / "metrics.jsonl").write_text('{"epoch": 0, "step": 1}\n')
    res = train(_cfg(setup, out), out)
    assert res.steps == 3 and len((out / "metrics.jsonl").read_text().splitlines()) == 4


# ---------------------------------------------------------------------------- through the trainer
def test_trainer_hooks_build_the_cache_search_on_val_and_aggregate_prompts(tmp_path):
    """fit_before_training / select_on_validation / on_epoch_end are called by the one trainer:
    the saved Tip-Adapter cache has shots x classes keys and its alpha/beta are the val choice;
    PromptSRC's saved prompts are the Gaussian aggregate."""
    make_json_dataset(tmp_path / "data", "oxford_pets")
    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    common = [
        "data.dataset=oxford_pets",
        f"data.root={tmp_path / 'data'}",
        "data.shots=2",
        "data.workers=0",
        "run.device=cpu",
        "run.progress=false",
        "optim.batch_size=4",
        "backbone.arch=pa-tiny-vit",
    ]
    cfg = apply_overrides(
        RunConfig(),
        [
            *common,
            "method.name=tip_adapter_f",
            "optim.epochs=1",
            "method.options.augment_views=2",
            "method.options.search_step=[4, 3]",
        ],
    )
    res = train(cfg, tmp_path / "tip", backbone=bb)
    state = load_file(str(tmp_path / "tip" / "prompts.safetensors"))
    n_classes = len(json.loads((tmp_path / "tip" / "run.json").read_text())["classnames"])
    assert state["keys"].shape == (2 * n_classes, bb.embed_dim)
    assert float(state["alpha"]) == res.metrics["val_selected_alpha"]
    assert float(state["beta"]) == res.metrics["val_selected_beta"]

    cfg = apply_overrides(
        RunConfig(),
        [
            *common,
            "method.name=promptsrc",
            "optim.epochs=2",
            "method.options.text_depth=2",
            "method.options.vision_depth=2",
            "method.options.gpa_mean=1.0",
            "method.options.gpa_std=1.0",
            'method.options.teacher_templates=["a photo of a {}."]',
        ],
    )
    train(cfg, tmp_path / "src", backbone=bb)
    state = load_file(str(tmp_path / "src" / "prompts.safetensors"))
    for name in ("ctx", "deep_ctx", "visual", "deep_visual"):
        torch.testing.assert_close(state[name], state[f"gpa_{name}"])
