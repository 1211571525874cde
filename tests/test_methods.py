"""Registry-driven tests: every registered method on a tiny random CLIP, plus method specifics."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import promptalign
from promptalign.methods import create_method, list_methods
from promptalign.registry import METHODS

from conftest import images_for

CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]
NEW_CLASSES = ["airplane", "golden retriever", "boat"]
SMALL = {"depth": 2, "text_depth": 2, "vision_depth": 2}


def small_config(name: str) -> dict:
    """Overrides that fit the 3-layer tiny model, chosen by config field (never by method name)."""
    fields = {f.name: f for f in dataclasses.fields(METHODS.get(name).config_class)}
    cfg = {k: v for k, v in SMALL.items() if k in fields}
    if "base_options" in fields:
        base = METHODS.get(fields["base"].default)
        base_fields = {f.name for f in dataclasses.fields(base.config_class)}
        cfg["base_options"] = {k: v for k, v in SMALL.items() if k in base_fields}
    return cfg


def build(name, backbone, seed=0, classes=CLASSES, **extra):
    torch.manual_seed(seed)
    return create_method(name, backbone, classes, **{**small_config(name), **extra})


def batch(backbone, n=4, seed=0):
    return images_for(backbone, n, seed), torch.arange(n) % len(CLASSES)


ALL = list_methods()


def test_all_ten_methods_are_registered():
    assert set(ALL) == {"zeroshot", "coop", "cocoop", "vpt", "ivlp", "maple", "plot", "upt", "align", "npt",
                        "tip_adapter_f", "clip_lora", "promptsrc", "proda"}


@pytest.mark.parametrize("name", ALL)
def test_logits_shape_and_finite(name, tiny):
    m = build(name, tiny).eval()
    x, _ = batch(tiny)
    with torch.no_grad():
        logits = m.logits(x)
    assert logits.shape == (4, len(CLASSES))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_exactly_the_trainable_parameters(name, tiny):
    m = build(name, tiny).train()
    trainable = m.trainable_parameters()
    with torch.no_grad():  # zero-initialised tensors (LoRA's B) would leave their partners' gradient 0
        for p in trainable:
            if not p.any():
                p.add_(torch.randn_like(p) * 0.01)
    own = [p for n, p in m.named_parameters() if "backbone" not in n.split(".")]
    assert {id(p) for p in trainable} == {id(p) for p in own if p.requires_grad}
    out = m.training_step(batch(tiny))
    assert torch.isfinite(out["loss"])
    if trainable:
        out["loss"].backward()
        got = {id(p) for p in m.parameters() if p.grad is not None}
        assert got == {id(p) for p in trainable}, f"{name}: gradients on the wrong parameters"
        assert all(p.grad.abs().sum() > 0 for p in trainable), f"{name}: a trainable tensor got zero gradient"
    else:
        assert not out["loss"].requires_grad
    assert all(p.grad is None for p in tiny.parameters())
    assert not any(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_is_bit_identical(name, tiny):
    a = build(name, tiny, seed=0)
    # perturb so the state is not just the initialisation
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = a.prompt_state_dict()
    assert not any("backbone" in k.split(".") for k in state)
    b = build(name, tiny, seed=123)
    b.load_prompt_state_dict(state)
    x, _ = batch(tiny)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a.logits(x), b.logits(x))


@pytest.mark.parametrize("name", ALL)
def test_class_names_can_change_after_training(name, tiny):
    m = build(name, tiny).train()
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.01) if m.trainable_parameters() else None
    out = m.training_step(batch(tiny))
    if opt:
        out["loss"].backward()
        opt.step()
    m.eval()
    x, _ = batch(tiny)
    with torch.no_grad():
        base = m.logits(x)
        if getattr(m.config, "csc", False):
            return
        m.set_classnames(NEW_CLASSES)
        new = m.logits(x)
        m.set_classnames(CLASSES)
        again = m.logits(x)
    assert new.shape == (4, len(NEW_CLASSES)) and torch.isfinite(new).all()
    torch.testing.assert_close(again, base)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_fixed_seed(name, tiny):
    results = []
    for _ in range(2):
        m = build(name, tiny, seed=7).train()
        torch.manual_seed(11)
        out = m.training_step(batch(tiny))
        m.eval()
        with torch.no_grad():
            results.append((out["loss"].detach(), m.logits(batch(tiny)[0])))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("name", ALL)
def test_eval_caches_class_features_and_training_does_not_reuse_stale_ones(name, tiny):
    m = build(name, tiny).eval()
    calls = []
    original = m.encode_classes

    def counting():
        calls.append(1)
        return original()

    m.encode_classes = counting
    x, _ = batch(tiny)
    with torch.no_grad():
        m.logits(x)
        m.logits(x)
    assert len(calls) <= 1
    m.train()
    m.training_step(batch(tiny))
    m.training_step(batch(tiny))
    if m.class_side_trainable:
        assert len(calls) == 3


def test_each_method_has_a_published_optim_preset(tiny):
    for name in ALL:
        preset = build(name, tiny).optim_preset
        assert preset.optimizer in ("sgd", "adamw") and preset.lr > 0 and preset.batch_size >= 1


def test_method_names_appear_only_in_their_own_file_and_the_registry():
    """No name branching: a registered name as a string literal anywhere else is a failure."""
    src = Path(promptalign.__file__).parent
    names = set(ALL)
    owner = {}
    for path in src.rglob("*.py"):
        text = path.read_text()
        for name in names:
            if f'register("{name}")' in text:
                owner[name] = path
    assert set(owner) == names
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                if owner[node.value] != path:
                    offenders.append(f"{path.relative_to(src)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_unknown_method_and_config_field_errors(tiny):
    with pytest.raises(KeyError, match="unknown method 'nope'.*align"):
        create_method("nope", tiny, CLASSES)
    with pytest.raises(ValueError, match="no field.*n_ctxx.*allowed"):
        create_method("coop", tiny, CLASSES, n_ctxx=3)
    with pytest.raises(ValueError, match="duplicate class names"):
        create_method("coop", tiny, ["a", "a"])
