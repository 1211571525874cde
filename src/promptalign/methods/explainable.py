"""What a method's forward hands to :mod:`promptalign.explain`, and the plan statistics it logs.

Methods that score with an optimal-transport head (PLOT, ALIGN) attach :class:`ExplainFeatures`
to every :class:`~promptalign.methods.base.MethodOutput` they return: the head that scored and the
exact inputs it scored, so ``explain`` asks that head to recompute the transport plans (prompt
level, and token level for the hierarchical OT) for the classes it shows and decomposes the logits
without the method keeping any plan or a second forward. They mix in :class:`ExplainsOT`, whose
``explain_features(images)`` runs the one forward and returns that record. Methods without it are
explained from their image-tower tokens and class features (cosine of each patch with the class
feature).

:func:`plan_entropy_ratio` answers "is the plan uniform?": the entropy of a plan divided by the
entropy of the independent (uniform) coupling of its marginals, 1.0 = uniform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ..ot.entropy import plan_entropies, plan_entropy_ratio

__all__ = [
    "ExplainFeatures",
    "ExplainsOT",
    "PlanHead",
    "Scorer",
    "plan_entropies",
    "plan_entropy_ratio",
]

Scorer = Literal["hierarchical_ot", "prompt_set_ot"]


class PlanHead(Protocol):
    """A scoring head that can recompute its transport plans (see :mod:`.heads`)."""

    scorer: Scorer

    @property
    def options(self) -> dict[str, Any]:
        """The head's OT settings as plain data (what a report shows)."""

    def plans(self, feats: ExplainFeatures, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plans, cost parts and logits of the images of ``feats`` for ``classes`` (indices)."""


@dataclass
class ExplainFeatures:
    """What an OT head scored for a batch of images and all current classes.

    Attributes:
        head: the head that scored; its :meth:`PlanHead.plans` recomputes the plans.
        image_global: ``[B, M, D]`` global image feature per visual prompt set.
        text_global: ``[K, N, D]`` global class feature per text prompt set.
        logit_scale: the multiplier turning scores into logits.
        image_tokens: ``[B, M, J, D]`` image tokens (patches + visual prompt tokens), projected
            (None when the forward did not ask the image tower for them; ``explain`` does).
        prompt_slice: where the visual prompt tokens sit among the J tokens.
        text_tokens: ``[K, N, L, D]`` text tokens of every class prompt, projected.
        text_mask: ``[K, N, L]`` True for the tokens that take part in the token-level OT.
        text_ids: ``[K, N, L]`` token ids of ``text_tokens`` (for readable labels).
        context_slots: ``[K, N, L]`` True where a learnable context vector sits.
        extra_logits: ``[B, K]`` logit part the method adds outside the OT (None: none).
    """

    head: PlanHead
    image_global: torch.Tensor
    text_global: torch.Tensor
    logit_scale: torch.Tensor
    image_tokens: torch.Tensor | None = None
    prompt_slice: slice | None = None
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    context_slots: torch.Tensor | None = None
    extra_logits: torch.Tensor | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def scorer(self) -> Scorer:
        """ "prompt_set_ot" (OT between M image and N class features, PLOT) or
        "hierarchical_ot" (prompt-level OT whose cost includes a token-level OT, ALIGN)."""
        return self.head.scorer

    @property
    def options(self) -> dict[str, Any]:
        """The head's OT settings (for the hierarchical OT: :func:`promptalign.ot.hierarchical_ot`
        keywords; for the prompt-set OT: :class:`promptalign.ot.SinkhornOptions` fields)."""
        return self.head.options


class ExplainsOT:
    """Mixin of methods whose forward scores with an OT head and attaches
    :class:`ExplainFeatures` to its output (``MethodOutput.explain``)."""

    def explain_features(self, images: torch.Tensor) -> ExplainFeatures:
        """The head and inputs the method's forward scores ``images`` with (one forward)."""
        out = self(images)  # type: ignore[operator]  # an nn.Module's call
        if out.explain is None:
            raise TypeError(f"{type(self).__name__}'s forward attached no ExplainFeatures")
        return out.explain
