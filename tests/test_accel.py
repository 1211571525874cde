"""Hardware defaults and the compiled training step (promptalign.accel)."""

from __future__ import annotations

import pytest
import torch

from promptalign.accel import compile_step, resolve_amp

from conftest import build_method as build
from conftest import images_for


def test_resolve_amp_auto_follows_the_device():
    assert resolve_amp("auto", "cpu", training=True) == "none"
    assert resolve_amp("auto", "cpu", training=False) == "none"
    assert resolve_amp("bf16", "cpu", training=True) == "bf16"  # explicit choices are kept
    assert resolve_amp("auto", "cuda", training=False) == "fp16"
    with pytest.raises(ValueError, match="amp 'fp8' unknown"):
        resolve_amp("fp8", "cpu", training=True)


def test_compile_step_off_and_auto_on_cpu_return_the_step_itself():
    step = torch.nn.Linear(2, 2)
    assert compile_step(step, "off") is step
    assert compile_step(step, "auto", device="cpu") is step
    with pytest.raises(ValueError, match="compile mode 'always' unknown"):
        compile_step(step, "always")


class _Step(torch.nn.Module):
    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, labels):
        return self.method.training_step((images, labels))["loss"]


def _loss_and_grads(step, method, images, labels):
    method.zero_grad(set_to_none=True)
    loss = step(images, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.trainable_parameters()]


@pytest.mark.slow  # dynamo tracing: ~15 s of CPU per method
@pytest.mark.parametrize("name", ["coop", "align"])
def test_compiled_step_gives_the_eager_loss_and_gradients(tiny, name):
    """Traced (aot_eager: same graph capture as inductor, no code generation) = eager; ALIGN's
    OT runs eagerly inside the compiled step (graph break)."""
    torch._dynamo.reset()
    method = build(name, tiny).train()
    images, labels = images_for(tiny, 2), torch.tensor([0, 3])
    eager = _Step(method)
    compiled = compile_step(eager, "on", backend="aot_eager")
    ref_loss, ref_grads = _loss_and_grads(eager, method, images, labels)
    loss, grads = _loss_and_grads(compiled, method, images, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager_on_cpu(tiny):
    """The real compiler (C++ code generation on CPU): tens of seconds, hence slow."""
    torch._dynamo.reset()
    method = build("coop", tiny).train()
    images, labels = images_for(tiny, 2), torch.tensor([0, 3])
    eager = _Step(method)
    ref_loss, ref_grads = _loss_and_grads(eager, method, images, labels)
    loss, grads = _loss_and_grads(compile_step(eager, "on"), method, images, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
