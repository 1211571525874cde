"""Zero-shot CLIP: hand-written prompt templates, no training.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
arXiv 2103.00020. A class is the (normalised) text feature of ``template.format(classname)``; with
several templates, the mean of their normalised features, renormalised (prompt ensembling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    OptimPreset,
    PromptMethod,
    cosine_logits,
    normalize_mean,
)


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    """Attributes:
    template: prompt template with one "{}" for the class name (per-dataset in benchmarks).
    templates: an ensemble of templates; when given it replaces ``template``.
    """

    template: str = "a photo of a {}."
    templates: tuple[str, ...] = ()
    optim: OptimPreset = OptimPreset(epochs=0)


@METHODS.register("zeroshot")
class ZeroShotCLIP(PromptMethod):
    config_class = ZeroShotConfig
    class_side_trainable = False

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self.config.templates) or (self.config.template,)

    def encode_classes(self) -> torch.Tensor:
        texts = [t.format(c) for c in self.classnames for t in self.templates]
        with torch.no_grad():
            feats = self.backbone.encode_text(self.backbone.tokenize(texts))  # [K*T, D]
        return normalize_mean(
            feats.view(self.num_classes, len(self.templates), -1), dim=1
        )  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        with torch.no_grad():
            img = torch.nn.functional.normalize(self.backbone.encode_image(images), dim=-1)
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
