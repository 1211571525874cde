"""scripts/pretrain_tiny_clip.py's flags: architecture, rich captions and a locked image tower."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from promptalign import load_backbone
from promptalign.backbone.loading import read_state_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "promptalign" / "backbone" / "weights" / "tiny-shapes.safetensors"


def test_flags_change_the_model_reproducibly_and_keep_a_locked_image_tower(tmp_path):
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
                "64",
                "--steps",
                "2",
                "--batch",
                "16",
                "--captions",
                "rich",
                "--text-layers",
                "2",
                "--text-width",
                "32",
                "--text-heads",
                "2",
                "--init-image",
                str(SHIPPED),
                "--lock-image",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    cfg = json.loads((tmp_path / "w0.json").read_text())
    assert (
        cfg["text_cfg"]["layers"] == 2
        and cfg["text_cfg"]["width"] == 32
        and cfg["vision_cfg"]["width"] == 96
    )
    bb = load_backbone(str(tmp_path / "w0.json"), str(tmp_path / "w0.safetensors"))
    assert len(bb.clip.transformer.resblocks) == 2
    new, shipped = read_state_dict(tmp_path / "w0.safetensors"), read_state_dict(SHIPPED)
    visual = [k for k in new if k.startswith("visual.")]
    assert visual and all(torch.equal(new[k], shipped[k]) for k in visual)  # locked: unchanged
    assert not torch.equal(
        new["text_projection"], shipped["text_projection"][:32]
    )  # text trained anew


def test_lock_image_without_init_is_refused(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pretrain_tiny_clip.py"),
            "--out",
            str(tmp_path / "w.safetensors"),
            "--lock-image",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "--init-image" in res.stderr


def test_vision_patch_flag_sets_the_patch_grid_and_refuses_a_non_divisor(tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "pretrain_tiny_clip.py")]
    out = tmp_path / "p6.safetensors"
    res = subprocess.run(
        [*script, "--out", str(out), "--pool", "32", "--steps", "1", "--batch", "8"]
        + ["--vision-patch", "6"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(out.with_suffix(".json").read_text())["vision_cfg"]["patch_size"] == 6
    bb = load_backbone(str(out.with_suffix(".json")), str(out))
    assert bb.clip.visual.positional_embedding.shape[0] == 1 + (48 // 6) ** 2  # CLS + 64 patches
    res = subprocess.run(
        [*script, "--out", str(tmp_path / "p5.safetensors"), "--vision-patch", "5"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "--vision-patch 5 does not divide the 48 px image" in res.stderr
