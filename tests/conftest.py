"""Shared fixtures and helpers: tiny random-init CLIP backbones built from open_clip-style
configs, and the registry-driven method helpers the method and engine tests share."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import promptalign
from promptalign.methods import create_method, list_methods
from promptalign.registry import METHODS

ALL_METHODS = list_methods()
CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]
# depths that fit the 3-layer tiny model without clamping (faster than the published depths)
SMALL = {"depth": 2, "text_depth": 2, "vision_depth": 2}

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
def _same_torch_threads():
    """Every test runs with the process's torch thread count (a script's ``main`` run in-process,
    e.g. ``benchmarks/align_modes.py --threads 1``, sets it): results of later tests that depend
    on the order of float reductions (bit identity) must not depend on test order."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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


def small_config(name: str) -> dict:
    """Overrides that fit the 3-layer tiny model, chosen by config field (never by method name)."""
    fields = {f.name: f for f in dataclasses.fields(METHODS.get(name).config_class)}
    cfg = {k: v for k, v in SMALL.items() if k in fields}
    if "base_options" in fields:
        base = METHODS.get(fields["base"].default)
        base_fields = {f.name for f in dataclasses.fields(base.config_class)}
        cfg["base_options"] = {k: v for k, v in SMALL.items() if k in base_fields}
    return cfg


def build_method(name: str, backbone, seed: int = 0, classes=CLASSES, **extra):
    """``name`` on ``backbone`` with :func:`small_config`, initialised from ``seed``."""
    torch.manual_seed(seed)
    return create_method(name, backbone, classes, **{**small_config(name), **extra})


def labelled_batch(backbone, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return images_for(backbone, n, seed), torch.arange(n) % len(CLASSES)
