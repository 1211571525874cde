"""The thin command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import promptalign
from promptalign.cli import main


def test_help_runs_as_console_command():
    out = subprocess.run(
        [sys.executable, "-m", "promptalign.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "selfcheck" in out.stdout


def test_selfcheck_json(capsys):
    assert main(["selfcheck", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] is True and res["logits_shape"] == [4, 4]
    assert res["max_abs_diff"]["reloaded_image"] == 0.0


def test_list_backbones(capsys):
    assert main(["list", "backbones"]) == 0
    assert "pa-tiny-vit" in capsys.readouterr().out.split()


def test_list_methods(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out.split()
    assert out == promptalign.list_methods()  # every registered method, nothing else


def test_list_datasets(capsys):
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out.split()
    assert len([d for d in out if not d.startswith("synthetic_")]) == 15
    assert "imagenet_r" in out and "fgvc_aircraft" in out and "synthetic_colour_shapes" in out


def test_shipped_model_name_means_its_own_weights():
    """`--arch tiny-shapes` without --weights must not inherit the 'openai' default of ViT
    configs."""
    from promptalign.cli import build_parser
    from promptalign.cli.runs import train_config as _train_config

    parse = build_parser().parse_args
    cfg = _train_config(parse(["train", "--out", "x", "--method", "coop", "--arch", "tiny-shapes"]))
    assert cfg.backbone.arch == "tiny-shapes" and cfg.backbone.weights is None
    cfg = _train_config(
        parse(
            [
                "train",
                "--out",
                "x",
                "--method",
                "coop",
                "--arch",
                "tiny-shapes",
                "--weights",
                "my.safetensors",
            ]
        )
    )
    assert cfg.backbone.weights == "my.safetensors"
    cfg = _train_config(parse(["train", "--out", "x", "--method", "coop", "--arch", "ViT-B-16"]))
    assert cfg.backbone.weights == "openai"


def test_shipped_model_with_a_foreign_tag_says_how_to_fix():
    with pytest.raises(FileNotFoundError, match="ships its own weights"):
        promptalign.load_backbone("tiny-shapes", weights="openai")
