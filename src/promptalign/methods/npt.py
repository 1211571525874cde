"""NPT: neural-collapse-inspired prompt tuning, a regulariser for any prompt method.

Zhu, Fan, Wang, Huang, Zhou, Liu, Zhou. "Understanding and Mitigating Miscalibration in Prompt
Tuning for Vision-Language Models" / "Neural Collapse Inspired Prompt Tuning", arXiv 2306.15955
(KDD 2024). No public code and no formulas were available: both terms below are implemented from
the paper's definitions, with weights as config fields.

The class text features and the image features should share one simplex equiangular tight frame
(ETF): K unit vectors with pairwise cosine -1/(K-1), i.e. Gram matrix
G* = K/(K-1) I - 1/(K-1) 11^T.

* language-modality collapse: ``text_weight * mean_(k,k') (t_k . t_k' - G*_kk')^2`` pulls the
  normalised class text features' Gram matrix toward the ETF Gram;
* multi-modality isomorphism: ``image_weight * mean_(i,k) (z_i . t_k - G*_(y_i, k))^2`` pulls each
  image feature onto the same ETF structure as the text feature of its class (its cosine profile
  over the classes should be the ETF row of its label).

An exact ETF needs embedding width D >= K - 1. For K - 1 > D, ``too_many_classes`` chooses:
"hinge" (default, documented fallback) penalises only off-diagonal cosines above -1/(K-1) (pairs
closer than the ETF angle), which is always attainable in direction; "error" refuses.

Use it as ``regularizers=("npt",)`` on any method, or as the method "npt" that wraps a base method
(MaPLe by default) and adds the regulariser.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..backbone import TowerDepths
from ..config import FieldError, OptimConfig
from ..registry import METHODS, REGULARIZERS
from .base import Batch, MethodConfig, MethodOutput, PromptMethod, Regularizer, create_method

log = logging.getLogger(__name__)


def etf_gram(k: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gram matrix of a K-vertex simplex ETF: 1 on the diagonal, -1/(K-1) elsewhere. ``[K, K]``"""
    if k < 2:
        raise ValueError("an ETF needs at least 2 classes")
    off = -1.0 / (k - 1)
    return torch.full((k, k), off, device=device, dtype=dtype).fill_diagonal_(1.0)


@REGULARIZERS.register("npt")
class NPTRegularizer(Regularizer):
    """The two NPT terms; see the module docstring."""

    def __init__(
        self,
        text_weight: float = 1.0,
        image_weight: float = 1.0,
        too_many_classes: Literal["hinge", "error"] = "hinge",
    ):
        super().__init__()
        if too_many_classes not in ("hinge", "error"):
            raise ValueError(
                f"too_many_classes {too_many_classes!r} unknown; use 'hinge' or 'error'"
            )
        self.text_weight = float(text_weight)
        self.image_weight = float(image_weight)
        self.too_many_classes = too_many_classes

    def forward(
        self, out: MethodOutput, batch: Batch, method: PromptMethod | None = None
    ) -> dict[str, torch.Tensor]:
        labels = batch.labels
        text = F.normalize(out.text_features, dim=-1)
        if text.dim() == 3:  # image-conditioned class features: average over the batch
            text = F.normalize(text.mean(0), dim=-1)
        K, D = text.shape
        if K < 2:
            return {}
        target = etf_gram(K, text.device, text.dtype)
        gram = text @ text.t()  # [K, K]
        hinge = K - 1 > D
        if hinge and self.too_many_classes == "error":
            raise ValueError(
                f"NPT: {K} classes need an embedding width >= {K - 1} for a simplex ETF, the "
                f"backbone has {D}; set too_many_classes='hinge' for the documented fallback"
            )
        diff = gram - target
        if hinge:
            off = ~torch.eye(K, dtype=torch.bool, device=text.device)
            diff = torch.where(off, diff.clamp_min(0.0), torch.zeros_like(diff))
        terms = {"npt_text": self.text_weight * diff.pow(2).mean()}
        img = F.normalize(out.image_features, dim=-1)  # [B, D]
        cos = img @ text.t()  # [B, K]
        row = target[labels]  # [B, K]: the ETF row of each image's class
        idiff = cos - row
        if hinge:
            own = F.one_hot(labels, K).bool()
            idiff = torch.where(own, idiff, idiff.clamp_min(0.0))
        terms["npt_image"] = self.image_weight * idiff.pow(2).mean()
        return terms


@dataclass(frozen=True)
class NPTConfig(MethodConfig):
    """Attributes:
    base: registered method NPT is applied to (the paper's is MaPLe; a name, resolved by
        the registry: this file imports no other method).
    base_options: config overrides of the base method.
    text_weight, image_weight, too_many_classes: the regulariser's options.
    optim: changes to the base method's published optimisation settings (None fields: the
        base method's values).
    """

    base: str = "maple"
    base_options: Mapping[str, Any] = field(default_factory=dict)
    text_weight: float = 1.0
    image_weight: float = 1.0
    too_many_classes: Literal["hinge", "error"] = "hinge"
    optim: OptimConfig = OptimConfig()

    def check(self) -> None:
        super().check()
        if self.base not in METHODS.names():
            raise FieldError(
                f"base: unknown method {self.base!r}; registered: {', '.join(METHODS.names())}"
            )
        if issubclass(METHODS.get(self.base).config_class, NPTConfig):
            raise FieldError(f"base: NPT cannot wrap itself ({self.base!r}); choose another method")

    def base_config(self) -> MethodConfig:
        """The wrapped method's config (its published defaults with ``base_options``)."""
        return METHODS.get(self.base).config_class.from_preset(**dict(self.base_options))

    def iteration_budget(self, shots: int | None) -> int | None:
        """The wrapped method's budget (NPT trains it on its own schedule)."""
        return self.base_config().iteration_budget(shots)

    def published_optim(self) -> OptimConfig:
        """The base method's published settings with NPT's own ``optim`` fields on top."""
        return self.base_config().published_optim().merged(self.optim)

    def resolved(
        self,
        template: str | None = None,
        dataset: str | None = None,
        towers: TowerDepths | Callable[[], TowerDepths] | None = None,
    ) -> NPTConfig:
        """``base_options`` spelled out as the base method's whole resolved config for
        ``dataset`` (the dataset's template reaches a base with a ``template`` field unless
        ``base_options`` or the base's released per-dataset settings set one; its prompt depths
        fitted to ``towers``), so the run record holds every setting of the wrapped method."""
        inner_cls = METHODS.get(self.base).config_class
        inner = inner_cls.for_run(
            None, self.base_options, dataset=dataset, template=template, towers=towers
        )
        return self.replace(base_options=inner.to_dict())


@METHODS.register("npt")
class NPT(PromptMethod):
    """A base method plus the NPT regulariser."""

    config_class = NPTConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.inner = create_method(cfg.base, backbone, classnames, **dict(cfg.base_options))
        self.class_side_trainable = self.inner.class_side_trainable
        self.regularizer_modules.append(
            NPTRegularizer(cfg.text_weight, cfg.image_weight, cfg.too_many_classes)
        )

    def on_classnames_changed(self) -> None:
        self.inner.set_classnames(self.classnames)

    def encode_classes(self) -> Any:
        return self.inner.encode_classes()

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        return self.inner.forward_with_text(images, classes)
