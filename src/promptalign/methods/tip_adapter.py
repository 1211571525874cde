"""Tip-Adapter-F: a training-free cache model over few-shot features, with its keys fine-tuned.

Zhang, Zhang, Fang, Gao, Li, Dai, Qiao, Li. "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022, arXiv 2207.09519, https://github.com/gaopengcuhk/Tip-Adapter
(main.py, utils.py, configs/*.yaml followed here).

* Cache (:meth:`TipAdapterF.fit_before_training`): keys are the L2-normalised CLIP image features
  of the few-shot training images, averaged over ``augment_views`` augmented passes before the
  normalisation (the released ``augment_epoch`` = 10); values are the one-hot labels.
* Logits: ``clip + alpha * exp(-beta (1 - f K^T)) V`` with ``clip = scale * f W^T`` the zero-shot
  classifier of ``template`` (or a template ensemble) and ``f`` the normalised image feature.
* Tip-Adapter-F fine-tunes the keys (the released ``adapter.weight``) with AdamW (lr 1e-3,
  eps 1e-4), batch 256, 20 epochs, cosine schedule, at the initial alpha/beta.
* After training, alpha and beta are searched on the validation split
  (:meth:`TipAdapterF.select_on_validation`, the released ``search_hp`` grid); never on test.

Differences from the released code, on purpose: the released script keeps the epoch with the
best *test* accuracy and reports max(best test, searched); here the last epoch is kept and only
the validation split chooses anything. Its cosine schedule is stepped per iteration; here per
epoch by the shared trainer (no warm-up), and AdamW keeps the trainer's eps (1e-8, released
1e-4). Class names may change after training (base -> new): a cache entry contributes to the
column of its own class name when that class is scored, else nothing, so new classes fall back
to zero-shot CLIP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FieldError, OptimConfig
from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    cosine_logits,
)
from .prompts import check_templates, template_ensemble

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TipAdapterFConfig(MethodConfig):
    """Attributes:
    template: zero-shot prompt template (the dataset's own in benchmarks).
    templates: a template ensemble replacing ``template`` (the released ImageNet setting).
    augment_views: augmented passes over the training set averaged into the cache keys.
    init_alpha, init_beta: residual ratio and affinity sharpness used in training (and at
        inference when the search is off or there is no validation data).
    search: search alpha/beta on the validation split after training.
    search_scale: (beta max, alpha max) of the search grid; ``search_step``: grid sizes.
    train_keys: fine-tune the keys (Tip-Adapter-F); False = training-free Tip-Adapter.
    """

    template: str = "a photo of a {}."
    templates: tuple[str, ...] = ()
    augment_views: int = 10
    init_alpha: float = 1.17
    init_beta: float = 1.0
    search: bool = True
    search_scale: tuple[float, float] = (7.0, 3.0)
    search_step: tuple[int, int] = (200, 20)
    train_keys: bool = True
    optim: OptimConfig = OptimConfig(
        optimizer="adamw", lr=0.001, weight_decay=0.01, epochs=20, batch_size=256, warmup_epochs=0
    )
    PRESETS = {
        # per-dataset settings of the released configs/*.yaml (ImageNet's are the defaults)
        "dtd": {"search_scale": (13.0, 13.0), "init_alpha": 2.0},
        "eurosat": {"search_scale": (12.0, 10.0), "init_alpha": 2.0},
        "fgvc": {"search_scale": (30.0, 30.0), "init_alpha": 2.0},
        "oxford_pets": {"search_scale": (7.0, 3.0), "init_alpha": 1.0},
        # training-free Tip-Adapter (cache only, searched alpha/beta)
        "training_free": {"train_keys": False},
    }

    def check(self) -> None:
        super().check()
        if self.augment_views < 1:
            raise FieldError(f"augment_views: {self.augment_views} must be >= 1")
        if len(self.search_scale) != 2 or len(self.search_step) != 2 or min(self.search_step) < 1:
            raise FieldError(
                f"search_scale / search_step: {self.search_scale} / {self.search_step} must be "
                "(beta, alpha) pairs with steps >= 1"
            )


@METHODS.register("tip_adapter_f")
class TipAdapterF(PromptMethod):
    """Zero-shot CLIP plus a cache model; see the module docstring."""

    config_class = TipAdapterFConfig
    class_side_trainable = False

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        check_templates(self.templates)
        # the cache's labels index this vocabulary (the classes the method was built for)
        self._vocab = self.classnames
        D = backbone.embed_dim
        self.keys = nn.Parameter(torch.zeros(0, D), requires_grad=False)  # [NK, D], set by fit
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))  # [NK] into _vocab
        self.register_buffer("alpha", torch.tensor(float(self.config.init_alpha)))
        self.register_buffer("beta", torch.tensor(float(self.config.init_beta)))
        self.on_classnames_changed()

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self.config.templates) or (self.config.template,)

    # ------------------------------------------------------------------ cache
    def on_classnames_changed(self) -> None:
        """Values ``[NK, K]``: one-hot of each cache entry's class among the current classes."""
        column = {c: i for i, c in enumerate(self.classnames)}
        idx = torch.tensor([column.get(c, -1) for c in self._vocab], dtype=torch.long)
        cols = idx.to(self.labels.device)[self.labels]  # [NK]
        values = torch.zeros(len(cols), self.num_classes, device=self.labels.device)
        hit = cols >= 0
        values[hit.nonzero().squeeze(1), cols[hit]] = 1.0
        self.register_buffer("values", values, persistent=False)

    def _set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        device = self.backbone.device
        self.keys = nn.Parameter(keys.to(device), requires_grad=self.config.train_keys)
        self.labels = labels.to(device)
        self.on_classnames_changed()
        self.clear_cache()

    @torch.no_grad()
    def fit_before_training(
        self, train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """Build the cache: keys = normalised mean over ``augment_views`` augmented passes of the
        training features (released ``build_cache_model``), labels from the first pass."""
        total, labels = None, []
        for view in range(self.config.augment_views):
            feats = []
            for images, y in train_batches():
                feats.append(self.backbone.encode_image(images).float())  # [B, D]
                if view == 0:
                    labels.append(y)
            if not feats:
                log.warning(
                    "Tip-Adapter: no training images; the cache stays empty (zero-shot CLIP)"
                )
                return
            f = torch.cat(feats)  # [NK, D]
            total = f if total is None else total + f
        keys = F.normalize(total / self.config.augment_views, dim=-1)
        self._set_cache(keys, torch.cat(labels).long())
        log.info("Tip-Adapter cache: %d keys over %d classes", len(keys), self.num_classes)

    @torch.no_grad()
    def select_on_validation(
        self, val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> dict[str, float]:
        """Grid search of (beta, alpha) on the validation split (released ``search_hp``): the
        first best accuracy wins, scanning beta then alpha in increasing order."""
        if not self.config.search or len(self.keys) == 0:
            return {}
        feats, labels = [], []
        for images, y in val_batches():
            feats.append(F.normalize(self.backbone.encode_image(images).float(), dim=-1))
            labels.append(y)
        if not feats:
            log.warning(
                "Tip-Adapter: empty validation split; keeping alpha=%g beta=%g",
                float(self.alpha),
                float(self.beta),
            )
            return {}
        f, y = torch.cat(feats), torch.cat(labels)
        clip = cosine_logits(f, self.class_features(), self.backbone.logit_scale)  # [V, K]
        affinity = f @ self.keys.t()  # [V, NK]
        (bmax, amax), (bn, an) = self.config.search_scale, self.config.search_step
        betas = torch.tensor([i * (bmax - 0.1) / bn + 0.1 for i in range(bn)], device=f.device)
        alphas = torch.tensor([i * (amax - 0.1) / an + 0.1 for i in range(an)], device=f.device)
        best = (-1.0, float(self.beta), float(self.alpha))
        for beta in betas:
            cache = torch.exp(-beta * (1 - affinity)) @ self.values  # [V, K]
            logits = clip.unsqueeze(0) + alphas.view(-1, 1, 1) * cache.unsqueeze(0)  # [A, V, K]
            acc = (logits.argmax(-1) == y).float().mean(-1)  # [A]
            a = int(acc.argmax())
            if float(acc[a]) > best[0]:
                best = (float(acc[a]), float(beta), float(alphas[a]))
        self.beta.fill_(best[1])
        self.alpha.fill_(best[2])
        return {"val_accuracy": 100.0 * best[0], "beta": best[1], "alpha": best[2]}

    def load_prompt_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Resize the cache to the saved one (its size is the training-set size), then load."""
        if "keys" in state and "labels" in state and state["keys"].shape != self.keys.shape:
            self._set_cache(torch.zeros_like(state["keys"]), torch.zeros_like(state["labels"]))
        super().load_prompt_state_dict(state)
        self.on_classnames_changed()

    # ------------------------------------------------------------------ roles
    def encode_classes(self) -> torch.Tensor:
        return template_ensemble(self.backbone, self.classnames, self.templates)  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        with torch.no_grad():
            img = F.normalize(self.backbone.encode_image(images), dim=-1)  # [B, D]
        logits = cosine_logits(img, classes, self.backbone.logit_scale)  # [B, K]
        if len(self.keys):
            affinity = img.to(self.keys.dtype) @ self.keys.t()  # [B, NK]
            cache = torch.exp(-self.beta * (1 - affinity)) @ self.values  # [B, K]
            logits = logits + self.alpha * cache.to(logits.dtype)
        return MethodOutput(logits, img, classes)
