"""The options of one OT level, as one frozen object that also solves with them.

:class:`SinkhornOptions` holds everything a Sinkhorn solve of one level takes (regularisation,
limits, convergence-check schedule, domain, gradient mode, and the marginal relaxation ``tau``
that selects the unbalanced variant); :class:`TokenOptions` adds what only ALIGN's token level
has (the backend that computes it and how its classes are chunked). Methods build them once
from their config; solvers (:class:`~.hierarchical.HierarchicalOT`) and heads keep them and
pass them on as objects (the shape of ott-jax's solver objects and POT's ``ot.solve``).

Adding an OT variant: one file in this package with its solver (as :mod:`.unbalanced`), its
option here, and its branch in :meth:`SinkhornOptions.solve`.

This module imports nothing else from promptalign.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .sinkhorn import Domain, DomainChoice, GradMode, SinkhornResult, sinkhorn
from .unbalanced import sinkhorn_unbalanced

# how the token level of the hierarchical OT is computed: "auto" (the fused GEMM + Triton kernel
# wherever it can serve the call, else torch), "torch", or "fused" (an error where it cannot)
Backend = Literal["auto", "torch", "fused"]

_DOMAINS = ("auto", "log", "kernel")
_GRADS = ("envelope", "unrolled")
_BACKENDS = ("auto", "torch", "fused")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SinkhornOptions:
    """One OT level's solver settings.

    Attributes:
        eps: entropic regularisation (> 0).
        max_iter: iteration cap per problem (>= 1).
        tol: convergence threshold on the L1 marginal error (>= 0).
        domain: "log" (stable for any eps), "kernel" (faster) or "auto" (:func:`auto_domain`).
        check_every: iterations between convergence checks (each one host synchronisation).
        grad: "envelope" (plans constant in backward) or "unrolled".
        tau: strength of the KL relaxation of both marginals (unbalanced Sinkhorn,
            :func:`~.unbalanced.sinkhorn_unbalanced`; > 0); None = balanced (exact marginals).
    """

    eps: float = 0.1
    max_iter: int = 100
    tol: float = 1e-3
    domain: DomainChoice = "auto"
    check_every: int = 5
    grad: GradMode = "envelope"
    tau: float | None = None

    def __post_init__(self) -> None:
        _check(self.eps > 0, f"eps: {self.eps!r} must be > 0")
        _check(self.max_iter >= 1, f"max_iter: {self.max_iter!r} must be >= 1")
        _check(self.tol >= 0, f"tol: {self.tol!r} must be >= 0")
        _check(self.check_every >= 1, f"check_every: {self.check_every!r} must be >= 1")
        _check(
            self.domain in _DOMAINS,
            f"domain: {self.domain!r} unknown; use 'log', 'kernel' or 'auto'",
        )
        _check(self.grad in _GRADS, f"grad: {self.grad!r} unknown; use 'envelope' or 'unrolled'")
        _check(
            self.tau is None or self.tau > 0,
            f"tau: {self.tau!r} must be > 0 (or None for balanced OT)",
        )

    @property
    def balanced(self) -> bool:
        """True when both marginals are exact constraints (``tau`` is None)."""
        return self.tau is None

    def with_domain(self, domain: Domain) -> SinkhornOptions:
        """These options with ``domain`` wherever they say "auto" (an explicit domain stays)."""
        return self if self.domain != "auto" else dataclasses.replace(self, domain=domain)

    def solve(
        self,
        cost: torch.Tensor,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        *,
        mask_a: torch.Tensor | None = None,
        mask_b: torch.Tensor | None = None,
    ) -> SinkhornResult:
        """Solve a batch of problems ``cost [..., n, m]`` with these options (balanced
        :func:`~.sinkhorn.sinkhorn`, or :func:`~.unbalanced.sinkhorn_unbalanced` when ``tau`` is
        set); marginals and masks as in those functions."""
        kw = dict(
            eps=self.eps,
            max_iter=self.max_iter,
            tol=self.tol,
            domain=self.domain,
            grad=self.grad,
            mask_a=mask_a,
            mask_b=mask_b,
            check_every=self.check_every,
        )
        if self.tau is None:
            return sinkhorn(cost, a, b, **kw)
        return sinkhorn_unbalanced(cost, a, b, tau=self.tau, **kw)

    def to_dict(self) -> dict[str, Any]:
        """Every option as plain data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenOptions(SinkhornOptions):
    """The token level of the hierarchical OT: its Sinkhorn settings plus how it is computed.

    Attributes:
        backend: "auto" (the fused GEMM + Triton kernel on CUDA wherever it can serve the call:
            balanced, kernel domain, eps >= 0.03, envelope gradient; else torch), "torch", or
            "fused" (an error where it cannot serve the call, never a silent fallback).
        memory_budget: bytes the token level may use per chunk of classes (>= 1).
        class_chunk: classes per chunk instead of the budget's (results do not depend on it).
    """

    backend: Backend = "auto"
    memory_budget: int = 2 * 1024**3
    class_chunk: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.backend in _BACKENDS,
            f"backend {self.backend!r} unknown; use 'auto', 'torch' or 'fused'",
        )
        _check(self.memory_budget >= 1, f"memory_budget: {self.memory_budget!r} must be >= 1")
        _check(
            self.class_chunk is None or self.class_chunk >= 1,
            f"class_chunk: {self.class_chunk!r} must be >= 1 (or None)",
        )
