"""ALIGN: one mode without the token term is MaPLe, the released and the paper forms, and the
reference preset's stopping rule at the converged answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptalign.methods import create_method
from promptalign.ot import sinkhorn

from conftest import CLASSES, labelled_batch


def test_align_single_mode_without_token_term_is_maple(tiny):
    """M = N = 1, b tokens, beta = 0: ALIGN's score is the prompt-level cosine, i.e. MaPLe."""
    torch.manual_seed(0)
    align = create_method("align", tiny, CLASSES, n_sets=1, depth=2, beta=0.0).eval()
    maple = create_method("maple", tiny, CLASSES, depth=2).eval()
    maple.load_prompt_state_dict(align.prompt_state_dict())  # same CoupledPrompts layout
    x, _ = labelled_batch(tiny, 3)
    with torch.no_grad():
        torch.testing.assert_close(align.logits(x), maple.logits(x), rtol=1e-5, atol=1e-5)
        ref = create_method("align", tiny, CLASSES, preset="reference", n_sets=1, depth=2).eval()
        ref.load_prompt_state_dict(align.prompt_state_dict())
        torch.testing.assert_close(ref.logits(x), maple.logits(x), rtol=1e-5, atol=1e-5)


def test_align_reference_preset_is_the_released_semantics(tiny):
    torch.manual_seed(0)
    m = create_method("align", tiny, CLASSES, preset="reference", n_sets=3, depth=2).eval()
    cfg = m.config
    assert (cfg.form, cfg.token_window, cfg.beta, cfg.eps, cfg.max_iter, cfg.tol) == (
        "released",
        "prompt0",
        1.0,
        0.1,
        100,
        1e-5,  # tol: stops at the converged answer (test below)
    )
    x, _ = labelled_batch(tiny, 3)
    with torch.no_grad():
        cls = m.encode_classes()
        # token window: positions 0 .. eot(prompt 0) - 2 for every prompt of a class
        eot0 = tiny.eot_index(m.tokens[0])
        for k in range(len(CLASSES)):
            assert cls["mask"][k].sum(-1).tolist() == [int(eot0[k]) - 1] * 3
        # prompts n >= 1 are two tokens shorter, so their window includes "." and EOT
        eot1 = tiny.eot_index(m.tokens[1])
        assert torch.equal(eot1, eot0 - 2)
        # logits = scale * <T, s>, T from C = (1 - s) + <T_hat, S>, computed here step by step
        vis, vdeep = m.prompts.visual()
        img = tiny.forward_image(x, vis, deep=vdeep, return_tokens=True)
        r, z = F.normalize(img.tokens, dim=-1), F.normalize(img.pooled, dim=-1)
        s_tok, h = F.normalize(cls["tokens"], dim=-1), F.normalize(cls["global"], dim=-1)
        S = torch.einsum("bmjd,knld->bkmnjl", r, s_tok)
        inner = sinkhorn(
            1 - S,
            eps=0.1,
            max_iter=100,
            tol=1e-2,
            domain="kernel",
            mask_b=cls["mask"][None, :, None],
            check_every=5,
        )
        s = torch.einsum("bmd,knd->bkmn", z, h)
        outer = sinkhorn(
            (1 - s) + (inner.plan * S).sum((-2, -1)),
            eps=0.1,
            max_iter=100,
            tol=1e-2,
            domain="kernel",
            check_every=5,
        )
        expected = tiny.logit_scale * (outer.plan * s).sum((-2, -1))
        torch.testing.assert_close(m.logits(x), expected, rtol=1e-5, atol=1e-5)


def test_align_paper_form_token_window_and_gradient(tiny):
    torch.manual_seed(0)
    m = create_method("align", tiny, CLASSES, depth=2).train()
    cls = m.encode_classes()
    eot = tiny.eot_index(m.tokens)  # [N, K]
    assert torch.equal(cls["mask"].sum(-1), (eot + 1).t())  # SOS .. EOT of each prompt
    out = m.training_step(labelled_batch(tiny, 3))
    for key in ("ot_token_converged", "ot_prompt_converged"):
        assert 0.0 <= float(out[key]) <= 1.0
    out["loss"].backward()
    assert m.prompts.ctx.grad.abs().sum() > 0


def test_align_forms_differ_only_by_the_token_term(tiny):
    """With beta = 0 the paper and released forms coincide; the token term makes the difference."""
    torch.manual_seed(0)
    paper = create_method("align", tiny, CLASSES, depth=2, beta=0.0, tol=1e-6, max_iter=1000).eval()
    released = create_method(
        "align", tiny, CLASSES, depth=2, form="released", beta=0.0, tol=1e-6, max_iter=1000
    ).eval()
    released.load_prompt_state_dict(paper.prompt_state_dict())
    x, _ = labelled_batch(tiny, 3)
    with torch.no_grad():
        torch.testing.assert_close(paper.logits(x), released.logits(x), rtol=1e-4, atol=1e-4)
        with_tokens = create_method("align", tiny, CLASSES, depth=2, beta=1.0).eval()
        with_tokens.load_prompt_state_dict(paper.prompt_state_dict())
        assert not torch.allclose(with_tokens.logits(x), paper.logits(x), atol=1e-3)


# ------------------------------------------------------------------------- ALIGN reference stopping
def _trained_like(seed: int, B=6, K=8, M=4, N=4, J=24, L=8, D=64):
    """Features whose costs look like a trained CLIP's: global cosines ~0.06-0.8, token cosines
    up to ~0.64, and prompt sets spread enough that the OT moves the logits by a few per cent."""
    g = torch.Generator().manual_seed(seed)
    common, cls = torch.randn(D, generator=g), torch.randn(K, D, generator=g)
    lab = torch.arange(B) % K
    ig = 1.8 * common + 1.2 * cls[lab][:, None] + 1.9 * torch.randn(B, M, D, generator=g)
    tg = 1.8 * common + 1.2 * cls[:, None] + 1.9 * torch.randn(K, N, D, generator=g)
    it = 0.4 * common + 0.4 * cls[lab][:, None, None] + 1.1 * torch.randn(B, M, J, D, generator=g)
    tt = 0.4 * common + 0.4 * cls[:, None, None] + 1.1 * torch.randn(K, N, L, D, generator=g)
    return ig, it, tg, tt


def test_align_reference_preset_sits_at_the_converged_answer():
    from promptalign.methods.align import ALIGNConfig
    from promptalign.ot import hierarchical_ot

    cfg = ALIGNConfig.from_preset("reference")
    opts = {
        "form": cfg.form,
        "beta": cfg.beta,
        "eps": cfg.eps,
        "domain": cfg.domain,
        "backend": "torch",
    }
    worst_preset, worst_loose = 0.0, 0.0
    for seed in range(3):
        ig, it, tg, tt = _trained_like(seed)
        sim = torch.einsum("bmd,knd->bkmn", F.normalize(ig, dim=-1), F.normalize(tg, dim=-1))
        tok = torch.einsum("bmjd,knld->bkmnjl", F.normalize(it, dim=-1), F.normalize(tt, dim=-1))
        assert (
            0.0 < float(sim.min()) < 0.2 and 0.7 < float(sim.max()) < 0.9 and float(tok.max()) < 0.7
        )
        exact = hierarchical_ot(
            ig.double(), it.double(), tg.double(), tt.double(), max_iter=5000, tol=1e-11, **opts
        ).score
        assert ((exact - sim.double().mean((-2, -1))).abs() / exact).max() > 0.05  # the OT matters

        def rel(res, exact=exact):
            return float(((res.score.double() - exact).abs() / exact.abs()).max())

        preset = hierarchical_ot(ig, it, tg, tt, max_iter=cfg.max_iter, tol=cfg.tol, **opts)
        assert bool(preset.prompt_stats.converged >= 1.0) and bool(
            preset.token_stats.converged >= 1.0
        )
        worst_preset = max(worst_preset, rel(preset))
        worst_loose = max(
            worst_loose, rel(hierarchical_ot(ig, it, tg, tt, max_iter=100, tol=1e-2, **opts))
        )
    assert worst_preset <= 1e-5
    assert worst_loose > 2e-5  # the former per-problem 1e-2 stopped measurably short
