"""An offline self-check of an installation: builds the tiny shipped architecture with random
weights, saves and re-loads it by file, and runs the zero-shot pipeline (prompted text tower for
class prompts, image tower, cosine logits). It verifies invariants, not accuracy: the weights are
random, so the predicted classes carry no meaning."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbone import load_backbone


@dataclass
class SelfCheckResult:
    arch: str
    torch_version: str
    checks: dict[str, bool]
    max_abs_diff: dict[str, float]
    logits_shape: tuple[int, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def run_selfcheck(arch: str = "pa-tiny-vit", seed: int = 0, tol: float = 1e-6) -> SelfCheckResult:
    """Run the checks on ``arch`` and return what was measured."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    torch.manual_seed(seed)
    bb = load_backbone(arch)
    classes = ["circle", "square", "triangle", "star"]
    tokens = bb.tokenize([f"a photo of a {c}." for c in classes])
    images = torch.randn(len(classes), 3, *bb.preprocess.image_size)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        diffs["encode_text_vs_open_clip"] = (
            (bb.encode_text(tokens) - bb.clip.encode_text(tokens)).abs().max().item()
        )
        diffs["encode_image_vs_open_clip"] = (
            (bb.encode_image(images) - bb.clip.encode_image(images)).abs().max().item()
        )
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items()}, str(path))
            bb2 = load_backbone(arch, weights=str(path))
        diffs["reloaded_image"] = (
            (bb2.encode_image(images) - bb.encode_image(images)).abs().max().item()
        )
        text = F.normalize(bb.encode_text(tokens), dim=-1)
        img = F.normalize(bb.encode_image(images), dim=-1)
        logits = bb.logit_scale * img @ text.t()  # [B, K]
    scale = max(bb.clip.encode_text(tokens).abs().max().item(), 1.0)
    checks = {
        "text tower matches open_clip": diffs["encode_text_vs_open_clip"] <= tol * scale,
        "image tower matches open_clip": diffs["encode_image_vs_open_clip"] <= tol * scale,
        "weights reload from file": diffs["reloaded_image"] == 0.0,
        "zero-shot logits finite": bool(torch.isfinite(logits).all()),
    }
    return SelfCheckResult(
        arch=bb.arch,
        torch_version=torch.__version__,
        checks=checks,
        max_abs_diff=diffs,
        logits_shape=tuple(logits.shape),
        seconds=time.perf_counter() - start,
    )
