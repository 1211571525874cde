"""The run folder records its few-shot sample; eval warns and --resume refuses when the dataset on
disk no longer gives it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import promptalign
from promptalign.cli import main
from promptalign.config import RunConfig, apply_overrides
from promptalign.engine import CheckpointError, evaluate_run, train
from promptalign.engine.build import load_data
from promptalign.engine.checkpoint import SAMPLE, sample_hash

from data_fixtures import JSON_DATASETS, make_json_dataset


@pytest.fixture()
def run(tmp_path):
    """A finished one-epoch CoOp run on a 2-shot, base-class sample of oxford_pets."""
    make_json_dataset(tmp_path / "data", "oxford_pets")
    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    weights = tmp_path / "tiny.safetensors"  # the CLI loads the backbone from the run's config
    save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items()}, str(weights))
    cfg = apply_overrides(
        RunConfig(),
        [
            "method.name=coop",
            "method.options.n_ctx=2",
            "data.dataset=oxford_pets",
            f"data.root={tmp_path / 'data'}",
            "data.shots=2",
            "data.subsample=base",
            "data.workers=0",
            "run.device=cpu",
            "run.progress=false",
            "backbone.arch=pa-tiny-vit",
            f"backbone.weights={weights}",
            "optim.epochs=1",
            "optim.batch_size=4",
        ],
    )
    train(cfg, tmp_path / "run", backbone=bb)
    return tmp_path, bb, cfg


def _split_file(tmp_path):
    folder, _, split_file, _ = JSON_DATASETS["oxford_pets"]
    return tmp_path / "data" / folder / split_file


def _reorder_training_listing(tmp_path):
    """The same images, listed in another order: CoOp's sampling then draws other ones."""
    path = _split_file(tmp_path)
    splits = json.loads(path.read_text())
    splits["train"].reverse()
    path.write_text(json.dumps(splits))


def test_the_run_folder_holds_the_sampled_lists_and_their_hash(run):
    tmp_path, _, cfg = run
    record = json.loads((tmp_path / "run" / SAMPLE).read_text())
    data = load_data(cfg, 1)
    assert record["train"] == [[r.path, r.label, r.classname] for r in data.train]
    assert record["val"] == [[r.path, r.label, r.classname] for r in data.val]
    assert len(record["train"]) == 2 * 3 and len(record["val"]) == 2 * 3  # 2 shots, 3 classes
    assert record["sha256"] == sample_hash(data)
    assert (record["shots"], record["seed"], record["subsample"]) == (2, 1, "base")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["sample_sha256"] == record["sha256"]


def test_eval_checks_the_sample_and_warns_when_it_changed(run, caplog):
    tmp_path, bb, _ = run
    out = tmp_path / "run"
    for subsample in ("base", "new", "all"):
        m = evaluate_run(out, subsample=subsample, device="cpu", backbone=bb)
        assert m["sample_check"] == "same"
    _reorder_training_listing(tmp_path)
    with caplog.at_level(logging.WARNING, logger="promptalign.engine.inference"):
        m = evaluate_run(out, subsample="new", device="cpu", backbone=bb)
    assert m["sample_check"] == "changed" and 0 <= m["accuracy"] <= 100
    assert "no longer gives this run's sample" in caplog.text
    assert "train entries differ" in caplog.text and str(out / SAMPLE) in caplog.text
    # another dataset is not the run's sample: nothing to check
    make_json_dataset(tmp_path / "data", "dtd")
    other = evaluate_run(out, dataset="dtd", device="cpu", backbone=bb)
    assert other["sample_check"] == "not checked"


def test_cli_eval_says_so_in_one_line(run, capsys, caplog):
    tmp_path, _, _ = run
    _reorder_training_listing(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sample_check"] == "changed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "no longer gives this run's sample" in warnings[0]


def test_resume_refuses_a_changed_sample_and_continues_on_the_same_one(run, capsys):
    tmp_path, bb, _ = run
    out = tmp_path / "run"
    res = train(None, out, resume=True, backbone=bb)  # same data: the finished run is kept
    assert res.epochs == 1
    _reorder_training_listing(tmp_path)
    with pytest.raises(CheckpointError, match="--resume continues a run only on its own sample"):
        train(None, out, resume=True, backbone=bb)
    code = main(["train", "--resume", "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no longer gives this run's sample" in err[0]


def test_a_run_folder_without_a_record_is_not_checked(run, caplog):
    tmp_path, bb, _ = run
    (tmp_path / "run" / SAMPLE).unlink()
    m = evaluate_run(tmp_path / "run", device="cpu", backbone=bb)
    assert m["sample_check"] == "unrecorded"
    with caplog.at_level(logging.WARNING, logger="promptalign.engine.checkpoint"):
        train(None, tmp_path / "run", resume=True, backbone=bb)
    assert "cannot check" in caplog.text
