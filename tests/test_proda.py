"""ProDA: the surrogate loss over the prompt distribution, its covariance forms, and inference
with the mean embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptalign.methods import create_method

from conftest import CLASSES, images_for


def small_proda(tiny, **changes):
    """4 prompts of 3 tokens, all encoded every step, no diversity term."""
    return create_method(
        "proda",
        tiny,
        CLASSES,
        n_prompts=4,
        n_ctx=3,
        prompts_per_step=4,
        diversity_weight=0.0,
        **changes,
    )


def test_proda_loss_is_cross_entropy_when_the_covariance_is_zero(tiny):
    m = small_proda(tiny, position_mix=(0.0, 0.0, 1.0))
    with torch.no_grad():
        m.ctx.copy_(m.ctx[:1].expand_as(m.ctx))  # every prompt the same: zero covariance
    m.train()
    x, y = images_for(tiny, 4, seed=1), torch.tensor([0, 3, 1, 4])
    out = m.training_step((x, y))
    assert set(out) >= {"loss", "surrogate", "ce", "acc"} and "diversity" not in out
    torch.testing.assert_close(out["loss"], out["ce"], rtol=1e-6, atol=1e-6)


def test_proda_surrogate_bounds_the_expected_cross_entropy_under_the_gaussian():
    """Sampling w = mu + sum_p eps_p (w^p - mu) / sqrt(P) draws exactly from the Gaussian with
    the prompts' mean and covariance; its mean CE stays below the surrogate."""
    from promptalign.methods.proda import surrogate_logits

    g = torch.Generator().manual_seed(0)
    P, K, D, B = 6, 4, 8, 5
    w = F.normalize(torch.randn(P, K, D, generator=g, dtype=torch.float64), dim=-1)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 2, 3, 0])
    s = torch.tensor(5.0, dtype=torch.float64)
    bound = F.cross_entropy(surrogate_logits(w, z, y, s), y, reduction="none")  # [B]
    mu = w.mean(0)
    eps = torch.randn(20000, P, generator=g, dtype=torch.float64)
    samples = mu + torch.einsum("np,pkd->nkd", eps, w - mu) / P**0.5  # [N, K, D]
    logits = s * torch.einsum("bd,nkd->nbk", z, samples)  # [N, B, K]
    mc = (
        F.cross_entropy(logits.reshape(-1, K), y.repeat(20000), reduction="none")
        .view(20000, B)
        .mean(0)
    )
    assert (mc <= bound + 1e-3).all()
    assert (bound - mc).max() > 1e-3  # a real covariance: the bound is not tight
    # zero covariance: the surrogate logits are the mean-embedding logits
    same = mu.unsqueeze(0).expand(P, K, D)
    torch.testing.assert_close(surrogate_logits(same, z, y, s), s * z @ mu.t())


def test_proda_diagonal_covariance_is_the_per_dimension_blocks_of_the_reimplementations():
    """covariance="diagonal" keeps, for every pair of classes, only the per-dimension part of
    the prompts' covariance (divided by P + 1, as the public reimplementations do); checked
    against a loop over dimensions, and it too bounds the expected CE under its own Gaussian
    (dimensions independent)."""
    from promptalign.methods.proda import surrogate_logits

    g = torch.Generator().manual_seed(1)
    P, K, D, B = 5, 4, 8, 6
    w = F.normalize(torch.randn(P, K, D, generator=g, dtype=torch.float64), dim=-1)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    s = torch.tensor(4.0, dtype=torch.float64)
    mu, c = w.mean(0), w - w.mean(0)
    ref = torch.empty(B, K, dtype=torch.float64)
    for b in range(B):
        for j in range(K):
            v = sum(
                z[b, d] ** 2 * ((c[:, j, d] - c[:, y[b], d]) ** 2).sum() / (P + 1) for d in range(D)
            )
            ref[b, j] = s * z[b] @ mu[j] + 0.5 * s**2 * v
    got = surrogate_logits(w, z, y, s, "diagonal")
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, surrogate_logits(w, z, y, s, "full"))
    # its Gaussian: per dimension d, w_.d = mu_.d + sum_p eps_pd c_p.d / sqrt(P + 1)
    eps = torch.randn(20000, P, D, generator=g, dtype=torch.float64)
    samples = mu + torch.einsum("npd,pkd->nkd", eps, c) / (P + 1) ** 0.5
    logits = s * torch.einsum("bd,nkd->nbk", z, samples)
    mc = F.cross_entropy(logits.reshape(-1, K), y.repeat(20000), reduction="none")
    bound = F.cross_entropy(got, y, reduction="none")
    assert (mc.view(20000, B).mean(0) <= bound + 1e-3).all()


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_proda_training_step_uses_the_configured_covariance(tiny, covariance):
    from promptalign.methods.proda import surrogate_logits

    torch.manual_seed(0)
    m = small_proda(tiny, covariance=covariance).train()
    x, y = images_for(tiny, 4, seed=3), torch.tensor([0, 3, 1, 4])
    out = m.training_step((x, y))
    with torch.no_grad():
        img = F.normalize(tiny.encode_image(x), dim=-1)
        bound = surrogate_logits(m.encode_classes(), img, y, tiny.logit_scale, covariance)
    torch.testing.assert_close(out["surrogate"].detach(), F.cross_entropy(bound, y))


def test_proda_mixes_class_positions_and_infers_with_the_mean_embedding(tiny):
    m = create_method("proda", tiny, CLASSES, n_prompts=8, n_ctx=4, prompts_per_step=8).eval()
    assert m.position_of.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]  # front, middle, end
    tok = m.tokens_front[2]  # "sea lion X X X X ." : the context right after the name
    assert m.positions_front[2].tolist() == [3, 4, 5, 6] and int(tok[1]) != 0
    x = images_for(tiny, 3, seed=2)
    with torch.no_grad():
        per_prompt = m.encode_classes()
        img = F.normalize(tiny.encode_image(x), dim=-1)
        expected = tiny.logit_scale * img @ per_prompt.mean(0).t()
        assert per_prompt.shape == (8, len(CLASSES), tiny.embed_dim)
        torch.testing.assert_close(m.logits(x), expected)
