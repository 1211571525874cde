"""MaPLe: multi-modal prompt learning with vision prompts coupled to language prompts.

Khattak, Rasheed, Maaz, Khan, Khan. "MaPLe: Multi-modal Prompt Learning", CVPR 2023,
arXiv 2210.03117, https://github.com/muzairkhattak/multimodal-prompt-learning. Text prompts of b
tokens at positions 1..b (initialised from the first b tokens of "a photo of a"; the rest of the
phrase stays literal text) and deep text prompts for layers 1..depth-1; the visual prompt of each
layer is Linear_l(text prompt of that layer) (text width -> vision width), appended after the
patches before ln_pre and replacing those slots at deeper layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..backbone.clip import VisionPromptPosition
from ..config import OptimConfig
from ..registry import METHODS
from .base import MethodConfig, MethodOutput, PromptMethod, cosine_logits
from .prompts import CoupledPrompts, build_class_prompts


@dataclass(frozen=True)
class MaPLeConfig(MethodConfig):
    """Attributes:
    n_ctx: prompt tokens b (both towers).
    depth: prompt depth (layers 0..depth-1 of both towers).
    ctx_init: phrase initialising the first-layer text prompt.
    position: visual prompt placement.
    """

    n_ctx: int = 2
    depth: int = 9
    ctx_init: str = "a photo of a"
    position: VisionPromptPosition = "after_patches"
    optim: OptimConfig = OptimConfig(lr=0.0035, batch_size=4, epochs=5)
    TOWER_DEPTHS = {"depth": ("text", "vision")}  # coupled prompts: the shallower tower
    PRESETS = {
        # cross-dataset / domain-generalisation setting of the paper
        "cross_dataset": {"depth": 3, "optim": {"lr": 0.0026, "epochs": 2}},
    }


@METHODS.register("maple")
class MaPLe(PromptMethod):
    config_class = MaPLeConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.prompts = CoupledPrompts(backbone, cfg.n_ctx, cfg.depth, cfg.ctx_init)
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        suffix = self.prompts.suffix
        template = f"{suffix} {{}}." if suffix else "{}."
        p = build_class_prompts(
            self.backbone, self.classnames, self.config.n_ctx, template=template
        )
        self.register_buffer("tokens", p.tokens, persistent=False)

    def encode_classes(self) -> torch.Tensor:
        ctx, deep = self.prompts.text()
        out = self.backbone.forward_text(self.tokens, ctx[0], deep=[d[0] for d in deep])
        return F.normalize(out.pooled, dim=-1)  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        vis, vdeep = self.prompts.visual()
        out = self.backbone.forward_image(
            images, vis[0], deep=[d[0] for d in vdeep], position=self.config.position
        )
        img = F.normalize(out.pooled, dim=-1)
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
