"""Scoring heads: how image features and class features become logits, as reusable pieces.

A method picks a head (its "scorer" role) instead of writing the scoring itself, so e.g. PLOT's OT
over prompt sets can score another method's prompts. Every head returns ``(logits [B, K],
extras)``, logits already multiplied by the logit scale, extras a dict of scalar diagnostics. The
OT heads are built once from their OT options (:mod:`promptalign.ot`) and also recompute their
plans for :mod:`promptalign.explain` (``plans``), with the same solver.

* :func:`cosine_logits`: ``scale * cos(image, class)`` (CLIP; CoOp, MaPLe, ...).
* :class:`PromptSetOTHead`: optimal transport between M image features and N class features per
  class (PLOT, Chen et al., ICLR 2023, https://github.com/CHENGY12/PLOT): cost ``1 - cos``, uniform
  marginals (or KL-relaxed ones with ``tau``), Sinkhorn with the plan constant in backward,
  ``logit = scale * <T, cos>``.
* :class:`HierarchicalOTHead`: prompt-level OT whose cost includes a token-level OT (ALIGN, Wang
  et al., NeurIPS 2023, https://github.com/wds2014/ALIGN), computed by
  :class:`promptalign.ot.HierarchicalOT`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..ot import HierarchicalOT, SinkhornOptions, SinkhornResult, plan_entropy_ratio
from .explainable import ExplainFeatures

Extras = dict[str, torch.Tensor]


def normalize_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of L2-normalised vectors over ``dim``, renormalised (prompt-set / template ensemble)."""
    return F.normalize(F.normalize(x, dim=-1).mean(dim), dim=-1)


def cosine_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * cos``: image ``[B, D]`` with text ``[K, D]`` or per image ``[B, K, D]``.

    Returns ``[B, K]``."""
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    if text.dim() == 3:
        return scale * torch.einsum("bd,bkd->bk", image, text)
    return scale * image @ text.t()


class PromptSetOTHead:
    """OT between the M L2-normalised image features ``[B, M, D]`` and the N L2-normalised
    features of each class ``[N, K, D]`` (PLOT), with the Sinkhorn ``options`` of that one level.
    Extras: ``ot_converged`` (fraction), ``ot_iters`` (mean), ``ot_entropy`` (mean plan entropy
    ratio, 1.0 = uniform)."""

    scorer = "prompt_set_ot"

    def __init__(self, options: SinkhornOptions):
        self.ot = options

    @property
    def options(self) -> dict[str, Any]:
        return self.ot.to_dict()

    def _transport(
        self, sim: torch.Tensor, scale: torch.Tensor
    ) -> tuple[SinkhornResult, torch.Tensor]:
        """Plans of cosines ``sim [B, K, M, N]`` and their logits ``scale * <T, sim>``."""
        ot = self.ot.solve(1.0 - sim)
        return ot, scale * (ot.plan * sim).sum((-2, -1))  # plan constant in backward

    def __call__(
        self, image: torch.Tensor, classes: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, Extras]:
        sim = torch.einsum("bmd,nkd->bkmn", image, classes)  # [B, K, M, N]
        ot, logits = self._transport(sim, scale)
        extras = {
            "ot_converged": ot.converged.float().mean().detach(),
            "ot_iters": ot.n_iter.float().mean(),
            "ot_entropy": plan_entropy_ratio(ot.plan.detach()).mean(),  # 1.0 = uniform plan
        }
        return logits, extras

    def plans(self, feats: ExplainFeatures, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The plans ``[B, k, M, N]``, cosines and logits ``[B, k]`` of ``classes`` (indices)
        from the scored features (``image_global [B, M, D]``, ``text_global [K, N, D]``)."""
        img = F.normalize(feats.image_global.float(), dim=-1)  # [B, M, D]
        txt = F.normalize(feats.text_global[classes].float(), dim=-1)  # [k, N, D]
        sim = torch.einsum("bmd,knd->bkmn", img, txt)  # [B, k, M, N]
        ot, logits = self._transport(sim, feats.logit_scale)
        return {
            "plan": ot.plan,
            "global_sim": sim,
            "cost": 1.0 - sim,
            "logits": logits,
            "logit_global": feats.logit_scale * ot.plan * sim,
            "logit_token": torch.zeros_like(sim),
        }


class HierarchicalOTHead:
    """ALIGN's score: image ``pooled [B, M, D]`` + ``tokens [B, M, J, D]`` against class
    ``global [K, N, D]`` + ``tokens [K, N, L, D]`` with ``mask [K, N, L]``, by the hierarchical
    ``solver``. Extras: token- and prompt-level convergence and entropy, and the mean
    token-level iterations."""

    scorer = "hierarchical_ot"

    def __init__(self, solver: HierarchicalOT):
        self.solver = solver

    @property
    def options(self) -> dict[str, Any]:
        return self.solver.to_kwargs()

    def __call__(
        self,
        image_pooled: torch.Tensor,
        image_tokens: torch.Tensor,
        classes: dict[str, torch.Tensor],
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, Extras]:
        res = self.solver(
            image_pooled, image_tokens, classes["global"], classes["tokens"], classes["mask"]
        )
        extras = {
            "ot_token_converged": res.token_stats.converged.detach(),
            "ot_prompt_converged": res.prompt_stats.converged.detach(),
            "ot_token_iters": res.token_stats.mean_iter.detach(),
            "ot_token_entropy": res.token_stats.mean_entropy.detach(),  # 1.0 = uniform plans
            "ot_prompt_entropy": res.prompt_stats.mean_entropy.detach(),
        }
        return scale * res.score, extras

    def plans(self, feats: ExplainFeatures, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both levels' plans for ``classes`` (indices): token plans ``[B, k, M, N, J, L]`` and
        the token cosines' mass per text token ``[B, k, M, N, L]``, prompt plans, cost parts and
        their logit shares ``[B, k, M, N]``, logits ``[B, k]``."""
        res = self.solver(
            feats.image_global,
            feats.image_tokens,
            feats.text_global[classes],
            feats.text_tokens[classes],
            feats.text_mask[classes],
            plans=True,
        )
        scale, plan = feats.logit_scale, res.prompt_plan
        if self.solver.form == "paper":
            token_term = res.token_distance
            logit_token = -scale * self.solver.beta * plan * res.token_distance
        else:  # the released form's token term moves the plan only
            token_term = res.token_similarity
            logit_token = torch.zeros_like(res.prompt_cost)
        return {
            "plan": plan,
            "token_plans": res.token_plan,
            "global_sim": res.global_sim,
            "token_sim_mass": (res.token_plan * res.token_sim).sum(-2),  # [B, k, M, N, L]
            "token_term": token_term,
            "cost": res.prompt_cost,
            "logits": scale * res.score,
            "logit_global": scale * plan * res.global_sim,
            "logit_token": logit_token,
        }
