"""Batched entropic optimal transport (Sinkhorn), log and kernel domain.

Solves, for every problem in a batch,

    T* = argmin_T <T, C> - eps * H(T)   s.t.  T 1 = a,  T^T 1 = b,  T >= 0,   H(T) = -sum T log T

with the alternating scaling updates of Cuturi (2013) in either the kernel domain
(``u = a / K v``, ``K = exp(-C / eps)``: fast, safe for eps >= ~0.05 when costs lie in [0, 2]) or
the log domain (potentials updated with logsumexp: stable for any eps). The update order follows
POT (``ot.sinkhorn`` / ``ot.sinkhorn_log``): column scaling first, then row scaling, so after every
iteration the row marginals hold exactly and convergence is measured on the columns.

Every problem stops on its own: convergence is checked every ``check_every`` iterations (the only
host synchronisation, so the loop can exit once all problems have converged), and a problem that
has converged is frozen from then on (:func:`scaling_loop`, shared with the unbalanced solver of
:mod:`.unbalanced`). A problem's result therefore does not depend on which other problems share
its batch.

Gradient modes:
    "envelope" (default): the plan is a constant in backward; d<T, C>/dC = T, which is also the
        exact gradient of the regularised OT value (envelope theorem). The loop records no graph.
    "unrolled": autograd through every iteration (memory grows with iterations; for small
        problems and tests).

This module imports nothing else from promptalign.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Domain = Literal["log", "kernel"]
# a domain as an option: "auto" is resolved by :func:`auto_domain`
DomainChoice = Literal["auto", "log", "kernel"]
GradMode = Literal["envelope", "unrolled"]

# Automatic domain choice: the kernel domain (with the per-problem cost minimum subtracted) is
# exact in fp32 while every kernel entry stays far above fp32's underflow (exp(-87)); for costs
# spread over at most ``cost_spread`` that holds when cost_spread / eps <= 40 (eps >= 0.05 for
# cosine costs 1 - cos in [0, 2]).
KERNEL_DOMAIN_MAX_RATIO = 40.0


def auto_domain(eps: float, cost_spread: float = 2.0) -> Domain:
    """The domain "auto" stands for, wherever it is given: "kernel" (faster) when
    ``cost_spread / eps <= 40``, else "log". The one place this rule is written.

    ``cost_spread`` bounds max C - min C within a problem (for the unbalanced solver, which
    cannot shift its costs, max C); the default 2.0 covers cosine costs ``1 - cos`` of any
    features (PLOT, ALIGN): kernel for eps >= 0.05. Pass the real spread for other costs.
    """
    return "kernel" if cost_spread / eps <= KERNEL_DOMAIN_MAX_RATIO else "log"


@dataclass
class SinkhornResult:
    """What a batched Sinkhorn solve produced.

    Attributes:
        plan: transport plans ``[..., n, m]`` (fp32; fp64 for fp64 costs); zero on masked rows
            and columns.
        cost: transport cost ``<T, C>`` per problem ``[...]``; differentiable w.r.t. the cost
            according to the gradient mode.
        converged: per-problem flag ``[...]``: ``marginal_error <= tol`` at a check.
        n_iter: iterations each problem ran ``[...]`` (int).
        marginal_error: L1 column-marginal error ``sum_j |(T^T 1)_j - b_j|`` per problem ``[...]``
            (unbalanced solver: the L1 distance of the row sums to their fixed point, see
            :mod:`.unbalanced`).
        log_u, log_v: log scalings ``[..., n]`` and ``[..., m]`` with
            ``T_ij = exp(log_u_i - C_ij / eps + log_v_j)`` (the dual potentials / eps).
    """

    plan: torch.Tensor
    cost: torch.Tensor
    converged: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor
    log_u: torch.Tensor
    log_v: torch.Tensor

    @property
    def all_converged(self) -> bool:
        """True when every problem converged (one host sync)."""
        return bool(self.converged.all())


def _marginal(
    weights: torch.Tensor | None,
    mask: torch.Tensor | None,
    size: int,
    like: torch.Tensor,
    name: str,
) -> torch.Tensor:
    """Marginal weights: given (zeroed where masked) or uniform over the unmasked entries."""
    if weights is not None:
        w = weights.to(device=like.device, dtype=like.dtype)
        if w.shape[-1] != size:
            raise ValueError(f"marginal `{name}` has {w.shape[-1]} entries, the cost has {size}")
        if mask is not None:
            w = w * mask.to(w.device)
        return w
    if mask is None:
        return torch.full((size,), 1.0 / size, device=like.device, dtype=like.dtype)
    m = mask.to(device=like.device, dtype=like.dtype)
    if m.shape[-1] != size:
        raise ValueError(f"mask for `{name}` has {m.shape[-1]} entries, the cost has {size}")
    return m / m.sum(-1, keepdim=True).clamp_min(1.0)


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log x`` with ``-inf`` where ``x <= 0`` (zero mass)."""
    return torch.where(x > 0, x.clamp_min(1e-38).log(), torch.full_like(x, -math.inf))


# data-dependent early stopping and the Triton kernel: never traced by torch.compile (graph break)
@torch.compiler.disable
def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    domain: DomainChoice = "log",
    grad: GradMode = "envelope",
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
    check_every: int = 10,
) -> SinkhornResult:
    """Solve a batch of entropic OT problems.

    Args:
        cost: ``[..., n, m]`` cost matrices (any float dtype; computed in fp32, or fp64 if given).
        a: row marginals ``[..., n]`` (broadcastable); default uniform over unmasked rows.
        b: column marginals ``[..., m]``; default uniform over unmasked columns.
        eps: entropic regularisation (> 0).
        max_iter: iteration cap per problem.
        tol: convergence threshold on the L1 column-marginal error.
        domain: "log" (stable for any eps), "kernel" (faster; eps >= ~0.05 for costs in [0, 2]),
            or "auto" (:func:`auto_domain`: kernel when eps >= 0.05, assuming costs spread <= 2).
        grad: "envelope" (plan constant in backward, no graph in the loop) or "unrolled".
        mask_a: ``[..., n]`` bool, True = real row; masked rows get zero mass and a zero plan row.
        mask_b: ``[..., m]`` bool, likewise for columns (e.g. padding of ragged token sets).
        check_every: iterations between convergence checks (each is one host sync).

    Returns:
        A :class:`SinkhornResult`; non-convergence is reported in ``converged``, never hidden.
    """

    def iterate(C, a_w, b_w, domain):
        return _iterate(C, a_w, b_w, eps, max_iter, tol, domain, check_every)

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


Iterate = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Domain],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
]


def solve_batched(
    iterate: Iterate,
    cost: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    *,
    eps: float,
    max_iter: int,
    domain: DomainChoice,
    grad: GradMode,
    mask_a: torch.Tensor | None,
    mask_b: torch.Tensor | None,
    check_every: int,
) -> SinkhornResult:
    """What every batched scaling solver shares around its iterations: argument checks, the
    fp32 (or fp64) working copy of the cost, the marginals, the gradient mode and the result.

    ``iterate(C, a, b, domain)`` runs the solver's iterations on costs ``C [..., n, m]`` with
    marginals ``a [..., n]``, ``b [..., m]`` and returns (plan, log_u, log_v, converged,
    n_iter, marginal_error) as :class:`SinkhornResult` describes them.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter}, {check_every}")
    if domain == "auto":
        domain = auto_domain(eps)
    if domain not in ("log", "kernel"):
        raise ValueError(f"domain {domain!r} unknown; use 'log', 'kernel' or 'auto'")
    if grad not in ("envelope", "unrolled"):
        raise ValueError(f"grad mode {grad!r} unknown; use 'envelope' or 'unrolled'")
    if cost.dim() < 2:
        raise ValueError(f"cost must be [..., n, m], got shape {tuple(cost.shape)}")
    n, m = cost.shape[-2:]
    work = cost.to(torch.promote_types(cost.dtype, torch.float32))  # fp32, or fp64 if given
    a_w = _marginal(a, mask_a, n, work, "a")
    b_w = _marginal(b, mask_b, m, work, "b")

    if grad == "envelope":
        with torch.no_grad():
            plan, log_u, log_v, conv, iters, err = iterate(work.detach(), a_w, b_w, domain)
    else:
        plan, log_u, log_v, conv, iters, err = iterate(work, a_w, b_w, domain)
    value = (plan * work).sum((-2, -1))
    return SinkhornResult(
        plan=plan,
        cost=value,
        converged=conv,
        n_iter=iters,
        marginal_error=err,
        log_u=log_u,
        log_v=log_v,
    )


def _iterate(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    max_iter: int,
    tol: float,
    domain: str,
    check_every: int,
):
    batch = torch.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    n, m = C.shape[-2:]
    C = C.expand(*batch, n, m)
    log_a, log_b = safe_log(a), safe_log(b)
    logK = C / -eps  # [..., n, m]
    log_u = torch.zeros(*batch, n, device=C.device, dtype=C.dtype)  # [..., n]
    log_v = torch.zeros(*batch, m, device=C.device, dtype=C.dtype)  # [..., m]
    if domain == "kernel":
        # the plan is invariant to scaling K per problem: shift by the smallest cost so the
        # largest kernel entry is 1 (postpones underflow to eps ~ (max C - min C) / 87 in fp32)
        # (over the entries with mass only: padding costs must not decide the scale); the
        # minimum is taken over rows first, then over the columns with mass, so no full-size
        # mask is built (the same minimum)
        rows_real = a > 0
        if not bool(rows_real.all()):
            C_rows = C.masked_fill(~rows_real.unsqueeze(-1), math.inf)
        else:
            C_rows = C
        col_min = C_rows.amin(dim=-2).expand(*batch, m)  # [..., m]
        shift = col_min.masked_fill(~(b > 0), math.inf).amin(dim=-1) / eps  # [...]
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        # in place on the fresh logK (not used again in this domain): the same arithmetic
        K = logK.add_(shift[..., None, None]).exp_().contiguous()  # dense: matmul must not copy
        # both layouts, so both products are row-vector x matrix (the fastest batched GEMV form
        # on CPU and GPU; 4-7x faster on CPU than K @ v for tall thin problems)
        Kt = K.transpose(-2, -1).contiguous()
        a_e, b_e = a.expand(*batch, n), b.expand(*batch, m)
        a_pos, b_pos = a_e > 0, b_e > 0

        def update(state):
            u, v = state
            Ktu = (u.unsqueeze(-2) @ K).squeeze(-2)  # [..., m]  (batched GEMV, one pass over K)
            new_v = torch.where(b_pos, b_e / Ktu, 0.0)
            Kv = (new_v.unsqueeze(-2) @ Kt).squeeze(-2)  # [..., n]
            new_u = torch.where(a_pos, a_e / Kv, 0.0)
            return new_u, new_v

        def error(state):
            u, v = state
            col = v * (u.unsqueeze(-2) @ K).squeeze(-2)
            return (col - b).abs().sum(-1)

        state = (torch.ones_like(log_u), torch.ones_like(log_v))
    else:

        def update(state):
            log_u, log_v = state
            new_v = log_b - torch.logsumexp(logK + log_u.unsqueeze(-1), dim=-2)
            new_u = log_a - torch.logsumexp(logK + new_v.unsqueeze(-2), dim=-1)
            return new_u, new_v

        def error(state):
            log_u, log_v = state
            col = (logK + log_u.unsqueeze(-1) + log_v.unsqueeze(-2)).exp().sum(-2)  # [..., m]
            return (col - b).abs().sum(-1)

        state = (log_u, log_v)
    (first, second), converged, n_iter, err = scaling_loop(
        update, error, state, batch, max_iter, tol, check_every
    )
    if domain == "log":
        log_u, log_v = first, second
        plan = (logK + log_u.unsqueeze(-1) + log_v.unsqueeze(-2)).exp()
    else:
        u, v = first, second
        plan = u.unsqueeze(-1) * K * v.unsqueeze(-2)
        log_u, log_v = safe_log(u) + shift.unsqueeze(-1), safe_log(v)
    return plan, log_u, log_v, converged, n_iter, err


State = tuple[torch.Tensor, ...]


def scaling_loop(
    update: Callable[[State], State],
    error: Callable[[State], torch.Tensor],
    state: State,
    batch: tuple[int, ...] | torch.Size,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iterate ``state = update(state)`` over a batch of problems, each stopping on its own.

    Every ``check_every`` iterations ``error(state)`` (``[*batch]``) is compared with ``tol``
    (the only host synchronisation: the loop ends once no problem is active); a problem that has
    converged keeps its state from then on. ``state`` holds tensors ``[*batch, size]``.

    Returns:
        (state, converged ``[*batch]`` bool, iterations ``[*batch]`` long, last error ``[*batch]``).
    """
    ref = state[0]
    active = torch.ones(batch, dtype=torch.bool, device=ref.device)
    n_iter = torch.zeros(batch, dtype=torch.long, device=ref.device)
    err = torch.full(batch, math.inf, device=ref.device, dtype=ref.dtype)

    done = 0
    all_active = True  # until the first check nothing is frozen: no masking needed
    while done < max_iter:
        steps = min(check_every, max_iter - done)
        for _ in range(steps):
            new = update(state)
            if all_active:
                state = new
            else:
                keep = active.unsqueeze(-1)
                state = tuple(torch.where(keep, n, o) for n, o in zip(new, state))
        done += steps
        all_active = False
        n_iter = n_iter + active.long() * steps
        err = torch.where(active, error(state), err)
        # NaN errors compare False: such problems stay active and end unconverged
        active = active & ~(err <= tol)
        if not bool(active.any()):  # one host sync per check
            break
    return state, err <= tol, n_iter, err
