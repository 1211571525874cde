"""Batched unbalanced entropic OT: Sinkhorn with KL-relaxed marginals, log and kernel domain.

Solves, for every problem in a batch (Chizat, Peyré, Schmitzer, Vialard 2018, "Scaling
algorithms for unbalanced optimal transport problems", arXiv 1607.05816; the problem POT's
``ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, tau, reg_type="kl")`` solves),

    T* = argmin_{T >= 0} <T, C> + eps KL(T | a b^T) + tau KL(T 1 | a) + tau KL(T^T 1 | b)

where ``KL(x | y) = sum x log(x / y) - x + y``: the marginals are penalised instead of imposed,
so mass that would have to travel far (a word with no matching patch) can be left behind. As
``tau -> inf`` it becomes balanced OT; small ``tau`` moves little mass. The scalings of
``T = diag(u) K diag(v)``, ``K = exp(-C / eps) * a b^T``, follow the generalised Sinkhorn
updates ``u = (a / K v)^phi``, ``v = (b / K^T u)^phi`` with ``phi = tau / (tau + eps)``, rows
first as POT does, so the iterates are POT's.

Stopping rule (per problem, checked every ``check_every`` iterations): after a column update the
columns sit at their fixed point; the rows' fixed point is ``T 1 = a * u^(-eps / tau)``, and the
L1 distance of the row sums to it is the reported ``marginal_error`` (for ``tau = inf`` exactly
the balanced marginal error). The kernel domain keeps ``K`` unshifted (the unbalanced plan is not
invariant to rescaling ``K``), which is exact in fp32 for ``max C / eps <= 40``
(:func:`~.sinkhorn.auto_domain` with the cost bound, 2 for cosine costs). Masked rows and
columns get zero mass, as in :func:`~.sinkhorn.sinkhorn`; every problem needs at least one real
row and column.

This module imports nothing else from promptalign.
"""

from __future__ import annotations

import math

import torch

from .sinkhorn import (
    DomainChoice,
    GradMode,
    SinkhornResult,
    safe_log,
    scaling_loop,
    solve_batched,
)


# data-dependent early stopping: never traced by torch.compile (graph break)
@torch.compiler.disable
def sinkhorn_unbalanced(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    tau: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    domain: DomainChoice = "log",
    grad: GradMode = "envelope",
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
    check_every: int = 10,
) -> SinkhornResult:
    """Solve a batch of unbalanced entropic OT problems (see the module docstring).

    Args:
        cost: ``[..., n, m]`` cost matrices (computed in fp32, or fp64 if given).
        a, b: marginals ``[..., n]`` / ``[..., m]`` (broadcastable; any total mass); default
            uniform over the unmasked entries.
        eps: entropic regularisation (> 0).
        tau: strength of the KL penalty on each marginal (> 0; ``math.inf``: balanced).
        max_iter, tol, check_every: iteration cap, threshold on the L1 distance of the row sums
            to their fixed point, iterations between checks (each one host sync).
        domain: "log" (stable for any eps), "kernel" (faster; ``max C / eps <= ~40``) or "auto".
        grad: "envelope" (plan constant in backward) or "unrolled".
        mask_a, mask_b: ``[..., n]`` / ``[..., m]`` bool, True = real row / column.

    Returns:
        A :class:`~.sinkhorn.SinkhornResult`: the plan, its transport cost ``<T, C>`` (POT's
        ``sinkhorn_unbalanced2`` "linear" cost), convergence, and log scalings with
        ``T_ij = exp(log_u_i - C_ij / eps + log_v_j)``.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (math.inf for balanced OT), got {tau}")
    phi = 1.0 if math.isinf(tau) else tau / (tau + eps)
    rho = eps / tau  # the rows' fixed point: T 1 = a * u^(-rho)

    def iterate(C, a_w, b_w, domain):
        return _iterate(C, a_w, b_w, eps, phi, rho, max_iter, tol, domain, check_every)

    return solve_batched(
        iterate,
        cost,
        a,
        b,
        eps=eps,
        max_iter=max_iter,
        domain=domain,
        grad=grad,
        mask_a=mask_a,
        mask_b=mask_b,
        check_every=check_every,
    )


def _iterate(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    phi: float,
    rho: float,
    max_iter: int,
    tol: float,
    domain: str,
    check_every: int,
):
    batch = torch.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    n, m = C.shape[-2:]
    C = C.expand(*batch, n, m)
    log_a = safe_log(a).expand(*batch, n)  # [..., n]
    log_b = safe_log(b).expand(*batch, m)  # [..., m]
    logK = C / -eps  # [..., n, m]
    if domain == "kernel":
        a_e, b_e = a.expand(*batch, n), b.expand(*batch, m)
        a_pos, b_pos = a_e > 0, b_e > 0
        # K = exp(-C / eps) * a b^T, dense in both layouts (row-vector x matrix products)
        K = (logK + log_a.unsqueeze(-1) + log_b.unsqueeze(-2)).exp_().contiguous()
        Kt = K.transpose(-2, -1).contiguous()

        def update(state):
            u, v = state
            Kv = (v.unsqueeze(-2) @ Kt).squeeze(-2)  # [..., n]
            new_u = torch.where(a_pos, (a_e / torch.where(a_pos, Kv, 1.0)) ** phi, 0.0)
            Ktu = (new_u.unsqueeze(-2) @ K).squeeze(-2)  # [..., m]
            new_v = torch.where(b_pos, (b_e / torch.where(b_pos, Ktu, 1.0)) ** phi, 0.0)
            return new_u, new_v

        def error(state):
            u, v = state
            rows = u * (v.unsqueeze(-2) @ Kt).squeeze(-2)  # [..., n]
            target = torch.where(a_pos, a_e * torch.where(a_pos, u, 1.0) ** -rho, 0.0)
            return (rows - target).abs().sum(-1)

        ones = torch.ones(*batch, n, device=C.device, dtype=C.dtype)
        state = (ones, torch.ones(*batch, m, device=C.device, dtype=C.dtype))
    else:
        # potentials f = log u, g = log v of T = exp(f + log a - C / eps + log b + g); the
        # row update's log a cancels: f = -phi * logsumexp_j(-C_ij / eps + log b_j + g_j)
        def update(state):
            f, g = state
            new_f = -phi * torch.logsumexp(logK + (log_b + g).unsqueeze(-2), dim=-1)
            new_g = -phi * torch.logsumexp(logK + (log_a + new_f).unsqueeze(-1), dim=-2)
            return new_f, new_g

        def error(state):
            f, g = state
            log_rows = log_a + f + torch.logsumexp(logK + (log_b + g).unsqueeze(-2), dim=-1)
            return (log_rows.exp() - (log_a - rho * f).exp()).abs().sum(-1)

        zeros = torch.zeros(*batch, n, device=C.device, dtype=C.dtype)
        state = (zeros, torch.zeros(*batch, m, device=C.device, dtype=C.dtype))
    (first, second), converged, n_iter, err = scaling_loop(
        update, error, state, batch, max_iter, tol, check_every
    )
    if domain == "kernel":
        u, v = first, second
        plan = u.unsqueeze(-1) * K * v.unsqueeze(-2)
        log_u, log_v = safe_log(u) + log_a, safe_log(v) + log_b
    else:
        log_u, log_v = first + log_a, second + log_b
        plan = (logK + log_u.unsqueeze(-1) + log_v.unsqueeze(-2)).exp()
    return plan, log_u, log_v, converged, n_iter, err
