"""PLOT: prompt learning with optimal transport between local visual and textual features.

Chen, Yao, Zhang, Li, Zhou, Yu. "PLOT: Prompt Learning with Optimal Transport for
Vision-Language Models", ICLR 2023, arXiv 2210.01253, https://github.com/CHENGY12/PLOT.
N text prompt sets (CoOp context each); for ViT backbones the PLOT++ form: M visual prompt sets,
the image encoded once per set, whose M CLS outputs are the local visual features. Cost 1 - cos
between the M visual and N text features of a class, uniform marginals, Sinkhorn (eps 0.1, <= 100
iterations, tolerance 1e-2 on the marginal error) with the plan held constant in backward;
logit = logit_scale * <T, cos>. PLOT++ trains in two stages: ``stage="visual"`` trains the visual
prompts only, ``stage="joint"`` everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.clip import VisionPromptPosition
from ..ot import sinkhorn
from ..registry import METHODS
from .base import MethodConfig, MethodOutput, OptimPreset, PromptMethod, normalize_mean
from .explainable import ExplainFeatures, plan_entropy_ratio
from .prompts import build_class_prompts, normal_init
from .vpt import check_depth


@dataclass(frozen=True)
class PLOTConfig(MethodConfig):
    """Attributes:
        n_text_sets (N), n_ctx: text prompt sets and their context length.
        n_visual_sets (M), n_ctx_vision, vision_depth: visual prompt sets (PLOT++), tokens, depth.
        eps, max_iter, tol: Sinkhorn settings.
        stage: "joint" or "visual" (PLOT++ stage 1: text prompts frozen).
    """

    n_text_sets: int = 4
    n_ctx: int = 4
    n_visual_sets: int = 4
    n_ctx_vision: int = 4
    vision_depth: int = 1
    position: VisionPromptPosition = "after_patches"
    eps: float = 0.1
    max_iter: int = 100
    tol: float = 1e-2
    stage: Literal["joint", "visual"] = "joint"
    optim: OptimPreset = OptimPreset(lr=0.002, batch_size=32, epochs=50)


@METHODS.register("plot")
class PLOT(PromptMethod):
    config_class = PLOTConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        if cfg.stage not in ("joint", "visual"):
            raise ValueError(f"stage {cfg.stage!r} unknown; use 'joint' or 'visual'")
        check_depth(cfg.vision_depth, backbone.vision_layers, "visual prompt")
        Wt, Wv = backbone.text_width, backbone.vision_width
        self.ctx = nn.Parameter(normal_init(cfg.n_text_sets, cfg.n_ctx, Wt))  # [N, n, Wt]
        self.visual = nn.Parameter(normal_init(cfg.n_visual_sets, cfg.n_ctx_vision, Wv))  # [M, n_v, Wv]
        self.deep_visual = nn.Parameter(
            normal_init(cfg.vision_depth - 1, cfg.n_visual_sets, cfg.n_ctx_vision, Wv)
        )
        self.ctx.requires_grad_(cfg.stage == "joint")
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        p = build_class_prompts(self.backbone, self.classnames, self.config.n_ctx)
        self.register_buffer("tokens", p.tokens, persistent=False)

    def encode_classes(self) -> torch.Tensor:
        out = self.backbone.forward_text(self.tokens.unsqueeze(0), self.ctx.unsqueeze(1))
        return F.normalize(out.pooled, dim=-1)  # [N, K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        cfg = self.config
        out = self.backbone.forward_image(
            images, self.visual, deep=list(self.deep_visual.unbind(0)), position=cfg.position
        )
        img = F.normalize(out.pooled, dim=-1)  # [B, M, D]
        sim = torch.einsum("bmd,nkd->bkmn", img, classes)  # [B, K, M, N]
        ot = sinkhorn(1.0 - sim, eps=cfg.eps, max_iter=cfg.max_iter, tol=cfg.tol)
        logits = self.backbone.logit_scale * (ot.plan * sim).sum((-2, -1))  # plan constant
        extras = {"ot_converged": ot.converged.float().mean().detach(),
                  "ot_iters": ot.n_iter.float().mean(),
                  "ot_entropy": plan_entropy_ratio(ot.plan.detach()).mean()}
        return MethodOutput(logits, normalize_mean(img, 1), normalize_mean(classes, 0), extras)

    def explain_features(self, images: torch.Tensor) -> ExplainFeatures:
        """The features and Sinkhorn options :meth:`forward_with_text` scores with (for
        ``promptalign.explain``); image tokens too, for patch-level cosine maps."""
        cfg = self.config
        out = self.backbone.forward_image(
            images, self.visual, deep=list(self.deep_visual.unbind(0)), position=cfg.position,
            return_tokens=True,
        )
        return ExplainFeatures(
            "prompt_set_ot", out.pooled, self.class_features().transpose(0, 1),  # [K, N, D]
            options={"eps": cfg.eps, "max_iter": cfg.max_iter, "tol": cfg.tol},
            logit_scale=self.backbone.logit_scale, image_tokens=out.tokens,
            prompt_slice=out.prompt_slice,
        )
