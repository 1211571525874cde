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
from torch import nn

from ..backbone.clip import VisionPromptPosition
from ..registry import METHODS
from .base import MethodConfig, MethodOutput, OptimPreset, PromptMethod, cosine_logits
from .prompts import build_class_prompts, normal_init, phrase_init, remaining_words
from .vpt import check_depth


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
    optim: OptimPreset = OptimPreset(lr=0.0035, batch_size=4, epochs=5)
    PRESETS = {
        # cross-dataset / domain-generalisation setting of the paper
        "cross_dataset": {"depth": 3, "optim": {"lr": 0.0026, "epochs": 2}},
    }


class CoupledPrompts(nn.Module):
    """Text prompts per layer and the Linear maps that turn them into visual prompts (MaPLe
    coupling). Shared by MaPLe and ALIGN; ``sets`` > 1 gives one prompt set per mode."""

    def __init__(self, backbone, n_ctx: int, depth: int, ctx_init: str, sets: int = 1, init_sets: int = 1):
        super().__init__()
        check_depth(depth, backbone.text_layers, "text prompt")
        check_depth(depth, backbone.vision_layers, "visual prompt")
        Wt, Wv = backbone.text_width, backbone.vision_width
        ctx = normal_init(sets, n_ctx, Wt)
        self.suffix = ""
        if ctx_init:
            ctx[:init_sets] = phrase_init(backbone, ctx_init, n_ctx)
            self.suffix = remaining_words(backbone, ctx_init, n_ctx)
        self.ctx = nn.Parameter(ctx)  # [S, n, Wt]
        self.deep_ctx = nn.Parameter(normal_init(depth - 1, sets, n_ctx, Wt))  # [depth-1, S, n, Wt]
        self.proj = nn.Linear(Wt, Wv)  # layer 0
        self.deep_proj = nn.ModuleList(nn.Linear(Wt, Wv) for _ in range(depth - 1))

    def text(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.ctx, list(self.deep_ctx.unbind(0))

    def visual(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Visual prompts ``[S, n, Wv]`` and deep ones, each Linear_l of the text prompt."""
        return self.proj(self.ctx), [p(d) for p, d in zip(self.deep_proj, self.deep_ctx.unbind(0))]


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
        p = build_class_prompts(self.backbone, self.classnames, self.config.n_ctx, template=template)
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
