"""CoOp: learnable context vectors in front of (or around) the class name.

Zhou, Yang, Loy, Liu. "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv 2109.01134, https://github.com/KaiyangZhou/CoOp. Prompt = [SOS][ctx][class tokens][.][EOT],
context shared by all classes (unified) or one per class (CSC), class token at the end, middle or
front. The image tower is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OptimConfig
from ..registry import METHODS
from .base import MethodConfig, MethodOutput, PromptMethod, cosine_logits
from .prompts import ClassPosition, build_class_prompts, normal_init, phrase_init

COOP_OPTIM = OptimConfig(
    lr=0.002, batch_size=32, epochs=50, epochs_by_shots=((1, 50), (4, 100), (16, 200))
)


@dataclass(frozen=True)
class CoOpConfig(MethodConfig):
    """Attributes:
    n_ctx: context tokens (ignored when ``ctx_init`` is given: its token count is used).
    ctx_init: phrase whose word embeddings initialise the context ("" = N(0, 0.02)).
    csc: class-specific context (one context per class; cannot move to new classes).
    class_token_position: "end", "middle" or "front".
    """

    n_ctx: int = 16
    ctx_init: str = ""
    csc: bool = False
    class_token_position: ClassPosition = "end"
    optim: OptimConfig = COOP_OPTIM


@METHODS.register("coop")
class CoOp(PromptMethod):
    config_class = CoOpConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        width = backbone.text_width
        if cfg.ctx_init:
            self.n_ctx = backbone.token_count(cfg.ctx_init)
            init = phrase_init(backbone, cfg.ctx_init, self.n_ctx)  # [n, W]
            ctx = init.unsqueeze(0).repeat(self.num_classes, 1, 1) if cfg.csc else init
        else:
            self.n_ctx = cfg.n_ctx
            shape = (self.num_classes, self.n_ctx, width) if cfg.csc else (self.n_ctx, width)
            ctx = normal_init(*shape)
        self.ctx = nn.Parameter(ctx)  # [n, W] or [K, n, W]
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        if self.config.csc and self.ctx.shape[0] != self.num_classes:
            raise ValueError(
                f"class-specific context was learnt for {self.ctx.shape[0]} classes and cannot "
                f"score {self.num_classes} other classes; use csc=False to transfer to new classes"
            )
        p = build_class_prompts(
            self.backbone,
            self.classnames,
            self.n_ctx,
            class_position=self.config.class_token_position,
        )
        self.register_buffer("tokens", p.tokens, persistent=False)
        self.register_buffer("positions", p.positions, persistent=False)

    def encode_classes(self) -> torch.Tensor:
        out = self.backbone.forward_text(self.tokens, self.ctx, positions=self.positions)
        return F.normalize(out.pooled, dim=-1)  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        with torch.no_grad():
            img = F.normalize(self.backbone.encode_image(images), dim=-1)  # [B, D]
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
