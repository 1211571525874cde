"""The shipped tiny CLIP, its pretraining script, and the demo."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import promptalign
from promptalign.data import ImageDataset, build_transform, load_dataset
from promptalign.demo import run_demo
from promptalign.engine import evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.parametrize(
    "name,config,text_width,limit",
    [
        ("tiny-shapes", "pa-tiny-shapes", 48, 10e6),
        ("tiny-shapes-v2", "pa-tiny-shapes-v2", 96, 20e6),
        ("tiny-shapes-v3", "pa-tiny-shapes-v3", 96, 20e6),
    ],
)
def test_shipped_model_loads_through_the_weights_path_and_is_small(name, config, text_width, limit):
    bb = promptalign.load_backbone(name)
    assert bb.weights.endswith(f"{name}.safetensors") and Path(bb.weights).stat().st_size <= limit
    assert bb.preprocess.image_size == (48, 48) and bb.text_width == text_width
    again = promptalign.load_backbone(config, weights=bb.weights)
    tok = bb.tokenize(["a red circle"])
    assert torch.equal(bb.encode_text(tok), again.encode_text(tok))


def test_v2_shares_the_first_models_locked_image_tower():
    """tiny-shapes-v2 was trained with --init-image <tiny-shapes> --lock-image: same image tower."""
    one, two = promptalign.load_backbone("tiny-shapes"), promptalign.load_backbone("tiny-shapes-v2")
    x = torch.rand(2, 3, 48, 48)
    assert torch.equal(one.encode_image(x), two.encode_image(x))


def test_v3_has_the_finer_patch_grid():
    """tiny-shapes-v3: 6 px patches, an 8 x 8 grid (v2: 8 px, 6 x 6)."""
    v2, v3 = (
        promptalign.load_backbone("tiny-shapes-v2"),
        promptalign.load_backbone("tiny-shapes-v3"),
    )
    assert v2.clip.visual.positional_embedding.shape[0] == 1 + 36
    assert v3.clip.visual.positional_embedding.shape[0] == 1 + 64


@pytest.mark.parametrize(
    "name,times_chance", [("tiny-shapes", 3), ("tiny-shapes-v2", 5), ("tiny-shapes-v3", 5)]
)
def test_zero_shot_is_far_above_chance(shapes_root, name, times_chance):
    bb = promptalign.load_backbone(name)
    ds = load_dataset("synthetic_colour_shapes", shapes_root)
    m = promptalign.create_method("zeroshot", bb, ds.classnames, template=ds.template)
    data = ImageDataset(
        ds.name, ds.image_root, ds.test, build_transform(bb.preprocess, train=False)
    )
    acc = evaluate(m, data, batch_size=256)["accuracy"]
    assert acc >= times_chance * 100 / ds.num_classes, acc


def test_pretraining_script_is_reproducible(tmp_path):
    digests = []
    for i in range(2):
        out = tmp_path / f"w{i}.safetensors"
        res = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "pretrain_tiny_clip.py"),
                "--out",
                str(out),
                "--pool",
                "256",
                "--steps",
                "3",
                "--batch",
                "32",
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_demo_outputs_and_same_numbers_for_the_same_seed(tmp_path, shapes_root):
    small = {
        "methods": [{"name": "zeroshot"}, {"name": "coop", "options": {"n_ctx": 4}}],
        "epochs": 1,
    }
    a = run_demo(tmp_path / "a", spec=small, progress=False, data_root=shapes_root)
    b = run_demo(tmp_path / "b", spec=small, progress=False, data_root=shapes_root)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)
    for f in ("results.md", "results.json", "results.png"):
        assert (tmp_path / "a" / f).is_file()
    assert (tmp_path / "a" / "coop-seed1" / "config.yaml").is_file()
    assert (
        json.loads((tmp_path / "a" / "results.json").read_text())["rows"][0]["method"] == "zeroshot"
    )
    assert "| coop |" in (tmp_path / "a" / "results.md").read_text()


def test_demo_numbers_do_not_depend_on_the_progress_bar_or_workers(tmp_path, shapes_root):
    """Issue 12 item 2: the bar's extra iter(loader) and the worker count changed the results."""
    small = {"methods": [{"name": "coop", "options": {"n_ctx": 4}}], "epochs": 1}
    a = run_demo(tmp_path / "a", spec=small, progress=True, workers=0, data_root=shapes_root)
    b = run_demo(tmp_path / "b", spec=small, progress=False, workers=2, data_root=shapes_root)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)


def test_the_shipped_demo_spec_builds_every_method_on_its_model():
    """demo.yaml names the newest shipped model and methods that build on it as configured."""
    from promptalign.demo import demo_spec
    from promptalign.methods.base import create_method

    spec = demo_spec()
    assert spec["backbone"] == "tiny-shapes-v3"
    backbone = promptalign.load_backbone(spec["backbone"])
    names = ["red circle", "blue star"]
    built = {
        e["name"]: create_method(e["name"], backbone, names, **e.get("options", {}))
        for e in spec["methods"]
    }
    assert list(built) == ["zeroshot", "coop", "maple", "align"]
    assert built["align"].config.n_sets == 4  # ALIGN's default: the demo rows are table rows
    x = torch.zeros(2, 3, 48, 48)
    for method in built.values():
        method.eval()
        with torch.no_grad():
            assert method.logits(x).shape == (2, 2)
