"""Shared fixtures: tiny random-init CLIP backbones built from open_clip-style configs."""

from __future__ import annotations

import copy

import pytest
import torch

import promptalign

# A second tiny config that differs from the shipped one in every width, uses QuickGELU and the
# CustomTextCLIP layout (text tower under `.text`), so nothing can hide behind a constant.
TINY_CUSTOM_TEXT = {
    "embed_dim": 24,
    "quick_gelu": True,
    "custom_text": True,
    "vision_cfg": {"image_size": 48, "layers": 4, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 36, "heads": 3, "layers": 4},
}


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Every test starts from the same global RNG state, so no result depends on test order."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Few-shot caches go to a fresh folder per test, never the user's ~/.cache."""
    monkeypatch.setenv("PROMPTALIGN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture(scope="session")
def tiny() -> promptalign.Backbone:
    torch.manual_seed(0)
    return promptalign.load_backbone("pa-tiny-vit")


@pytest.fixture(scope="session")
def tiny_custom() -> promptalign.Backbone:
    torch.manual_seed(1)
    return promptalign.load_backbone(copy.deepcopy(TINY_CUSTOM_TEXT))


@pytest.fixture(params=["tiny", "tiny_custom"])
def backbone(request) -> promptalign.Backbone:
    return request.getfixturevalue(request.param)


def images_for(bb: promptalign.Backbone, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *bb.preprocess.image_size, generator=g)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """max |a - b| <= tol * max |b| (fp32 agreement up to reduction order)."""
    scale = b.abs().max().clamp_min(1e-12)
    err = (a - b).abs().max()
    assert err <= tol * scale, f"max abs diff {err.item():.3g} > {tol} * {scale.item():.3g}"
