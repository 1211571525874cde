"""Fidelity to the released code (issue 14): PLOT++ stages, trade-off term, template init."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptalign.methods import create_method

from conftest import images_for

CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]


def _converged_plan(sim: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain kernel-domain Sinkhorn on ``[..., M, N]`` similarities, uniform marginals, run to
    convergence in float64 (independent of promptalign.ot)."""
    K = torch.exp(-(1.0 - sim.double()) / eps)
    M, N = sim.shape[-2:]
    a = torch.full(sim.shape[:-1], 1.0 / M, dtype=torch.float64)
    b = torch.full(sim.shape[:-2] + (N,), 1.0 / N, dtype=torch.float64)
    c = torch.ones_like(b)
    for _ in range(2000):
        r = a / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = b / (K.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


def _reference_logits(m, x: torch.Tensor, trade_off: bool) -> torch.Tensor:
    """PLOT++ logits from the backbone's raw features, written out as the released forward."""
    bb = m.backbone
    with torch.no_grad():
        img = bb.forward_image(x, m.visual, deep=list(m.deep_visual.unbind(0))).pooled  # [B, M, D]
        txt = bb.forward_text(m.tokens.unsqueeze(0), m.ctx.unsqueeze(1)).pooled  # [N, K, D]
    sim = torch.einsum("bmd,nkd->bkmn", F.normalize(img, dim=-1), F.normalize(txt, dim=-1))
    plan = _converged_plan(sim, eps=m.config.eps).float()
    scale = bb.logit_scale
    logits = scale * (plan * sim).sum((-2, -1))
    if trade_off:
        logits = logits + scale * F.normalize(img.mean(1), dim=-1) @ F.normalize(txt.mean(0), dim=-1).t()
    return logits


def test_plot_stage1_logits_are_ot_plus_mean_feature_term(tiny):
    x = images_for(tiny, 3)
    opts = {"tol": 1e-9, "max_iter": 2000}  # both sides at the converged plan
    s1 = create_method("plot", tiny, CLASSES, stage="visual", **opts).eval()
    s2 = create_method("plot", tiny, CLASSES, stage="joint", **opts).eval()
    s2.load_prompt_state_dict(s1.prompt_state_dict())
    with torch.no_grad():
        l1, l2 = s1.logits(x), s2.logits(x)
    torch.testing.assert_close(l1, _reference_logits(s1, x, trade_off=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, _reference_logits(s2, x, trade_off=False), rtol=1e-5, atol=1e-5)
    # the term is really there: the difference is the global cosine logit, not zero
    assert (l1 - l2).abs().max() > 0.1


def test_plot_stage1_trains_visual_prompts_only_with_cached_text(tiny):
    m = create_method("plot", tiny, CLASSES, stage="visual").train()
    out = m.training_step((images_for(tiny, 4), torch.arange(4) % len(CLASSES)))
    out["loss"].backward()
    assert m.visual.grad is not None and m.visual.grad.abs().sum() > 0
    assert m.ctx.grad is None and not m.ctx.requires_grad
    assert m.num_trainable() == m.visual.numel()


def test_plot_text_sets_start_from_the_template(tiny):
    """Released CTX_INIT path: set i from phrase i, the template's own words for set 1."""
    m = create_method("plot", tiny, CLASSES, template="a photo of a {}, a type of pet.")
    emb = tiny.embed_tokens(tiny.tokenize(["a photo of a", "this is a photo", "this is picture of",
                                           "one picture of a"]))[:, 1:5]
    torch.testing.assert_close(m.ctx.detach(), emb.float())
    # the class side keeps the template's tail: "X X X X dog, a type of pet."
    ref = tiny.tokenize(["X X X X dog, a type of pet."])
    assert torch.equal(m.tokens[0], ref[0])


def test_plot_template_words_beyond_n_ctx_stay_literal(tiny):
    m = create_method("plot", tiny, CLASSES, template="a photo of a person doing {}.")
    emb = tiny.embed_tokens(tiny.tokenize(["a photo of a", "this is a photo"]))[:, 1:5]
    torch.testing.assert_close(m.ctx.detach()[:2], emb.float())
    assert torch.equal(m.tokens[0], tiny.tokenize(["X X X X person doing dog."])[0])
    # a template without words before the class: every set from the released phrases
    dtd = create_method("plot", tiny, CLASSES, template="{} texture.")
    first = tiny.embed_tokens(tiny.tokenize(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(dtd.ctx.detach()[0], first.float())
    assert torch.equal(dtd.tokens[0], tiny.tokenize(["X X X X dog texture."])[0])


def test_plot_without_template_starts_random():
    import promptalign

    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    m = create_method("plot", bb, CLASSES)
    std = float(m.ctx.detach().std())
    assert 0.015 < std < 0.025
    assert m.tokens.shape[0] == len(CLASSES)


def test_plot_defaults_match_released_vit_b16_count():
    """N = M = 4, 4 text and 2 visual tokens on ViT-B/16: 4*4*512 + 4*2*768 = 14,336."""
    import promptalign

    bb = promptalign.load_backbone("ViT-B-16", weights=None)
    m = create_method("plot", bb, ["dog", "cat"])
    assert m.num_trainable() == 14_336
    assert create_method("plot", bb, ["dog", "cat"], stage="visual").num_trainable() == 6_144
