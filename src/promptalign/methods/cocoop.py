"""CoCoOp: context conditioned on each image through a small meta-network.

Zhou, Yang, Loy, Liu. "Conditional Prompt Learning for Vision-Language Models", CVPR 2022,
arXiv 2203.05557, https://github.com/KaiyangZhou/CoOp. Meta-net Linear(D -> D/16) -> ReLU ->
Linear(-> text width) on the normalised image feature; its output is added to every context token,
so each image has its own prompts and the text tower runs B x K sequences. The original trains
with batch size 1; here the whole batch is encoded at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OptimConfig
from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    cosine_logits,
    normalize_mean,
)
from .prompts import build_class_prompts, normal_init, phrase_init


@dataclass(frozen=True)
class CoCoOpConfig(MethodConfig):
    """Attributes:
    n_ctx: context tokens (``ctx_init``'s token count when given).
    ctx_init: initialisation phrase ("" = N(0, 0.02)).
    meta_reduction: hidden width of the meta-net is D // meta_reduction.
    """

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    meta_reduction: int = 16
    optim: OptimConfig = OptimConfig(lr=0.002, batch_size=1, epochs=10)


@METHODS.register("cocoop")
class CoCoOp(PromptMethod):
    config_class = CoCoOpConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        if cfg.ctx_init:
            self.n_ctx = backbone.token_count(cfg.ctx_init)
            ctx = phrase_init(backbone, cfg.ctx_init, self.n_ctx)
        else:
            self.n_ctx = cfg.n_ctx
            ctx = normal_init(self.n_ctx, backbone.text_width)
        self.ctx = nn.Parameter(ctx)  # [n, W]
        d = backbone.embed_dim
        hidden = max(1, d // cfg.meta_reduction)
        self.meta_net = nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, backbone.text_width)
        )
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        p = build_class_prompts(self.backbone, self.classnames, self.n_ctx)
        self.register_buffer("tokens", p.tokens, persistent=False)
        self.register_buffer("positions", p.positions, persistent=False)

    def encode_classes(self) -> None:
        return None  # the class side depends on the image: computed in forward_with_text

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        with torch.no_grad():
            img = F.normalize(self.backbone.encode_image(images), dim=-1)  # [B, D]
        bias = self.meta_net(img)  # [B, W]
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # [B, n, W]
        out = self.backbone.forward_text(
            self.tokens.unsqueeze(0), ctx.unsqueeze(1), positions=self.positions
        )  # tokens [1, K, T] x ctx [B, 1, n, W] -> pooled [B, K, D]
        text = F.normalize(out.pooled, dim=-1)
        logits = cosine_logits(img, text, self.backbone.logit_scale)
        return MethodOutput(logits, img, normalize_mean(text, dim=0))
