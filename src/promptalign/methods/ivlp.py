"""IVLP: independent deep vision and language prompts (the MaPLe paper's baseline).

Khattak, Rasheed, Maaz, Khan, Khan. "MaPLe: Multi-modal Prompt Learning", CVPR 2023,
arXiv 2210.03117, https://github.com/muzairkhattak/multimodal-prompt-learning (IVLP trainer).
CoOp-style text context (initialised from the first tokens of "a photo of a", the rest kept as
literal text) and VPT-style visual prompts, both deep, with no coupling between them. With
``vision_depth = 0`` it is the text-only "deep language prompting" variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.clip import VisionPromptPosition
from ..config import OptimConfig
from ..registry import METHODS
from .base import MethodConfig, MethodOutput, PromptMethod, cosine_logits
from .prompts import build_class_prompts, check_depth, normal_init, phrase_init, remaining_words


@dataclass(frozen=True)
class IVLPConfig(MethodConfig):
    """Attributes:
    n_ctx_text, n_ctx_vision: prompt tokens per tower.
    text_depth, vision_depth: layers receiving prompts (vision_depth 0 = no visual prompts).
    ctx_init: phrase initialising the text context; its remaining words stay literal.
    position: visual prompt placement.
    """

    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    text_depth: int = 9
    vision_depth: int = 9
    ctx_init: str = "a photo of a"
    position: VisionPromptPosition = "after_patches"
    optim: OptimConfig = OptimConfig(lr=0.0035, batch_size=4, epochs=5)
    TOWER_DEPTHS = {"text_depth": ("text",), "vision_depth": ("vision",)}


@METHODS.register("ivlp")
class IVLP(PromptMethod):
    config_class = IVLPConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        text_depth = check_depth(cfg.text_depth, backbone.text_layers, "text prompt")
        Wt, Wv = backbone.text_width, backbone.vision_width
        if cfg.ctx_init:
            ctx = phrase_init(backbone, cfg.ctx_init, cfg.n_ctx_text)
            self.suffix = remaining_words(backbone, cfg.ctx_init, cfg.n_ctx_text)
        else:
            ctx, self.suffix = normal_init(cfg.n_ctx_text, Wt), ""
        self.ctx = nn.Parameter(ctx)  # [n_t, Wt]
        self.deep_ctx = nn.Parameter(normal_init(text_depth - 1, cfg.n_ctx_text, Wt))
        if cfg.vision_depth > 0:
            vision_depth = check_depth(cfg.vision_depth, backbone.vision_layers, "visual prompt")
            self.visual = nn.Parameter(normal_init(cfg.n_ctx_vision, Wv))  # [n_v, Wv]
            self.deep_visual = nn.Parameter(normal_init(vision_depth - 1, cfg.n_ctx_vision, Wv))
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        template = f"{self.suffix} {{}}." if self.suffix else "{}."
        p = build_class_prompts(
            self.backbone, self.classnames, self.config.n_ctx_text, template=template
        )
        self.register_buffer("tokens", p.tokens, persistent=False)

    def encode_classes(self) -> torch.Tensor:
        out = self.backbone.forward_text(self.tokens, self.ctx, deep=list(self.deep_ctx.unbind(0)))
        return F.normalize(out.pooled, dim=-1)

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        if self.config.vision_depth > 0:
            out = self.backbone.forward_image(
                images,
                self.visual,
                deep=list(self.deep_visual.unbind(0)),
                position=self.config.position,
            )
            img = F.normalize(out.pooled, dim=-1)
        else:
            with torch.no_grad():
                img = F.normalize(self.backbone.encode_image(images), dim=-1)
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
