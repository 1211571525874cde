"""VPT: learnable visual prompt tokens, text prompts fixed.

Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim. "Visual Prompt Tuning", ECCV 2022,
arXiv 2203.12119, in the CLIP form used by the MaPLe code base: tokens appended after the patches
(before ln_pre), replaced before each layer < depth in the deep variant (depth 1 = shallow).
Text side fixed: "a photo of a {class}.".
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
from .prompts import check_depth, normal_init


@dataclass(frozen=True)
class VPTConfig(MethodConfig):
    """Attributes:
    n_tokens: visual prompt tokens.
    depth: layers receiving prompts (1 = shallow VPT; MaPLe repo's deep VPT uses 12).
    position: "after_patches" or "after_cls".
    template: fixed text template.
    """

    n_tokens: int = 8
    depth: int = 12
    position: VisionPromptPosition = "after_patches"
    template: str = "a photo of a {}."
    optim: OptimConfig = OptimConfig(lr=0.0025, batch_size=4, epochs=5)
    TOWER_DEPTHS = {"depth": ("vision",)}


@METHODS.register("vpt")
class VPT(PromptMethod):
    config_class = VPTConfig
    class_side_trainable = False

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        depth = check_depth(cfg.depth, backbone.vision_layers, "visual prompt")
        W = backbone.vision_width
        self.prompts = nn.Parameter(normal_init(cfg.n_tokens, W))  # [n, Wv]
        self.deep_prompts = nn.Parameter(
            normal_init(depth - 1, cfg.n_tokens, W)
        )  # [depth-1, n, Wv]
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        toks = self.backbone.tokenize([self.config.template.format(c) for c in self.classnames])
        self.register_buffer("tokens", toks, persistent=False)

    def encode_classes(self) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.backbone.encode_text(self.tokens), dim=-1)  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        out = self.backbone.forward_image(
            images,
            self.prompts,
            deep=list(self.deep_prompts.unbind(0)),
            position=self.config.position,
        )
        img = F.normalize(out.pooled, dim=-1)
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
