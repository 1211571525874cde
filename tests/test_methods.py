"""Registry-driven tests: every registered method on a tiny random CLIP, plus method specifics."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import promptalign
from promptalign.config import ConfigError
from promptalign.methods import create_method

from conftest import ALL_METHODS as ALL
from conftest import CLASSES, build_method, images_for, labelled_batch

NEW_CLASSES = ["airplane", "golden retriever", "boat"]
build = build_method
batch = labelled_batch


def test_every_method_file_registers_one_method():
    """The registry holds exactly the methods whose files register one (no list to keep)."""
    src = Path(promptalign.__file__).parent / "methods"
    registered = set()
    for path in src.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "register"
                and getattr(node.func.value, "id", "") == "METHODS"
            ):
                registered.add(node.args[0].value)
    assert registered and set(ALL) == registered


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
    with (
        torch.no_grad()
    ):  # zero-initialised tensors (LoRA's B) would leave their partners' gradient 0
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
        assert all(p.grad.abs().sum() > 0 for p in trainable), (
            f"{name}: a trainable tensor got zero gradient"
        )
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
        tree = ast.parse(path.read_text())
        # a config field's default naming another method is a reference resolved by the
        # registry (NPT's base), not a branch on the name
        references = {
            id(n.value)
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef)
            for n in c.body
            if isinstance(n, ast.AnnAssign) and n.value is not None
        }
        for node in ast.walk(tree):
            if id(node) in references:
                continue
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in names
            ):
                if owner[node.value] != path:
                    offenders.append(f"{path.relative_to(src)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_unknown_method_and_config_field_errors(tiny):
    with pytest.raises(KeyError, match="unknown method 'nope'.*align"):
        create_method("nope", tiny, CLASSES)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_ctxx'\]; allowed: .*'n_ctx'"):
        create_method("coop", tiny, CLASSES, n_ctxx=3)
    with pytest.raises(ConfigError, match="class_token_position: 'mid' is not allowed"):
        create_method("coop", tiny, CLASSES, class_token_position="mid")
    with pytest.raises(ConfigError, match=r"unknown regularizer\(s\) \['n'\]"):
        create_method("coop", tiny, CLASSES, regularizers=["n"])
    with pytest.raises(ValueError, match="duplicate class names"):
        create_method("coop", tiny, ["a", "a"])


@pytest.fixture(scope="module")
def shipped():
    return promptalign.load_backbone("tiny-shapes")


@pytest.mark.parametrize("name", ALL)
def test_every_method_trains_with_its_published_defaults_on_the_shipped_model(
    name, shipped, caplog
):
    """Published depths (9, 12) are clamped to the shipped model's shallow towers with a note."""
    torch.manual_seed(0)
    m = create_method(name, shipped, CLASSES).train()
    images = images_for(shipped, 2)
    out = m.training_step((images, torch.tensor([0, 1])))
    assert torch.isfinite(out["loss"])
    if m.trainable_parameters():
        out["loss"].backward()
        assert all(p.grad is not None for p in m.trainable_parameters() if p.numel())
    layers = min(shipped.text_layers, shipped.vision_layers)
    deep = [f for f in ("depth", "text_depth", "vision_depth") if getattr(m.config, f, 0) > layers]
    if deep:
        assert "is deeper than the tower's" in caplog.text


def test_depth_is_clamped_to_the_tower_and_below_one_is_an_error(tiny):
    torch.manual_seed(0)
    vpt = create_method("vpt", tiny, CLASSES)  # published depth 12 on 3 layers
    assert vpt.config.depth == 12 and vpt.deep_prompts.shape[0] == tiny.vision_layers - 1
    with pytest.raises(ValueError, match="depth 0 must be at least 1"):
        create_method("vpt", tiny, CLASSES, depth=0)
