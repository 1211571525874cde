"""PLOT: prompt learning with optimal transport between local visual and textual features.

Chen, Yao, Zhang, Li, Zhou, Yu. "PLOT: Prompt Learning with Optimal Transport for
Vision-Language Models", ICLR 2023, arXiv 2210.01253, https://github.com/CHENGY12/PLOT.
N text prompt sets (CoOp context each); for ViT backbones the PLOT++ form: M visual prompt sets,
the image encoded once per set, whose M CLS outputs are the local visual features. Cost 1 - cos
between the M visual and N text features of a class, uniform marginals, Sinkhorn (eps 0.1, <= 100
iterations, tolerance 1e-2 on the marginal error) with the plan held constant in backward;
logit = logit_scale * <T, cos>.

PLOT++ as released (``plot-pp/trainers/plotpp.py`` and ``scripts/main_visiononly.sh`` /
``main_joint.sh`` of the repository above) trains in two stages:

* ``stage="visual"`` (its ``MODEL_UPD vision`` with ``TRADE_OFF True``): only the visual prompts
  train, and the logits add the global term ``logit_scale * normalize(mean_M f_img) @
  normalize(mean_N f_txt)^T`` (means over the un-normalised features) to the OT logits;
* ``stage="joint"`` (``MODEL_UPD joint``, ``TRADE_OFF False``, ``PRETRAIN_DIR`` = stage 1's
  output): every prompt trains, OT logits only. ``promptalign train ... method.init_from=RUN``
  (``--init-from``) starts it from stage 1's prompts; :data:`PLOTConfig.RECIPES` names the pair
  for the benchmark protocols (``--methods plot@two_stage``).

Defaults are the released ViT-B/16 scripts': N = M = 4, 4 text and 2 visual context tokens
(``NCTX_V=2``), visual prompts at the first layer only. Text initialisation follows the released
``CTX_INIT True`` path: each of the N sets starts from the word embeddings of a different
hand-written phrase. The released code keeps a table of four phrases per dataset, which a run on
one of its datasets uses (below); on any other dataset the phrases come from the dataset's own
template (which the engine gives every method with a ``template`` field): set 1 starts from the
template's words before the class name (when they are at least ``n_ctx`` tokens), the other sets
from the released generic phrases ``ctx_init`` ("this is a photo", "this is picture of", "one
picture of a"), and template words beyond the ``n_ctx`` context tokens stay literal text around
the class name. Without a template the sets start from N(0, 0.02) (the released ``CTX_INIT
False`` path).

Checked against the release (commit 728539f; every released value is a row of
:attr:`PLOTConfig.RELEASED`, with its file and line): for the eleven datasets of the released
``template_dict`` (plot-pp/trainers/plotpp.py:73-83) a run starts the N sets from that dataset's
four phrases, with as many context tokens as the first phrase has words (plotpp.py:87, e.g. 5 for
DTD's "a photo of a texture") and the class prompt "{class}." after them (plotpp.py:122): the
rows set ``ctx_init``, ``n_ctx`` and ``template = "{}."`` for the dataset. Other datasets (custom
or synthetic ones) take the template-derived phrases above.

Deviations from the released code: a phrase with fewer tokens than ``n_ctx`` (ImageNet's "this
is a") fills its first tokens and leaves the rest at N(0, 0.02); the release takes the end-of-text
and padding embeddings there, and that set's prompt loses the first token of the class name
(each set's suffix is cut at ``n_ctx`` tokens of its own tokenisation). A phrase with more tokens
than ``n_ctx`` (EuroSAT's third and fourth) keeps its first ``n_ctx`` tokens; the release keeps
its extra word as literal text in that set's prompt only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.clip import VisionPromptPosition
from ..config import FieldError, OptimConfig
from ..ot import SinkhornOptions
from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    Released,
    ReleasedSetting,
    normalize_mean,
)
from .explainable import ExplainFeatures, ExplainsOT
from .heads import PromptSetOTHead
from .prompts import build_class_prompts, check_depth, normal_init, remaining_words

# the phrase pattern of the released per-dataset CTX_INIT lists
# (Caltech101 / SUN397 / Stanford Cars)
RELEASED_CTX_INIT = ("a photo of a", "this is a photo", "this is picture of", "one picture of a")


# the released per-dataset CTX_INIT phrases (plot-pp/trainers/plotpp.py, line of each entry), by
# the registered name of the dataset
_PHRASES = {
    "caltech101": (
        73,
        ("a photo of a", "this is a photo", "this is picture of", "one picture of a"),
    ),
    "dtd": (
        74,
        (
            "a photo of a texture",
            "this is a photo texture",
            "this is a picture texture",
            "one picture of a texture",
        ),
    ),
    "eurosat": (
        75,
        (
            "a centered satellite photo of",
            "a centered satellite picture of",
            "this is centered satellite photo of",
            "one centered satellite photo of a",
        ),
    ),
    "fgvc_aircraft": (
        76,
        (
            "a photo of an aircraft",
            "a picture of an aircraft",
            "this is aircraft picture of",
            "one picture of an aircraft",
        ),
    ),
    "food101": (
        77,
        (
            "a photo of a food",
            "this is a food photo",
            " this is food picture of",
            "one picture of a food",
        ),
    ),
    "imagenet": (78, ("a photo of a", "this is a photo ", "this is a", "one picture of a")),
    "oxford_flowers": (
        79,
        (
            "a photo of a flower",
            "one picture of a flower",
            "this is flower picture of",
            "one picture of a flower",
        ),
    ),
    "oxford_pets": (
        80,
        (
            "a photo of a pet",
            "one picture of a pet",
            "this is pet picture of",
            "one picture of a pet",
        ),
    ),
    "stanford_cars": (
        81,
        ("a photo of a", "this is a photo ", "this is picture of", "one picture of a"),
    ),
    "sun397": (82, ("a photo of a", "this is a photo", "this is picture of", "one picture of a")),
    "ucf101": (
        83,
        (
            "a photo of a person doing",
            "this is a photo people doing",
            "this is picture of people doing",
            "one picture of a person doing",
        ),
    ),
}
_TRAINER = "plot-pp/trainers/plotpp.py"
_JOINT = "plot-pp/scripts/main_joint.sh"
_VIT = "plot-pp/configs/trainers/PLOTPP/vit.yaml"


def _released_rows() -> tuple[ReleasedSetting, ...]:
    rows = [
        ReleasedSetting("n_text_sets", 4, f"{_JOINT}:13 (N)"),
        ReleasedSetting("n_ctx", 4, f"{_JOINT}:14 (NCTX)"),
        ReleasedSetting("n_visual_sets", 4, "plot-pp/README.md:42 (main_joint.sh DATASET 4)"),
        ReleasedSetting("n_ctx_vision", 2, f"{_JOINT}:15 (NCTX_V)"),
        ReleasedSetting("eps", 0.1, f"{_TRAINER}:189"),
        ReleasedSetting("max_iter", 100, f"{_TRAINER}:190"),
        ReleasedSetting("tol", 1e-2, f"{_TRAINER}:202"),
        ReleasedSetting("ctx_init", RELEASED_CTX_INIT, f"{_TRAINER}:73 (Caltech101's phrases)"),
        ReleasedSetting("optim.optimizer", "sgd", f"{_VIT}:16"),
        ReleasedSetting("optim.lr", 0.002, f"{_VIT}:17"),
        ReleasedSetting("optim.epochs", 50, f"{_VIT}:18"),
        ReleasedSetting("optim.batch_size", 32, f"{_VIT}:3"),
        ReleasedSetting("optim.scheduler", "cosine", f"{_VIT}:19"),
        ReleasedSetting("optim.warmup_epochs", 1, f"{_VIT}:20"),
        ReleasedSetting("optim.warmup_lr", 1e-5, f"{_VIT}:22"),
    ]
    for name, (line, phrases) in _PHRASES.items():
        rows += [
            ReleasedSetting("ctx_init", phrases, f"{_TRAINER}:{line}", dataset=name),
            ReleasedSetting("n_ctx", len(phrases[0].split()), f"{_TRAINER}:87", dataset=name),
            ReleasedSetting("template", "{}.", f"{_TRAINER}:122", dataset=name),
        ]
    return tuple(rows)


@dataclass(frozen=True)
class PLOTConfig(MethodConfig):
    """Attributes:
    n_text_sets (N), n_ctx: text prompt sets and their context length.
    n_visual_sets (M), n_ctx_vision, vision_depth: visual prompt sets (PLOT++), tokens, depth.
    eps, max_iter, tol: Sinkhorn settings.
    tau: KL relaxation of the marginals over the prompt sets (unbalanced OT, > 0; smaller =
        more relaxed); None = balanced, the paper's.
    stage: "joint" (PLOT++ stage 2 and plain PLOT) or "visual" (PLOT++ stage 1: text prompts
        frozen, global trade-off term added to the logits).
    template: the dataset's hand-written template ("a photo of a {}, a type of pet."); the
        engine fills it in ("{}." with the released phrases for a dataset of the released
        table). Empty: text prompts "X..X {class}." initialised N(0, 0.02).
    ctx_init: phrases initialising text sets 1..N when a template is given (set 1 uses the
        template's own words when they are long enough); sets beyond them start N(0, 0.02).
    """

    n_text_sets: int = 4
    n_ctx: int = 4
    n_visual_sets: int = 4
    n_ctx_vision: int = 2
    vision_depth: int = 1
    position: VisionPromptPosition = "after_patches"
    eps: float = 0.1
    max_iter: int = 100
    tol: float = 1e-2
    tau: float | None = None
    stage: Literal["joint", "visual"] = "joint"
    template: str = ""
    ctx_init: tuple[str, ...] = RELEASED_CTX_INIT
    optim: OptimConfig = OptimConfig(lr=0.002, batch_size=32, epochs=50)
    TOWER_DEPTHS = {"vision_depth": ("vision",)}
    # multi-run recipes for the benchmark protocols: each entry is one run's config changes, run
    # in order, every run starting from the previous run's prompts (PLOT++'s two stages)
    RECIPES: ClassVar[Mapping[str, tuple[Mapping[str, Any], ...]]] = {
        "two_stage": ({"stage": "visual"}, {"stage": "joint"}),
    }
    RELEASED = Released("https://github.com/CHENGY12/PLOT", _released_rows())

    def check(self) -> None:
        super().check()
        for name in ("eps", "tau"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise FieldError(f"{name}: {value!r} must be > 0")
        for name, low in (("max_iter", 1), ("tol", 0)):
            if getattr(self, name) < low:
                raise FieldError(f"{name}: {getattr(self, name)!r} must be >= {low}")

    def sinkhorn_options(self) -> SinkhornOptions:
        """The OT these settings describe (domain by eps, convergence checked every 10
        iterations)."""
        return SinkhornOptions(
            eps=self.eps, max_iter=self.max_iter, tol=self.tol, tau=self.tau, check_every=10
        )


def _split_template(template: str) -> tuple[str, str]:
    """``"a photo of a {}, a type of pet."`` -> ("a photo of a", "{}, a type of pet.")."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} needs exactly one '{{}}' for the class name")
    head, tail = template.split("{}")
    tail = tail.rstrip()
    return head.strip(), "{}" + (tail if tail.endswith(".") else tail + ".")


@METHODS.register("plot")
class PLOT(ExplainsOT, PromptMethod):
    config_class = PLOTConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        vision_depth = check_depth(cfg.vision_depth, backbone.vision_layers, "visual prompt")
        Wt, Wv = backbone.text_width, backbone.vision_width
        self.class_template = "{}."
        ctx = normal_init(cfg.n_text_sets, cfg.n_ctx, Wt)  # [N, n, Wt]
        if cfg.template:
            self._init_from_template(ctx)
        self.ctx = nn.Parameter(ctx)
        self.visual = nn.Parameter(
            normal_init(cfg.n_visual_sets, cfg.n_ctx_vision, Wv)
        )  # [M, n_v, Wv]
        self.deep_visual = nn.Parameter(
            normal_init(vision_depth - 1, cfg.n_visual_sets, cfg.n_ctx_vision, Wv)
        )
        self.ctx.requires_grad_(cfg.stage == "joint")
        self.head = PromptSetOTHead(cfg.sinkhorn_options())
        # stage 1 has no trainable text input: its class features are cached in training too
        self.class_side_trainable = cfg.stage == "joint"
        self.on_classnames_changed()

    def _init_from_template(self, ctx: torch.Tensor) -> None:
        """Released CTX_INIT path, in place on ``ctx [N, n, Wt]``: set i's context starts from the
        word embeddings of phrase i; its first tokens beyond ``n_ctx`` (template words only) stay
        literal in front of the class name."""
        bb, n = self.backbone, self.config.n_ctx
        head, class_part = _split_template(self.config.template)
        phrases = list(self.config.ctx_init)
        literal = ""
        if head and bb.token_count(head) >= n:
            phrases = [head, *phrases[1:]]
            literal = remaining_words(bb, head, n)
        self.class_template = f"{literal} {class_part}".strip()
        for i, phrase in enumerate(phrases[: ctx.shape[0]]):
            k = min(n, bb.token_count(phrase))
            with torch.no_grad():
                start = bb.text_start  # after a start token (CLIP), 0 without one (SigLIP)
                ctx[i, :k] = bb.embed_tokens(bb.tokenize([phrase]))[0, start : start + k].float()

    def on_classnames_changed(self) -> None:
        p = build_class_prompts(
            self.backbone, self.classnames, self.config.n_ctx, template=self.class_template
        )
        self.register_buffer("tokens", p.tokens, persistent=False)

    def encode_classes(self) -> torch.Tensor:
        out = self.backbone.forward_text(self.tokens.unsqueeze(0), self.ctx.unsqueeze(1))
        return out.pooled  # [N, K, D], not normalised (stage 1 averages the raw features)

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        cfg = self.config
        out = self.backbone.forward_image(
            images, self.visual, deep=list(self.deep_visual.unbind(0)), position=cfg.position
        )  # pooled [B, M, D]; tokens only when explain asks the image tower for them
        img = F.normalize(out.pooled, dim=-1)  # [B, M, D]
        txt = F.normalize(classes, dim=-1)  # [N, K, D]
        scale = self.backbone.logit_scale
        logits, extras = self.head(img, txt, scale)  # OT over the sets, [B, K]
        extra = None
        if cfg.stage == "visual":  # released TRADE_OFF: global term of the mean features
            g_img = F.normalize(out.pooled.mean(1), dim=-1)  # [B, D]
            g_txt = F.normalize(classes.mean(0), dim=-1)  # [K, D]
            extra = scale * g_img @ g_txt.t()  # [B, K], outside the OT
            logits = logits + extra
        scored = ExplainFeatures(
            self.head,
            out.pooled,
            txt.transpose(0, 1),  # [K, N, D]
            scale,
            image_tokens=out.tokens,
            prompt_slice=out.prompt_slice,
            extra_logits=extra,
        )
        return MethodOutput(
            logits, normalize_mean(img, 1), normalize_mean(txt, 0), extras, explain=scored
        )
