"""ALIGN's hierarchical OT: per-pair reference, chunk invariance, gradients, fused kernel."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from promptalign.ot import class_chunk_size, hierarchical_ot
from promptalign.ot import hierarchical as hier

B, M, J, D, K, N, L = 2, 3, 11, 8, 4, 2, 6
LENGTHS = torch.tensor([[6, 4], [3, 3], [5, 2], [1, 6]])  # [K, N] ragged text lengths


def _features(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return mk(B, M, D), mk(B, M, J, D), mk(K, N, D), mk(K, N, L, D)


def _naive(ig, it, tg, tt, lengths, beta, eps, form):
    """Per-pair loops with POT as the solver: the meaning of the hierarchical OT, written
    plainly."""
    ig, it, tg, tt = (F.normalize(x, dim=-1).numpy() for x in (ig, it, tg, tt))
    out = np.zeros((B, K))
    for b in range(B):
        for k in range(K):
            C = np.zeros((M, N))
            s_glob = np.zeros((M, N))
            for m in range(M):
                for n in range(N):
                    length = int(lengths[k, n])
                    S = it[b, m] @ tt[k, n, :length].T  # [J, L_k]
                    T_hat = ot.bregman.sinkhorn_log(
                        np.ones(J) / J,
                        np.ones(length) / length,
                        1 - S,
                        eps,
                        stopThr=1e-13,
                        numItermax=100000,
                    )
                    s_glob[m, n] = ig[b, m] @ tg[k, n]
                    tok = (T_hat * (1 - S)).sum() if form == "paper" else (T_hat * S).sum()
                    C[m, n] = (1 - s_glob[m, n]) + beta * tok
            T = ot.bregman.sinkhorn_log(
                np.ones(M) / M, np.ones(N) / N, C, eps, stopThr=1e-13, numItermax=100000
            )
            out[b, k] = 1 - (T * C).sum() if form == "paper" else (T * s_glob).sum()
    return out


@pytest.mark.parametrize("form,beta", [("paper", 0.7), ("released", 1.0)])
@pytest.mark.parametrize("domain", ["log", "kernel"])
def test_batched_chunked_matches_naive_per_pair_reference(form, beta, domain):
    feats = _features()
    ref = _naive(*feats, LENGTHS, beta, 0.1, form)
    for chunk in (1, 3, None):
        res = hierarchical_ot(
            *feats,
            text_lengths=LENGTHS,
            beta=beta,
            eps=0.1,
            tol=1e-11,
            max_iter=20000,
            form=form,
            domain=domain,
            class_chunk=chunk,
        )
        np.testing.assert_allclose(res.score.numpy(), ref, rtol=1e-7, atol=1e-9)
        assert res.token_stats.converged == 1 and res.prompt_stats.converged == 1
        assert res.backend == "torch"


def _entropy_ratio(T: np.ndarray) -> float:
    """H(T) / (H(a) + H(b)) of a plan with total mass 1, written plainly."""
    h = lambda p: -sum(x * np.log(x) for x in p.ravel() if x > 0)  # noqa: E731
    return h(T) / (h(T.sum(1)) + h(T.sum(0)))


def test_plan_entropies_of_both_levels_match_a_per_pair_reference():
    """token_stats / prompt_stats.mean_entropy (what ALIGN logs in training and evaluation) are
    the mean entropy ratios of the plans, padding words excluded."""
    ig, it, tg, tt = feats = _features(2)
    res = hierarchical_ot(
        *feats, text_lengths=LENGTHS, beta=0.7, eps=0.1, tol=1e-11, max_iter=20000, form="paper"
    )
    ig, it, tg, tt = (F.normalize(x, dim=-1).numpy() for x in (ig, it, tg, tt))
    tokens, prompts = [], []
    for b in range(B):
        for k in range(K):
            C = np.zeros((M, N))
            for m in range(M):
                for n in range(N):
                    length = int(LENGTHS[k, n])
                    S = it[b, m] @ tt[k, n, :length].T
                    T_hat = ot.bregman.sinkhorn_log(
                        np.ones(J) / J, np.ones(length) / length, 1 - S, 0.1, stopThr=1e-13
                    )
                    tokens.append(_entropy_ratio(T_hat) if length > 1 else 1.0)
                    C[m, n] = (1 - ig[b, m] @ tg[k, n]) + 0.7 * (T_hat * (1 - S)).sum()
            T = ot.bregman.sinkhorn_log(np.ones(M) / M, np.ones(N) / N, C, 0.1, stopThr=1e-13)
            prompts.append(_entropy_ratio(T))
    assert float(res.token_stats.mean_entropy) == pytest.approx(np.mean(tokens), rel=1e-6)
    assert float(res.prompt_stats.mean_entropy) == pytest.approx(np.mean(prompts), rel=1e-6)
    assert 0.5 < np.mean(tokens) < 1.0  # random costs: the plans are neither uniform nor maps


@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_entropy_from_the_scalings_equals_the_entropy_of_the_plan(domain):
    """The token level logs entropies from Sinkhorn's scalings (no log per plan entry)."""
    from promptalign.ot import sinkhorn
    from promptalign.ot.entropy import entropy_ratio_from_potentials, plan_entropy_ratio

    C = torch.rand(3, 4, 36, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 4, 12, dtype=torch.bool)
    mask[0, :, 5:] = False  # padded words
    mask[1, 1, 1:] = False  # a one-word text: its plan is the uniform one, ratio 1
    res = sinkhorn(C, eps=0.1, max_iter=30, tol=1e-9, domain=domain, mask_b=mask)
    fast = entropy_ratio_from_potentials(res.plan, res.cost, res.log_u, res.log_v, 0.1)
    torch.testing.assert_close(fast, plan_entropy_ratio(res.plan), rtol=0, atol=2e-6)
    assert float(fast[1, 1]) == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < float(fast[2].min()) and float(fast[2].max()) < 1.0


def test_same_numbers_whatever_the_chunk_size():
    feats = _features(1, dtype=torch.float32)
    results = [
        hierarchical_ot(*feats, text_lengths=LENGTHS, class_chunk=c, max_iter=50, tol=1e-4)
        for c in (1, 2, 4)
    ]
    tiny_budget = hierarchical_ot(
        *feats, text_lengths=LENGTHS, memory_budget=1, max_iter=50, tol=1e-4
    )
    for r in results[1:] + [tiny_budget]:
        torch.testing.assert_close(r.score, results[0].score, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            r.token_distance, results[0].token_distance, rtol=1e-6, atol=1e-7
        )


def test_cpu_chunks_are_cache_sized_and_change_no_number(monkeypatch):
    """On a CPU the token level runs in cache-sized chunks of classes, then of images; the
    numbers are those of one chunk of everything, bit for bit, and so are the gradients up to
    the order in which autograd sums the chunks' contributions."""
    per = M * N * J * L  # token-cost entries of one (image, class) pair
    assert hier.cpu_chunks(B, K, M, N, J, L, 2**31) == (B, K)  # all fits
    monkeypatch.setattr(hier, "CPU_CHUNK_ENTRIES", 2 * B * per)
    assert hier.cpu_chunks(B, K, M, N, J, L, 2**31) == (B, 2)  # classes first
    monkeypatch.setattr(hier, "CPU_CHUNK_ENTRIES", per)
    assert hier.cpu_chunks(B, K, M, N, J, L, 2**31) == (1, 1)  # then images
    assert hier.cpu_chunks(B, K, M, N, J, L, 1) == (1, 1)  # and never over the memory budget

    def run(**kw):
        feats = [f.requires_grad_() for f in _features(2, dtype=torch.float32)]
        res = hierarchical_ot(*feats, text_lengths=LENGTHS, max_iter=50, tol=1e-5, **kw)
        res.score.sum().backward()
        return res, [f.grad for f in feats]

    (one, g_one), (split, g_split) = run(class_chunk=K), run()  # split: 1 image x 1 class
    for name in ("score", "token_distance", "token_similarity", "prompt_plan"):
        assert torch.equal(getattr(one, name), getattr(split, name)), name
    for a, b in zip(g_one, g_split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(one.token_stats.mean_iter, split.token_stats.mean_iter)


def test_class_chunk_size_follows_budget():
    per_class = 64 * 4 * 4 * 198 * 8 * 32  # bytes per class at B=64, M=N=4, J=198, L=8
    assert class_chunk_size(64, 4, 4, 198, 8, 10 * per_class) == 10
    assert class_chunk_size(64, 4, 4, 198, 8, 1) == 1


def test_padding_gets_zero_mass():
    """Padding tokens, whatever their features, change nothing."""
    ig, it, tg, tt = _features(2)
    mask = torch.arange(L) < LENGTHS[..., None]
    tt2 = torch.where(mask[..., None], tt, torch.randn_like(tt) * 100)
    a = hierarchical_ot(ig, it, tg, tt, mask, tol=1e-9, max_iter=5000)
    b = hierarchical_ot(ig, it, tg, tt2, mask, tol=1e-9, max_iter=5000)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=1e-12)


def test_single_prompt_no_token_term_is_global_cosine():
    """M = N = 1 and beta = 0: the score is the cosine of the global features."""
    ig, it, tg, tt = _features(3)
    res = hierarchical_ot(ig[:, :1], it[:, :1], tg[:, :1], tt[:, :1], beta=0.0)
    cos = F.normalize(ig[:, 0], dim=-1) @ F.normalize(tg[:, 0], dim=-1).t()
    torch.testing.assert_close(res.score, cos)


def test_paper_form_sends_gradient_to_tokens_released_form_does_not():
    feats = [x.float().requires_grad_(True) for x in _features(4)]
    hierarchical_ot(*feats, text_lengths=LENGTHS, form="paper").score.sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in feats)

    feats = [x.float().requires_grad_(True) for x in _features(4)]
    res = hierarchical_ot(*feats, text_lengths=LENGTHS, form="released")
    assert res.prompt_plan.grad_fn is None
    res.score.sum().backward()
    ig, it, tg, tt = feats
    assert ig.grad.abs().sum() > 0 and tg.grad.abs().sum() > 0
    assert it.grad is None and tt.grad is None


def test_paper_score_gradient_is_the_envelope_gradient():
    """d score / d s_mn = T_mn (plans constant), checked on the global cosines."""
    ig, it, tg, tt = _features(5)
    ig.requires_grad_(True)
    res = hierarchical_ot(ig, it, tg, tt, text_lengths=LENGTHS, tol=1e-12, max_iter=20000)
    res.global_sim.retain_grad()
    res.score.sum().backward()
    torch.testing.assert_close(res.global_sim.grad, res.prompt_plan)


def test_shape_errors_name_the_shapes():
    ig, it, tg, tt = _features()
    with pytest.raises(ValueError, match=r"\[B, M, D\]"):
        hierarchical_ot(ig, it, tg, tt[..., :4])
    with pytest.raises(ValueError, match="form"):
        hierarchical_ot(ig, it, tg, tt, form="distance")


def test_auto_backend_uses_torch_on_cpu():
    assert hierarchical_ot(*_features()).backend == "torch"
