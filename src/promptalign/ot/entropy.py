"""How far a transport plan is from the uniform (independent) coupling: entropy ratios.

``plan_entropy_ratio`` answers "is the OT doing anything?": the entropy of a plan divided by the
entropy of the independent coupling ``a b^T`` of its own marginals. 1.0 means uniform (the cost
did not move the plan); the floor is ``max(H(a), H(b)) / (H(a) + H(b))`` (0.5 for square plans with
uniform marginals), reached by a deterministic map.
"""

from __future__ import annotations

import torch


def _entropy(p: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Shannon entropy (nats) of non-negative masses over ``dims`` (0 log 0 = 0)."""
    p = p.clamp_min(0)
    return -(torch.where(p > 0, p * p.clamp_min(1e-38).log(), torch.zeros_like(p))).sum(dims)


def plan_entropies(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy of plans ``[..., n, m]`` and the two references, all ``[...]`` in nats.

    Returns:
        (H(T), H(a) + H(b), max(H(a), H(b))) with a, b the plan's row and column sums (zero rows
        or columns, e.g. padding, drop out): the entropy of the plan, of the uniform (independent)
        coupling a b^T of the same marginals - the largest any such plan has - and the smallest
        any such plan can have (a deterministic map).
    """
    total = plan.sum((-2, -1), keepdim=True).clamp_min(1e-38)
    p = plan / total  # entropies of the plan as a distribution over pairs
    h = _entropy(p, (-2, -1))
    ha, hb = _entropy(p.sum(-1), (-1,)), _entropy(p.sum(-2), (-1,))
    return h, ha + hb, torch.maximum(ha, hb)


def plan_entropy_ratio(plan: torch.Tensor) -> torch.Tensor:
    """``H(T) / H(a b^T)`` per plan ``[..., n, m] -> [...]``: 1.0 for the uniform coupling (the OT
    does nothing), down to ``max(H(a), H(b)) / (H(a) + H(b))`` (0.5 for square uniform marginals)
    for a deterministic plan. 1.0 for 1 x 1 plans."""
    h, h_uniform, _ = plan_entropies(plan)
    return torch.where(h_uniform > 0, h / h_uniform.clamp_min(1e-38), torch.ones_like(h))


def _xlogx_sum(p: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(p, p).sum(-1)


def entropy_ratio_from_potentials(
    plan: torch.Tensor,
    cost: torch.Tensor,
    log_u: torch.Tensor,
    log_v: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """:func:`plan_entropy_ratio` of Sinkhorn plans ``[..., n, m]`` without a log per entry.

    A Sinkhorn plan is ``T_ij = u_i exp(-C_ij / eps) v_j``, so ``sum T log T = <r, log u> +
    <c, log v> - <T, C> / eps`` with ``r, c`` its row and column sums: the plan's entropy needs only
    its marginals, the scalings and the transport cost (``SinkhornResult.cost``), not a
    logarithm of every entry. Same value as :func:`plan_entropy_ratio` up to float rounding.
    """
    r, c = plan.sum(-1), plan.sum(-2)
    total = r.sum(-1).clamp_min(1e-38)
    t_log_t = (
        torch.where(r > 0, r * log_u, torch.zeros_like(r)).sum(-1)
        + torch.where(c > 0, c * log_v, torch.zeros_like(c)).sum(-1)
        - cost / eps
    )
    h = -t_log_t / total + total.log()  # entropy of T / total
    qa, qb = r / total.unsqueeze(-1), c / total.unsqueeze(-1)
    h_uniform = -_xlogx_sum(qa) - _xlogx_sum(qb)
    return torch.where(h_uniform > 0, h / h_uniform.clamp_min(1e-38), torch.ones_like(h))
