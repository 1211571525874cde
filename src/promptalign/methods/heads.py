"""Scoring heads: how image features and class features become logits, as reusable pieces.

A method picks a head (its "scorer" role) instead of writing the scoring itself, so e.g. PLOT's OT
over prompt sets can score another method's prompts. Every head returns ``(logits [B, K],
extras)``, logits already multiplied by the logit scale, extras a dict of scalar diagnostics.

* :class:`CosineHead`: ``scale * cos(image, class)`` (CLIP; CoOp, MaPLe, ...).
* :class:`PromptSetOTHead`: optimal transport between M image features and N class features per
  class (PLOT, Chen et al., ICLR 2023, https://github.com/CHENGY12/PLOT): cost ``1 - cos``, uniform
  marginals, Sinkhorn with the plan constant in backward, ``logit = scale * <T, cos>``.
* :class:`HierarchicalOTHead`: prompt-level OT whose cost includes a token-level OT (ALIGN, Wang
  et al., NeurIPS 2023, https://github.com/wds2014/ALIGN), computed by
  :func:`promptalign.ot.hierarchical_ot`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..ot import hierarchical_ot, sinkhorn
from .explainable import plan_entropy_ratio

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


class CosineHead:
    """``scale * cos``; image ``[B, D]``, classes ``[K, D]`` or per image ``[B, K, D]``."""

    def __call__(
        self, image: torch.Tensor, classes: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, Extras]:
        return cosine_logits(image, classes, scale), {}


class PromptSetOTHead:
    """OT between the M L2-normalised image features ``[B, M, D]`` and the N L2-normalised
    features of each class ``[N, K, D]`` (PLOT). Extras: ``ot_converged`` (fraction),
    ``ot_iters`` (mean)."""

    def __init__(self, eps: float = 0.1, max_iter: int = 100, tol: float = 1e-2):
        self.eps, self.max_iter, self.tol = eps, max_iter, tol

    def __call__(
        self, image: torch.Tensor, classes: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, Extras]:
        sim = torch.einsum("bmd,nkd->bkmn", image, classes)  # [B, K, M, N]
        # the OT module picks the domain (kernel for cosine costs at eps >= 0.05, else log)
        ot = sinkhorn(1.0 - sim, eps=self.eps, max_iter=self.max_iter, tol=self.tol, domain="auto")
        logits = scale * (ot.plan * sim).sum((-2, -1))  # plan constant in backward
        extras = {
            "ot_converged": ot.converged.float().mean().detach(),
            "ot_iters": ot.n_iter.float().mean(),
            "ot_entropy": plan_entropy_ratio(ot.plan.detach()).mean(),  # 1.0 = uniform plan
        }
        return logits, extras


class HierarchicalOTHead:
    """ALIGN's score: image ``pooled [B, M, D]`` + ``tokens [B, M, J, D]`` against class
    ``global [K, N, D]`` + ``tokens [K, N, L, D]`` with ``mask [K, N, L]``. Extras: token- and
    prompt-level convergence and the mean token-level iterations."""

    def __init__(
        self,
        *,
        beta: float = 1.0,
        eps: float = 0.1,
        eps_token: float | None = None,
        max_iter: int = 100,
        tol: float = 1e-3,
        form: Literal["paper", "released"] = "paper",
        domain: Literal["auto", "log", "kernel"] = "auto",
        memory_budget: int = 2 * 1024**3,
        backend: Literal["auto", "torch", "fused"] = "auto",
    ):
        self.options = dict(
            beta=beta,
            eps=eps,
            eps_token=eps_token,
            max_iter=max_iter,
            tol=tol,
            form=form,
            domain=domain,
            memory_budget=memory_budget,
            backend=backend,
        )

    def __call__(
        self,
        image_pooled: torch.Tensor,
        image_tokens: torch.Tensor,
        classes: dict[str, torch.Tensor],
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, Extras]:
        res = hierarchical_ot(
            image_pooled,
            image_tokens,
            classes["global"],
            classes["tokens"],
            classes["mask"],
            **self.options,
        )
        extras = {
            "ot_token_converged": res.token_stats.converged.detach(),
            "ot_prompt_converged": res.prompt_stats.converged.detach(),
            "ot_token_iters": res.token_stats.mean_iter.detach(),
            "ot_token_entropy": res.token_stats.mean_entropy.detach(),  # 1.0 = uniform plans
            "ot_prompt_entropy": res.prompt_stats.mean_entropy.detach(),
        }
        return scale * res.score, extras
