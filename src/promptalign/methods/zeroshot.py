"""Zero-shot CLIP: hand-written prompt templates, no training.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
arXiv 2103.00020. A class is the (normalised) text feature of ``template.format(classname)``; with
several templates, the mean of their normalised features, renormalised (prompt ensembling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import OptimConfig
from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    cosine_logits,
)
from .prompts import check_templates, template_ensemble


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    """Attributes:
    template: prompt template with one "{}" for the class name (per-dataset in benchmarks).
    templates: an ensemble of templates; when given it replaces ``template``.
    """

    template: str = "a photo of a {}."
    templates: tuple[str, ...] = ()
    optim: OptimConfig = OptimConfig(epochs=0)


@METHODS.register("zeroshot")
class ZeroShotCLIP(PromptMethod):
    config_class = ZeroShotConfig
    class_side_trainable = False

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        check_templates(self.templates)

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self.config.templates) or (self.config.template,)

    def encode_classes(self) -> torch.Tensor:
        return template_ensemble(self.backbone, self.classnames, self.templates)  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        with torch.no_grad():
            img = torch.nn.functional.normalize(self.backbone.encode_image(images), dim=-1)
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
