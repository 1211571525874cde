"""UPT: one unified prompt shared by both modalities through a small transformer.

Zang, Li, Zhou, Huang, Loy. "Unified Vision and Language Prompt Learning", arXiv 2210.07225,
https://github.com/yuhangzang/UPT. A unified prompt of 2 x n_ctx tokens (text width, random init)
goes through one transformer layer (single-head self-attention + feed-forward of the same width,
layer norms, dropout 0.1); the first n_ctx outputs are the CoOp text context, the rest pass through
Linear(text width -> vision width) and become shallow visual prompts between CLS and the patches.

Deviation from the released code, on purpose: there the attention receives the tokens on the
batch axis, so tokens never attend to each other. Here the prompt is one sequence and its tokens
really mix (tested).
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
from .prompts import build_class_prompts, normal_init


@dataclass(frozen=True)
class UPTConfig(MethodConfig):
    """Attributes:
    n_ctx: text context tokens; the unified prompt has 2 * n_ctx tokens.
    dropout: dropout of the prompt transformer.
    position: visual prompt placement ("after_cls" in UPT).
    """

    n_ctx: int = 4
    dropout: float = 0.1
    position: VisionPromptPosition = "after_cls"
    optim: OptimConfig = OptimConfig(lr=0.002, batch_size=32, epochs=200)


@METHODS.register("upt")
class UPT(PromptMethod):
    config_class = UPTConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        Wt, Wv = backbone.text_width, backbone.vision_width
        self.unified = nn.Parameter(normal_init(2 * cfg.n_ctx, Wt))  # [2n, Wt]
        self.mixer = nn.TransformerEncoderLayer(
            d_model=Wt, nhead=1, dim_feedforward=Wt, dropout=cfg.dropout, batch_first=True
        )
        self.to_visual = nn.Linear(Wt, Wv)
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        p = build_class_prompts(self.backbone, self.classnames, self.config.n_ctx)
        self.register_buffer("tokens", p.tokens, persistent=False)

    def mixed_prompt(self) -> torch.Tensor:
        """The unified prompt after the transformer layer: 2n tokens mixed. ``[2n, Wt]``"""
        return self.mixer(self.unified.unsqueeze(0))[0]

    def encode_classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        # one pass through the mixer feeds both towers (same dropout mask in training)
        mixed = self.mixed_prompt()
        text = self.backbone.forward_text(self.tokens, mixed[: self.config.n_ctx]).pooled
        return F.normalize(text, dim=-1), mixed

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        classes, mixed = classes
        visual = self.to_visual(mixed[self.config.n_ctx :])  # [n, Wv]
        out = self.backbone.forward_image(images, visual, position=self.config.position)
        img = F.normalize(out.pooled, dim=-1)
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
