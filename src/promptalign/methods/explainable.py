"""What a method exposes so its scores can be explained, and the plan statistics it logs.

Methods that score with optimal transport (PLOT, ALIGN) implement an ``explain_features(images)``
hook returning :class:`ExplainFeatures`: the features and the exact scorer options their forward
uses, so :mod:`promptalign.explain` can recompute the transport plans (prompt level, and token
level for the hierarchical OT) and decompose the logits without the method keeping any plan.
Methods without the hook are explained from their image-tower tokens and class features (cosine
of each patch with the class feature).

:func:`plan_entropy_ratio` answers "is the plan uniform?": the entropy of a plan divided by the
entropy of the independent (uniform) coupling of its marginals, 1.0 = uniform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..ot.entropy import plan_entropies, plan_entropy_ratio

__all__ = ["ExplainFeatures", "Scorer", "plan_entropies", "plan_entropy_ratio"]

Scorer = Literal["hierarchical_ot", "prompt_set_ot"]


@dataclass
class ExplainFeatures:
    """Inputs of a method's OT scorer for a batch of images and all current classes.

    Attributes:
        scorer: "prompt_set_ot" (OT between M image and N class features, PLOT) or
            "hierarchical_ot" (prompt-level OT whose cost includes a token-level OT, ALIGN).
        image_global: ``[B, M, D]`` global image feature per visual prompt set.
        text_global: ``[K, N, D]`` global class feature per text prompt set.
        options: the scorer's keyword options exactly as the method passes them
            (``promptalign.ot.sinkhorn`` for "prompt_set_ot", ``promptalign.ot.hierarchical_ot``
            for "hierarchical_ot"); absent keys take those functions' defaults.
        logit_scale: the multiplier turning scores into logits.
        image_tokens: ``[B, M, J, D]`` image tokens (patches + visual prompt tokens), projected.
        prompt_slice: where the visual prompt tokens sit among the J tokens.
        text_tokens: ``[K, N, L, D]`` text tokens of every class prompt, projected.
        text_mask: ``[K, N, L]`` True for the tokens that take part in the token-level OT.
        text_ids: ``[K, N, L]`` token ids of ``text_tokens`` (for readable labels).
        context_slots: ``[K, N, L]`` True where a learnable context vector sits.
        extra_logits: ``[B, K]`` logit part the method adds outside the OT (None: none).
    """

    scorer: Scorer
    image_global: torch.Tensor
    text_global: torch.Tensor
    options: dict[str, Any]
    logit_scale: torch.Tensor
    image_tokens: torch.Tensor | None = None
    prompt_slice: slice | None = None
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    context_slots: torch.Tensor | None = None
    extra_logits: torch.Tensor | None = None
    notes: dict[str, Any] = field(default_factory=dict)
