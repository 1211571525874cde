"""PromptSRC: Gaussian prompt aggregation and the consistency terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptalign.methods import create_method
from promptalign.methods.base import cosine_logits

from conftest import CLASSES, images_for


def test_promptsrc_aggregation_weights_sum_to_one_and_are_gaussian():
    from promptalign.methods.promptsrc import gpa_weights

    w = gpa_weights(20, 15.0, 1.0)
    assert w.shape == (20,) and abs(float(w.sum()) - 1.0) < 1e-12
    e = torch.arange(1, 21, dtype=torch.float64)
    gauss = torch.exp(-0.5 * (e - 15.0) ** 2)
    torch.testing.assert_close(w, gauss / gauss.sum(), rtol=1e-12, atol=0)
    assert int(w.argmax()) == 14  # epoch 15 (1-based) weighs most


def test_promptsrc_final_prompts_are_the_gaussian_weighted_average(tiny):
    from promptalign.methods.promptsrc import gpa_weights

    m = create_method(
        "promptsrc", tiny, CLASSES, text_depth=2, vision_depth=2, gpa_mean=2.0, gpa_std=0.7
    )
    history = []
    for epoch in range(3):
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in m.trainable_parameters()])
        m.on_epoch_end(epoch, 3)
    w = gpa_weights(3, 2.0, 0.7)
    for i, p in enumerate(m.trainable_parameters()):
        expected = sum(float(w[e]) * history[e][i] for e in range(3))
        torch.testing.assert_close(p.detach(), expected)


def test_promptsrc_consistency_terms_vanish_at_the_frozen_clip(tiny):
    """With the prompted features equal to the frozen ones, all three terms are zero."""
    m = create_method("promptsrc", tiny, CLASSES, text_depth=2, vision_depth=2)
    x = images_for(tiny, 3, seed=1)
    teacher = m.teacher_text()
    with torch.no_grad():
        img = F.normalize(tiny.encode_image(x), dim=-1)
    from promptalign.methods.base import Batch, MethodOutput

    out = MethodOutput(cosine_logits(img, teacher, tiny.logit_scale), img, teacher)
    terms = m.loss_terms(out, Batch(x, torch.tensor([0, 1, 2])))
    assert set(terms) == {"ce", "scl_text", "scl_image", "scl_logits"}  # CE from the base hook
    assert all(abs(float(terms[k])) < 1e-6 for k in ("scl_text", "scl_image", "scl_logits"))
    # and the text target is the normalised mean over the 60 templates
    assert len(m.config.teacher_templates) == 60
    with torch.no_grad():
        one = tiny.encode_text(tiny.tokenize([t.format("dog") for t in m.config.teacher_templates]))
    torch.testing.assert_close(teacher[0], F.normalize(one.mean(0), dim=-1), rtol=1e-5, atol=1e-6)
