"""Optimal transport for prompt learning: batched Sinkhorn and ALIGN's hierarchical OT.

Pure torch (an optional Triton kernel is used on CUDA when available); imports nothing else from
promptalign.
"""

from .entropy import plan_entropies, plan_entropy_ratio
from .hierarchical import (
    HierarchicalOTResult,
    OTStats,
    class_chunk_size,
    hierarchical_ot,
    lengths_to_mask,
)
from .sinkhorn import SinkhornResult, auto_domain, sinkhorn

__all__ = [
    "HierarchicalOTResult",
    "OTStats",
    "SinkhornResult",
    "auto_domain",
    "class_chunk_size",
    "hierarchical_ot",
    "lengths_to_mask",
    "plan_entropies",
    "plan_entropy_ratio",
    "sinkhorn",
]
