"""Batched Sinkhorn against POT, masks, stability, gradients, convergence reporting."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from promptalign.ot import auto_domain, sinkhorn


def _rand_problem(seed, batch=(3,), n=7, m=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(*batch, n, m, generator=g, dtype=dtype) * 2
    a = torch.rand(*batch, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(*batch, m, generator=g, dtype=dtype) + 0.1
    return C, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def _rel(x, y):
    return float(np.abs(np.asarray(x) - np.asarray(y)).max() / np.abs(np.asarray(y)).max())


@pytest.mark.parametrize(
    "domain,pot_fn", [("kernel", ot.sinkhorn), ("log", ot.bregman.sinkhorn_log)]
)
def test_matches_pot_batched(domain, pot_fn):
    C, a, b = _rand_problem(0, batch=(2, 3))
    res = sinkhorn(C, a, b, eps=0.1, tol=1e-12, max_iter=10000, domain=domain)
    assert res.all_converged
    for i in range(2):
        for j in range(3):
            P = pot_fn(
                a[i, j].numpy(),
                b[i, j].numpy(),
                C[i, j].numpy(),
                0.1,
                stopThr=1e-14,
                numItermax=100000,
            )
            assert _rel(res.plan[i, j], P) < 1e-6
            assert abs(res.cost[i, j].item() - float((P * C[i, j].numpy()).sum())) < 1e-6 * abs(
                res.cost[i, j].item()
            )


@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_masked_problems_match_pot_on_the_real_entries(domain):
    C, _, _ = _rand_problem(1, batch=(4,), n=8, m=6)
    rows = torch.tensor([8, 5, 3, 8])
    cols = torch.tensor([6, 6, 2, 4])
    mask_a = torch.arange(8) < rows[:, None]
    mask_b = torch.arange(6) < cols[:, None]
    res = sinkhorn(
        C, eps=0.05, tol=1e-12, max_iter=20000, domain=domain, mask_a=mask_a, mask_b=mask_b
    )
    assert res.all_converged
    for i in range(4):
        n, m = rows[i].item(), cols[i].item()
        P = ot.bregman.sinkhorn_log(
            np.ones(n) / n,
            np.ones(m) / m,
            C[i, :n, :m].numpy(),
            0.05,
            stopThr=1e-14,
            numItermax=100000,
        )
        assert _rel(res.plan[i, :n, :m], P) < 1e-6
        assert torch.all(res.plan[i, n:] == 0) and torch.all(res.plan[i, :, m:] == 0)


def test_marginals_hold_to_requested_tolerance():
    C, a, b = _rand_problem(2, batch=(16,), n=30, m=12, dtype=torch.float32)
    for tol in (1e-2, 1e-4):
        res = sinkhorn(C, a, b, eps=0.05, tol=tol, max_iter=5000)
        assert res.all_converged
        col_err = (res.plan.sum(-2) - b).abs().sum(-1)
        assert torch.all(col_err <= tol)
        torch.testing.assert_close(res.plan.sum(-1), a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.marginal_error, col_err, rtol=1e-4, atol=1e-7)


def test_domains_agree():
    C, a, b = _rand_problem(3, batch=(5,), dtype=torch.float32)
    lg = sinkhorn(C, a, b, eps=0.1, tol=1e-6, max_iter=5000, domain="log")
    kr = sinkhorn(C, a, b, eps=0.1, tol=1e-6, max_iter=5000, domain="kernel")
    torch.testing.assert_close(lg.plan, kr.plan, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lg.cost, kr.cost, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_eps_log_domain_is_finite(dtype):
    g = torch.Generator().manual_seed(4)
    C = (torch.rand(6, 20, 10, generator=g) * 2).to(dtype)
    res = sinkhorn(C, eps=1e-3, tol=1e-3, max_iter=20000, domain="log")
    for t in (res.plan, res.cost, res.log_u, res.log_v, res.marginal_error):
        assert torch.isfinite(t).all()
    assert res.plan.dtype == torch.float32
    assert res.all_converged
    # kernel domain underflows at this eps: it must say so rather than return a plan silently
    bad = sinkhorn(C, eps=1e-3, tol=1e-3, max_iter=50, domain="kernel")
    assert not bad.converged.all()


def test_non_convergence_is_reported():
    C, a, b = _rand_problem(5, dtype=torch.float32)
    res = sinkhorn(C, a, b, eps=0.01, tol=1e-9, max_iter=3)
    assert not res.converged.any()
    assert torch.all(res.n_iter == 3)
    assert torch.all(res.marginal_error > 1e-9)
    assert res.plan is not None and res.plan.shape == C.shape


def test_each_problem_stops_on_its_own():
    """A problem's result does not depend on the other problems in its batch."""
    easy, _, _ = _rand_problem(6, batch=(1,), dtype=torch.float32)
    hard = torch.rand(1, 7, 9, generator=torch.Generator().manual_seed(9)) * 20
    alone = sinkhorn(easy, eps=0.5, tol=1e-5, max_iter=2000)
    batched = sinkhorn(torch.cat([easy, hard]), eps=0.5, tol=1e-5, max_iter=2000)
    assert batched.n_iter[1] > batched.n_iter[0]  # the hard one kept iterating ...
    assert torch.equal(batched.plan[0], alone.plan[0])  # ... without touching the easy one
    assert batched.n_iter[0] == alone.n_iter[0]


def _regularised_value(plan, C, eps):
    """<T, C> - eps H(T), H(T) = -sum T log T."""
    return (plan * C).sum((-2, -1)) + eps * torch.xlogy(plan, plan).sum((-2, -1))


def test_envelope_gradient_matches_finite_differences():
    C, a, b = _rand_problem(7, batch=(2,))
    C.requires_grad_(True)
    eps = 0.1
    res = sinkhorn(C, a, b, eps=eps, tol=1e-13, max_iter=20000)
    res.cost.sum().backward()
    torch.testing.assert_close(C.grad, res.plan)  # envelope: d/dC = T

    def value(c):
        r = sinkhorn(c, a, b, eps=eps, tol=1e-13, max_iter=20000)
        return _regularised_value(r.plan, c, eps).sum()

    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        E = torch.randn(C.shape, generator=g, dtype=C.dtype)
        h = 1e-5
        with torch.no_grad():
            fd = (value(C + h * E) - value(C - h * E)) / (2 * h)
        assert abs(fd.item() - (C.grad * E).sum().item()) < 1e-7 * max(1.0, abs(fd.item()))


def test_envelope_loop_records_no_graph():
    C = torch.rand(3, 5, 4, requires_grad=True)
    res = sinkhorn(C, eps=0.1)
    assert res.plan.grad_fn is None and not res.plan.requires_grad
    assert res.cost.grad_fn is not None
    assert res.log_u.grad_fn is None


@pytest.mark.parametrize("domain", ["log", "kernel"])
def test_unrolled_gradient_approaches_envelope(domain):
    C0, a, b = _rand_problem(8, batch=(2,))
    eps = 0.2
    env = sinkhorn(C0, a, b, eps=eps, tol=1e-13, max_iter=20000).plan  # gradient of the value
    errors = []
    for iters in (2, 10, 200):
        C = C0.clone().requires_grad_(True)
        res = sinkhorn(C, a, b, eps=eps, tol=0.0, max_iter=iters, grad="unrolled", domain=domain)
        assert res.plan.grad_fn is not None
        _regularised_value(res.plan, C, eps).sum().backward()
        errors.append((C.grad - env).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


def test_bad_arguments_are_named():
    C = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(C, eps=0.0)
    with pytest.raises(ValueError, match="domain"):
        sinkhorn(C, eps=0.1, domain="exp")
    with pytest.raises(ValueError, match="grad"):
        sinkhorn(C, eps=0.1, grad="implicit")
    with pytest.raises(ValueError, match="marginal `b` has 5"):
        sinkhorn(C, b=torch.ones(5) / 5, eps=0.1)
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.rand(3), eps=0.1)


def test_auto_domain_is_kernel_for_cosine_costs_at_moderate_eps():
    """domain="auto" (PLOT, ALIGN) = kernel domain when cost spread / eps <= 40, else log."""
    g = torch.Generator().manual_seed(0)
    C = 1 - torch.rand(3, 4, 5, generator=g) * 2  # cosine costs in [0, 2]
    assert auto_domain(0.1) == "kernel" and auto_domain(0.05) == "kernel"
    assert auto_domain(0.01) == "log" and auto_domain(0.1, cost_spread=10.0) == "log"
    for eps, expect in ((0.1, "kernel"), (0.01, "log")):
        auto = sinkhorn(C, eps=eps, domain="auto", max_iter=50, tol=1e-6)
        fixed = sinkhorn(C, eps=eps, domain=expect, max_iter=50, tol=1e-6)
        assert torch.equal(auto.plan, fixed.plan)
