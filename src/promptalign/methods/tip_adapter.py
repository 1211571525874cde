"""Tip-Adapter-F: a training-free cache model over few-shot features, with its keys fine-tuned.

Zhang, Zhang, Fang, Gao, Li, Dai, Qiao, Li. "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022, arXiv 2207.09519, https://github.com/gaopengcuhk/Tip-Adapter
(main.py, utils.py, datasets/*.py and configs/*.yaml at commit d0e2d6f followed here; every
released value is a row of :attr:`TipAdapterFConfig.RELEASED`, with its file and line).

* Cache (:meth:`TipAdapterF.fit_before_training`): keys are the L2-normalised CLIP image features
  of the few-shot training images, averaged over ``augment_views`` augmented views before the
  normalisation (the released ``augment_epoch`` = 10, ``build_cache_model`` in utils.py:38-71);
  values are the one-hot labels. Each view is a RandomResizedCrop of ``cache_crop_scale`` =
  (0.5, 1) of the image area and a horizontal flip (main.py:173-178), drawn from its own seed
  (run seed, view, image), so the ten views differ and do not depend on the loader's workers.
* Logits: ``clip + alpha * exp(-beta (1 - f K^T)) V`` with ``clip = scale * f W^T`` the zero-shot
  classifier of ``template`` (or a template ensemble: ImageNet's seven) and ``f`` the normalised
  image feature.
* Tip-Adapter-F fine-tunes the keys (the released ``adapter.weight``) with AdamW (lr 1e-3,
  eps 1e-4, main.py:72), batch 256, 20 epochs (EuroSAT 100), cosine schedule, at the initial
  alpha/beta.
* After training, alpha and beta are searched on the validation split
  (:meth:`TipAdapterF.select_on_validation`, the released ``search_hp`` grid, utils.py:99-129);
  never on test. As released, a grid point must beat 0 % accuracy to be chosen: when none does,
  (beta, alpha) = (0, 0), i.e. zero-shot CLIP, and a warning says so.

Per-dataset settings: a run on a dataset the release has a config for (caltech101, dtd, eurosat,
fgvc_aircraft, food101, imagenet, oxford_flowers, oxford_pets, stanford_cars, sun397, ucf101) gets
that config's ``search_scale``, ``init_alpha`` (and EuroSAT's 100 epochs) and the dataset's
released template(s) unless the run sets them; other datasets get the ImageNet values (the
defaults here). The released configs all name the RN50 backbone; the paper gives no other
per-backbone values, so the same values are used for every backbone (ViT-B/16 in the shipped run
presets). What carries over unchanged: the cache construction, the templates, the optimiser and
schedule and the search grid's form. What is tuned on RN50 features: ``init_alpha`` / ``init_beta``
(they set the scale of the cache term during training, and ViT features have other affinity
statistics) and the grid's upper ends ``search_scale``; the search itself re-chooses alpha and beta
on the validation split for the backbone at hand, within that grid.

Deviations from the released code:

* The released script keeps the epoch with the best *test* accuracy (main.py:121-126) and reports
  max(best test, searched); here the last epoch is kept and only the validation split chooses
  anything (no selection on test, ever).
* The released cosine schedule steps per iteration (main.py:73); here per epoch, by the shared
  trainer (no warm-up).
* The release trains with the same (0.5, 1) crop as its cache views; here training batches use
  the run's training crop (``data.crop_scale``, the dataset's, (0.08, 1) for the photo datasets);
  set ``data.crop_scale=[0.5,1]`` for the released training crop.
* The released ImageNet script (main_imagenet.py:110) searches alpha/beta on the test split; here
  on the validation split, as for every dataset.
* Class names may change after training (base -> new): a cache entry contributes to the column of
  its own class name when that class is scored, else nothing, so new classes fall back to
  zero-shot CLIP.
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
from ..data.templates import IMAGENET_SELECT_TEMPLATES
from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    Released,
    ReleasedSetting,
    cosine_logits,
)
from .prompts import check_templates, template_ensemble

log = logging.getLogger(__name__)


# the release's per-dataset configs: {registered dataset: (its configs/*.yaml, search_scale,
# init_alpha, datasets/*.py with its template line, the template)}
_DATASET_CONFIGS = {
    "caltech101": ("caltech101", (12.0, 5.0), 3.0, "caltech101.py:7", "a photo of a {}."),
    "dtd": ("dtd", (13.0, 13.0), 2.0, "dtd.py:8", "{} texture."),
    "eurosat": ("eurosat", (12.0, 10.0), 2.0, "eurosat.py:7", "a centered satellite photo of {}."),
    "fgvc_aircraft": (
        "fgvc",
        (30.0, 30.0),
        5.0,
        "fgvc.py:6",
        "a photo of a {}, a type of aircraft.",
    ),
    "food101": ("food101", (10.0, 10.0), 1.17, "food101.py:7", "a photo of {}, a type of food."),
    "imagenet": ("imagenet", (7.0, 3.0), 1.17, "", ""),
    "oxford_flowers": (
        "oxford_flowers",
        (50.0, 50.0),
        10.0,
        "oxford_flowers.py:10",
        "a photo of a {}, a type of flower.",
    ),
    "oxford_pets": (
        "oxford_pets",
        (7.0, 3.0),
        1.17,
        "oxford_pets.py:11",
        "a photo of a {}, a type of pet.",
    ),
    "stanford_cars": ("stanford_cars", (20.0, 10.0), 3.0, "stanford_cars.py:8", "a photo of a {}."),
    "sun397": ("sun397", (12.0, 10.0), 1.17, "sun397.py:8", "a photo of a {}."),
    "ucf101": ("ucf101", (7.0, 3.0), 3.0, "ucf101.py:8", "a photo of a person doing {}."),
}


def _released_rows() -> tuple[ReleasedSetting, ...]:
    every = "configs/*.yaml"  # the same line in every dataset's config
    rows = [
        ReleasedSetting("augment_views", 10, f"{every}:30 (augment_epoch)"),
        ReleasedSetting("cache_crop_scale", (0.5, 1.0), "main.py:174"),
        ReleasedSetting("init_alpha", 1.17, "configs/imagenet.yaml:21"),
        ReleasedSetting("init_beta", 1.0, f"{every}:20"),
        ReleasedSetting("search", True, f"{every}:14 (search_hp)"),
        ReleasedSetting("search_scale", (7.0, 3.0), "configs/imagenet.yaml:17"),
        ReleasedSetting("search_step", (200, 20), f"{every}:18"),
        ReleasedSetting("train_keys", True, "main.py:66-71 (run_tip_adapter_F)"),
        ReleasedSetting("optim.optimizer", "adamw", "main.py:72"),
        ReleasedSetting("optim.lr", 0.001, f"{every}:29"),
        ReleasedSetting("optim.adam_eps", 1e-4, "main.py:72"),
        ReleasedSetting("optim.weight_decay", 0.01, "main.py:72 (AdamW's default)"),
        ReleasedSetting("optim.batch_size", 256, "main.py:181"),
        ReleasedSetting("optim.epochs", 20, f"{every}:31 (train_epoch)"),
        ReleasedSetting("optim.scheduler", "cosine", "main.py:73"),
        ReleasedSetting("optim.warmup_epochs", 0, "main.py:73 (no warm-up)"),
        # the training-free Tip-Adapter the release evaluates first
        ReleasedSetting("train_keys", False, "main.py:27-63", preset="training_free"),
    ]
    for name, (cfg, scale, alpha, tfile, template) in _DATASET_CONFIGS.items():
        src = f"configs/{cfg}.yaml"
        rows.append(ReleasedSetting("search_scale", scale, f"{src}:17", dataset=name))
        rows.append(ReleasedSetting("init_alpha", alpha, f"{src}:21", dataset=name))
        if template:
            rows.append(ReleasedSetting("template", template, f"datasets/{tfile}", dataset=name))
    rows.append(
        ReleasedSetting(
            "templates",
            IMAGENET_SELECT_TEMPLATES,
            "datasets/imagenet.py:177-183",
            dataset="imagenet",
        )
    )
    rows.append(ReleasedSetting("optim.epochs", 100, "configs/eurosat.yaml:31", dataset="eurosat"))
    return tuple(rows)


@dataclass(frozen=True)
class TipAdapterFConfig(MethodConfig):
    """Attributes:
    template: zero-shot prompt template (the dataset's own, or its released one, in runs).
    templates: a template ensemble replacing ``template`` (the released ImageNet setting).
    augment_views: augmented views of the training set averaged into the cache keys.
    cache_crop_scale: area range of the RandomResizedCrop of the cache views.
    init_alpha, init_beta: residual ratio and affinity sharpness used in training (and at
        inference when the search is off or there is no validation data).
    search: search alpha/beta on the validation split after training.
    search_scale: (beta max, alpha max) of the search grid; ``search_step``: grid sizes.
    train_keys: fine-tune the keys (Tip-Adapter-F); False = training-free Tip-Adapter.
    """

    template: str = "a photo of a {}."
    templates: tuple[str, ...] = ()
    augment_views: int = 10
    cache_crop_scale: tuple[float, float] = (0.5, 1.0)
    init_alpha: float = 1.17
    init_beta: float = 1.0
    search: bool = True
    search_scale: tuple[float, float] = (7.0, 3.0)
    search_step: tuple[int, int] = (200, 20)
    train_keys: bool = True
    optim: OptimConfig = OptimConfig(
        optimizer="adamw",
        lr=0.001,
        adam_eps=1e-4,
        weight_decay=0.01,
        epochs=20,
        batch_size=256,
        warmup_epochs=0,
        scheduler="cosine",
    )
    PRESETS = {
        # training-free Tip-Adapter (cache only, searched alpha/beta)
        "training_free": {"train_keys": False},
    }
    RELEASED = Released("https://github.com/gaopengcuhk/Tip-Adapter", _released_rows())

    def check(self) -> None:
        super().check()
        if self.augment_views < 1:
            raise FieldError(f"augment_views: {self.augment_views} must be >= 1")
        if len(self.search_scale) != 2 or len(self.search_step) != 2 or min(self.search_step) < 1:
            raise FieldError(
                f"search_scale / search_step: {self.search_scale} / {self.search_step} must be "
                "(beta, alpha) pairs with steps >= 1"
            )
        if not 0 < self.cache_crop_scale[0] <= self.cache_crop_scale[1] <= 1:
            raise FieldError(
                f"cache_crop_scale: {list(self.cache_crop_scale)} must be [lo, hi] with "
                "0 < lo <= hi <= 1"
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
        self, train_batches: Callable[..., Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """Build the cache: keys = normalised mean over ``augment_views`` augmented views of the
        training features (released ``build_cache_model``), each view cropped to
        ``cache_crop_scale`` of the image area; labels from the first view."""
        total, labels = None, []
        for view in range(self.config.augment_views):
            feats = []
            for images, y in train_batches(view, self.config.cache_crop_scale):
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
        first best accuracy wins, scanning beta then alpha in increasing order; when no grid
        point gets any image right, (0, 0): zero-shot CLIP."""
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
        best = (0.0, 0.0, 0.0)  # released: a point must beat 0 %, else (beta, alpha) = (0, 0)
        for beta in betas:
            cache = torch.exp(-beta * (1 - affinity)) @ self.values  # [V, K]
            logits = clip.unsqueeze(0) + alphas.view(-1, 1, 1) * cache.unsqueeze(0)  # [A, V, K]
            acc = (logits.argmax(-1) == y).float().mean(-1)  # [A]
            a = int(acc.argmax())
            if float(acc[a]) > best[0]:
                best = (float(acc[a]), float(beta), float(alphas[a]))
        if best[0] == 0.0:
            log.warning(
                "Tip-Adapter: no point of the alpha/beta grid classifies any of the %d validation "
                "images correctly; using beta = alpha = 0 (zero-shot CLIP), as the release does",
                len(y),
            )
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
