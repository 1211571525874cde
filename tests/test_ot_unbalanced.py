"""Unbalanced Sinkhorn (KL-relaxed marginals) against POT, and as a token-level option of ALIGN's
hierarchical OT."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from promptalign.ot import (
    HierarchicalOT,
    SinkhornOptions,
    TokenOptions,
    hierarchical_ot,
    sinkhorn,
    sinkhorn_unbalanced,
)

# [B, K] problems of ragged sizes: real rows / columns per problem, padding last
ROWS = [[5, 3, 7], [1, 6, 4]]
COLS = [[4, 6, 2], [6, 1, 5]]
N, M = 7, 6


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(2, 3, N, M, generator=g, dtype=dtype) * 2  # costs in [0, 2] (cosine costs)
    mask_a = torch.arange(N) < torch.tensor(ROWS)[..., None]  # [2, 3, N]
    mask_b = torch.arange(M) < torch.tensor(COLS)[..., None]  # [2, 3, M]
    return C, mask_a, mask_b


def _pot(C, n, m, eps, tau, **kw):
    """POT on the real block of one problem, uniform marginals over its real entries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT's reg_type notices
        return ot.unbalanced.sinkhorn_unbalanced(
            np.ones(n) / n, np.ones(m) / m, C[:n, :m].numpy(), eps, tau, reg_type="kl", **kw
        )


@pytest.mark.parametrize("domain", ["log", "kernel"])
@pytest.mark.parametrize("tau", [0.05, 1.0, 5.0])
def test_batched_masked_problems_match_pot_at_convergence(domain, tau):
    C, mask_a, mask_b = _batch()
    res = sinkhorn_unbalanced(
        C, eps=0.1, tau=tau, tol=1e-13, max_iter=100000, domain=domain, mask_a=mask_a, mask_b=mask_b
    )
    assert bool(res.converged.all())
    for i in range(2):
        for k in range(3):
            n, m = ROWS[i][k], COLS[i][k]
            want = _pot(C[i, k], n, m, 0.1, tau, numItermax=100000, stopThr=1e-15)
            got = res.plan[i, k]
            np.testing.assert_allclose(got[:n, :m].numpy(), want, rtol=1e-7, atol=1e-12)
            assert not got[n:].any() and not got[:, m:].any()  # padding carries no mass
            linear = ot.unbalanced.sinkhorn_unbalanced2(
                np.ones(n) / n,
                np.ones(m) / m,
                C[i, k, :n, :m].numpy(),
                0.1,
                tau,
                reg_type="kl",
                numItermax=100000,
                stopThr=1e-15,
            )
            assert float(res.cost[i, k]) == pytest.approx(float(linear), rel=1e-7)


@pytest.mark.parametrize("domain", ["log", "kernel"])
def test_every_iterate_is_pots(domain):
    """A fixed number of iterations (tol 0): the same updates in the same order as POT's."""
    C, mask_a, mask_b = _batch(1)
    res = sinkhorn_unbalanced(
        C, eps=0.2, tau=0.5, tol=0.0, max_iter=7, domain=domain, mask_a=mask_a, mask_b=mask_b
    )
    assert bool((res.n_iter == 7).all()) and not bool(res.converged.any())
    for i in range(2):
        for k in range(3):
            n, m = ROWS[i][k], COLS[i][k]
            want = _pot(C[i, k], n, m, 0.2, 0.5, numItermax=7, stopThr=0.0)
            np.testing.assert_allclose(res.plan[i, k, :n, :m].numpy(), want, rtol=1e-10)


def test_relaxation_moves_less_mass_and_large_tau_is_balanced():
    C, mask_a, mask_b = _batch(2)
    kw = dict(eps=0.1, tol=1e-12, max_iter=20000, mask_a=mask_a, mask_b=mask_b)
    mass = [float(sinkhorn_unbalanced(C, tau=t, **kw).plan.sum()) for t in (0.01, 0.1, 1.0)]
    assert mass[0] < mass[1] < mass[2] < 6.0  # 6 problems of mass <= 1 each
    balanced = sinkhorn(C, **kw).plan
    # the plan approaches the balanced one like 1 / tau, and is it at tau = inf
    far, near = ((sinkhorn_unbalanced(C, tau=t, **kw).plan - balanced).abs().max() for t in (3, 30))
    assert near < far / 5 and near < 0.02
    torch.testing.assert_close(
        sinkhorn_unbalanced(C, tau=math.inf, **kw).plan, balanced, rtol=0, atol=1e-10
    )


def test_fp32_kernel_domain_matches_the_log_domain_at_small_eps():
    C, mask_a, mask_b = _batch(3, dtype=torch.float32)
    kw = dict(eps=0.05, tau=0.3, tol=1e-7, max_iter=5000, mask_a=mask_a, mask_b=mask_b)
    kernel = sinkhorn_unbalanced(C, domain="kernel", **kw)
    log = sinkhorn_unbalanced(C, domain="log", **kw)
    assert bool(kernel.converged.all()) and bool(log.converged.all())
    torch.testing.assert_close(kernel.plan, log.plan, rtol=1e-4, atol=1e-7)


def test_problems_stop_on_their_own_and_do_not_depend_on_the_batch():
    C, mask_a, mask_b = _batch(4)
    kw = dict(eps=0.1, tau=0.5, tol=1e-9, max_iter=5000, check_every=1)
    both = sinkhorn_unbalanced(C, mask_a=mask_a, mask_b=mask_b, **kw)
    one = sinkhorn_unbalanced(C[1:], mask_a=mask_a[1:], mask_b=mask_b[1:], **kw)
    assert torch.equal(both.plan[1:], one.plan) and torch.equal(both.n_iter[1:], one.n_iter)
    assert len(set(both.n_iter.flatten().tolist())) > 1  # each problem its own iterations


def test_envelope_gradient_is_the_plan_and_unrolled_agrees():
    C0, mask_a, mask_b = _batch(5)
    kw = dict(eps=0.2, tau=0.4, mask_a=mask_a, mask_b=mask_b)
    C = C0.clone().requires_grad_(True)
    res = sinkhorn_unbalanced(C, tol=1e-13, max_iter=100000, **kw)
    res.cost.sum().backward()
    torch.testing.assert_close(C.grad, res.plan)
    C = C0.clone().requires_grad_(True)
    unrolled = sinkhorn_unbalanced(C, tol=0.0, max_iter=40, grad="unrolled", **kw)
    unrolled.cost.sum().backward()
    assert torch.isfinite(C.grad).all()  # masked entries give no NaN through the unrolled loop


def test_options_pick_the_solver_and_name_bad_fields():
    C, mask_a, mask_b = _batch(6)
    opts = SinkhornOptions(eps=0.1, tau=0.5, max_iter=300, tol=1e-9, domain="log")
    got = opts.solve(C, mask_a=mask_a, mask_b=mask_b)
    want = sinkhorn_unbalanced(
        C, eps=0.1, tau=0.5, max_iter=300, tol=1e-9, domain="log", check_every=5,
        mask_a=mask_a, mask_b=mask_b,
    )  # fmt: skip
    assert torch.equal(got.plan, want.plan)
    balanced = SinkhornOptions(eps=0.1, max_iter=300, tol=1e-9, domain="log").solve(C)
    assert torch.equal(
        balanced.plan, sinkhorn(C, eps=0.1, max_iter=300, tol=1e-9, check_every=5).plan
    )
    for bad, field in [
        ({"tau": 0.0}, "tau"),
        ({"eps": -1.0}, "eps"),
        ({"domain": "exp"}, "domain"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            SinkhornOptions(**bad)
    with pytest.raises(ValueError, match="tau must be > 0"):
        sinkhorn_unbalanced(C, eps=0.1, tau=-1.0)


# --------------------------------------------------------------------------- hierarchical OT
B, MS, J, D, K, NS, L = 2, 2, 9, 8, 3, 2, 5
LENGTHS = torch.tensor([[5, 3], [2, 4], [1, 5]])  # [K, N] ragged text lengths


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(B, MS, D), mk(B, MS, J, D), mk(K, NS, D), mk(K, NS, L, D)


def test_unbalanced_token_level_matches_a_per_pair_pot_reference():
    """tau_token: every J x L token problem is POT's unbalanced problem; the prompt level stays
    balanced (POT's sinkhorn_log)."""
    feats = _features()
    eps, tau, beta = 0.1, 0.3, 0.7
    res = hierarchical_ot(
        *feats, text_lengths=LENGTHS, beta=beta, eps=eps, tau_token=tau, tol=1e-12,
        max_iter=100000, domain="log", plans=True,
    )  # fmt: skip
    ig, it, tg, tt = (F.normalize(x, dim=-1) for x in feats)
    for b in range(B):
        for k in range(K):
            C = np.zeros((MS, NS))
            for m in range(MS):
                for n in range(NS):
                    length = int(LENGTHS[k, n])
                    S = (it[b, m] @ tt[k, n, :length].T).numpy()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        T_hat = ot.unbalanced.sinkhorn_unbalanced(
                            np.ones(J) / J, np.ones(length) / length, 1 - S, eps, tau,
                            reg_type="kl", numItermax=100000, stopThr=1e-15,
                        )  # fmt: skip
                    got = res.token_plan[b, k, m, n]
                    np.testing.assert_allclose(got[:, :length].numpy(), T_hat, atol=1e-12)
                    assert not got[:, length:].any()
                    C[m, n] = 1 - float(ig[b, m] @ tg[k, n]) + beta * (T_hat * (1 - S)).sum()
            T = ot.bregman.sinkhorn_log(np.ones(MS) / MS, np.ones(NS) / NS, C, eps, stopThr=1e-15)
            assert float(res.score[b, k]) == pytest.approx(1 - (T * C).sum(), rel=1e-9)
    # the plans given on request are those of the scores: <T_hat, 1 - S> is the token distance
    torch.testing.assert_close(
        (res.token_plan * (1 - res.token_sim)).sum((-2, -1)), res.token_distance
    )


def test_the_solver_is_built_once_and_its_keywords_round_trip():
    solver = HierarchicalOT.from_kwargs(eps=0.2, eps_token=0.07, tau_token=0.5, tol=1e-4)
    assert solver.token == TokenOptions(eps=0.07, tol=1e-4, tau=0.5)
    assert solver.prompt == SinkhornOptions(eps=0.2, tol=1e-4)
    assert HierarchicalOT.from_kwargs(**solver.to_kwargs()) == solver
    feats = _features(1)
    again = hierarchical_ot(*feats, text_lengths=LENGTHS, **solver.to_kwargs())
    assert torch.equal(solver(*feats, text_lengths=LENGTHS).score, again.score)
    # "auto": one domain for both levels, kernel only when both eps allow it
    assert [o.domain for o in solver.levels()] == ["kernel", "kernel"]
    low = HierarchicalOT.from_kwargs(eps=0.2, eps_token=0.01)
    assert [o.domain for o in low.levels()] == ["log", "log"]


def test_the_fused_kernel_refuses_an_unbalanced_token_level(monkeypatch):
    from promptalign.ot import fused

    monkeypatch.setattr(fused, "available", lambda: True)
    monkeypatch.setattr(fused, "interpreted", lambda: True)
    feats = [x.float() for x in _features(2)]
    with pytest.raises(ValueError, match="backend='fused' cannot run here.*tau_token=0.5"):
        hierarchical_ot(*feats, backend="fused", tau_token=0.5)
    assert hierarchical_ot(*feats, backend="auto", tau_token=0.5).backend == "torch"


# --------------------------------------------------------------------------- through config alone
@pytest.mark.parametrize(
    "name,option", [("align", "method.options.tau_token=0.5"), ("plot", "method.options.tau=0.5")]
)
def test_align_and_plot_train_with_unbalanced_ot_through_config_alone(name, option, tmp_path):
    """One ``KEY=VALUE`` makes the method's OT unbalanced: a training run goes through, its
    folder records the option, and the trained method scores with it (not the balanced OT)."""
    import promptalign
    from promptalign.config import RunConfig, apply_overrides, to_dict
    from promptalign.engine import load_run, train

    from conftest import images_for, small_config
    from data_fixtures import make_json_dataset

    make_json_dataset(tmp_path / "data", "oxford_pets")
    small = [f"method.options.{k}={v}" for k, v in small_config(name).items()]
    overrides = [
        f"method.name={name}",
        "data.dataset=oxford_pets",
        f"data.root={tmp_path / 'data'}",
        "data.shots=1",
        "optim.epochs=1",
        "optim.batch_size=4",
        "optim.eval_batch_size=8",
        "run.device=cpu",
        "run.progress=false",
        *small,
    ]
    cfg = apply_overrides(RunConfig(), [*overrides, option])
    backbone = promptalign.load_backbone("tiny-shapes")
    steps: list[dict] = []
    train(cfg, tmp_path / "run", backbone=backbone, callbacks=[steps.append])
    assert steps and all(math.isfinite(s["loss"]) for s in steps)
    field = option.split("=")[0].split(".")[-1]
    method, stored, _ = load_run(tmp_path / "run", device="cpu", backbone=backbone)
    assert to_dict(stored)["method"]["options"][field] == 0.5 == getattr(method.config, field)
    x = images_for(backbone, 2, seed=1)
    with torch.no_grad():
        relaxed = method.logits(x)
        balanced = type(method)(backbone, method.classnames, method.config.replace(**{field: None}))
        balanced.load_prompt_state_dict(method.prompt_state_dict())
        assert not torch.allclose(balanced.eval().logits(x), relaxed)
