"""Optimal transport for prompt learning: batched Sinkhorn (balanced and unbalanced) and ALIGN's
hierarchical OT, as option objects and solvers.

* :class:`SinkhornOptions` / :class:`TokenOptions`: one OT level's settings (frozen); their
  ``solve`` runs :func:`sinkhorn` or, with ``tau``, :func:`sinkhorn_unbalanced`.
* :class:`HierarchicalOT`: ALIGN's two-level solver built from the options of both levels;
  :func:`hierarchical_ot` is the same from keyword arguments.

Pure torch (an optional Triton kernel is used on CUDA when available); imports nothing else from
promptalign.
"""

from .entropy import plan_entropies, plan_entropy_ratio
from .hierarchical import (
    Form,
    HierarchicalOT,
    HierarchicalOTResult,
    OTStats,
    class_chunk_size,
    hierarchical_ot,
    lengths_to_mask,
)
from .options import Backend, SinkhornOptions, TokenOptions
from .sinkhorn import Domain, DomainChoice, GradMode, SinkhornResult, auto_domain, sinkhorn
from .unbalanced import sinkhorn_unbalanced

__all__ = [
    "Backend",
    "Domain",
    "DomainChoice",
    "Form",
    "GradMode",
    "HierarchicalOT",
    "HierarchicalOTResult",
    "OTStats",
    "SinkhornOptions",
    "SinkhornResult",
    "TokenOptions",
    "auto_domain",
    "class_chunk_size",
    "hierarchical_ot",
    "lengths_to_mask",
    "plan_entropies",
    "plan_entropy_ratio",
    "sinkhorn",
    "sinkhorn_unbalanced",
]
