"""ALIGN: multi-mode token-level prompt alignment across modalities.

Wang, Li, Liu, Xu, Chen, Zhang. "Tuning Multi-mode Token-level Prompt Alignment across
Modalities", NeurIPS 2023, arXiv 2309.13847, https://github.com/wds2014/ALIGN.

M visual and N text prompt sets (M = N, MaPLe-coupled: the visual prompt of mode m and layer l is
Linear_l of text prompt m at that layer). An image is a uniform distribution over its M prompted
encodings, a class one over its N; their score is a hierarchical OT (``promptalign.ot``): the
prompt-level cost mixes the global cosine distance with a token-level OT between image tokens
(patches + prompt tokens) and the class's text tokens.

Two forms (``form``):
* "paper" (default): C_mn = (1 - s_mn) + beta * <T_hat, 1 - S>, logit = scale * (1 - <T, C>),
  plans constant in backward so gradient reaches the token features; text token set of prompt n
  = its own tokens SOS..EOT.
* "released" (preset ``reference``): the released code's semantics - transported similarity added
  to the cost (beta = 1), logit = scale * <T, s> (token level only moves the plan), text token
  window = positions 0 .. eot(prompt 0) - 2 for every prompt of a class (so "." and EOT are left
  out for prompt 0 and included for the shorter prompts n >= 1; for any tokenizer: through the
  last token of prompt 0's class name), Sinkhorn eps 0.1, <= 100 iterations. Deviations kept on
  purpose: fp32 (fp16 kernels underflow, see the spec) and the
  stopping rule is per problem, on its L1 column-marginal error, with tolerance 1e-5 instead of the
  released code's mean |change of the row scaling| < 1e-2 over the whole call's batch. The
  released rule stops within ~3e-5 (relative, logits) of the converged answer on trained-like
  costs; a per-problem 1e-2 would stop up to ~1.5e-4 away, 1e-5 sits at the converged answer
  (<= ~2e-6, tests/test_fidelity.py), so the preset tracks the released logits within ~5e-5; it
  costs ~10 instead of 5 token-level iterations per problem (checks every 5).
Text prompts: set 0 initialised from "a photo of a" (first b tokens; "of a" stays literal text:
"[SOS] c1 c2 of a {class}. [EOT]"), sets n >= 1 random N(0, 0.02) rendered "[SOS] c1 c2 {class}."
(the released code's default). ``ctx_init`` may hold one phrase per set, separated by tabs, as the
released code's ``CTX_INIT`` does (``ctx_init.split("\t")``, one phrase per text prompt; its config
keeps a commented-out list "a photo of a", "a nice photo of", "a large picture of", "a small photo
of a", "a nice sketch of a"): set i then starts from phrase i's first b tokens and keeps the rest
of it as literal text; sets without a phrase start random as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..backbone.clip import VisionPromptPosition
from ..config import FieldError, OptimConfig
from ..ot import Backend, DomainChoice, Form, HierarchicalOT, SinkhornOptions, TokenOptions
from ..registry import METHODS
from .base import MethodConfig, MethodOutput, PromptMethod, normalize_mean
from .explainable import ExplainFeatures, ExplainsOT
from .heads import HierarchicalOTHead
from .prompts import CoupledPrompts, build_class_prompts, phrase_init, remaining_words


@dataclass(frozen=True)
class ALIGNConfig(MethodConfig):
    """Attributes:
    n_sets: prompt sets per modality (M = N).
    n_ctx: prompt tokens b per set; depth: prompt depth in both towers.
    ctx_init: initialisation phrase of text set 0, or one phrase per set separated by tabs (the
        released code's convention; at most n_sets phrases): set i starts from the first n_ctx
        tokens of phrase i and keeps the rest as literal text; sets without a phrase start
        random N(0, 0.02).
    beta: weight of the token-level distance (paper form).
    eps, eps_token, max_iter, tol: Sinkhorn settings of the prompt / token level.
    tau_token: KL relaxation of the token-level marginals (unbalanced OT: a word need not send
        all its mass, e.g. to a patch that does not show it; smaller = more relaxed, > 0);
        None = balanced, the paper's.
    form: "paper" or "released" (see the module docstring).
    token_window: "own" (each prompt's SOS..EOT) or "prompt0" (released-code window).
    domain: Sinkhorn domain ("auto": kernel domain for eps >= 0.05).
    memory_budget: bytes for the token-level OT per class chunk.
    backend: token-level OT backend ("auto": the fused GEMM + Triton kernel on CUDA, else torch).
    """

    n_sets: int = 4
    n_ctx: int = 2
    depth: int = 9
    ctx_init: str = "a photo of a"
    position: VisionPromptPosition = "after_patches"
    beta: float = 1.0
    eps: float = 0.1
    eps_token: float | None = None
    max_iter: int = 100
    tol: float = 1e-3
    tau_token: float | None = None
    form: Form = "paper"
    token_window: Literal["own", "prompt0"] = "own"
    domain: DomainChoice = "auto"
    memory_budget: int = 2 * 1024**3
    backend: Backend = "auto"
    optim: OptimConfig = OptimConfig(
        lr=0.0025, batch_size=4, epochs=20, epochs_by_shots=((1, 30), (4, 50), (16, 80))
    )
    TOWER_DEPTHS = {"depth": ("text", "vision")}  # coupled prompts: the shallower tower
    PRESETS = {
        "reference": {
            "form": "released",
            "token_window": "prompt0",
            "beta": 1.0,
            "eps": 0.1,
            "max_iter": 100,
            "tol": 1e-5,
            "domain": "kernel",
        },
        # the released SUN397 config
        "sun397": {"n_sets": 2, "optim": {"lr": 0.002}},
    }

    def check(self) -> None:
        super().check()
        for name in ("eps", "eps_token", "tau_token"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise FieldError(f"{name}: {value!r} must be > 0")
        phrases = self.phrases()
        if len(phrases) > self.n_sets:
            raise FieldError(
                f"ctx_init: {len(phrases)} tab-separated phrases for n_sets={self.n_sets}; give "
                "at most one phrase per prompt set"
            )
        if any(not p for p in phrases):
            raise FieldError(
                f"ctx_init: {self.ctx_init!r} has an empty phrase between tabs; give one "
                "non-empty phrase per initialised set"
            )
        for name, low in (("max_iter", 1), ("tol", 0), ("memory_budget", 1)):
            if getattr(self, name) < low:
                raise FieldError(f"{name}: {getattr(self, name)!r} must be >= {low}")

    def phrases(self) -> list[str]:
        """The initialisation phrases of text sets 0, 1, ... (``ctx_init`` split at tabs)."""
        return [p.strip() for p in self.ctx_init.split("\t")] if self.ctx_init.strip() else []

    def solver(self) -> HierarchicalOT:
        """The hierarchical OT these settings describe (both levels check every 5 iterations)."""
        shared = dict(domain=self.domain, check_every=5)
        return HierarchicalOT(
            prompt=SinkhornOptions(eps=self.eps, max_iter=self.max_iter, tol=self.tol, **shared),
            token=TokenOptions(
                eps=self.eps if self.eps_token is None else self.eps_token,
                max_iter=self.max_iter,
                tol=self.tol,
                tau=self.tau_token,
                backend=self.backend,
                memory_budget=self.memory_budget,
                **shared,
            ),
            beta=self.beta,
            form=self.form,
        )


@METHODS.register("align")
class ALIGN(ExplainsOT, PromptMethod):
    config_class = ALIGNConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        phrases = cfg.phrases()
        self.prompts = CoupledPrompts(
            backbone, cfg.n_ctx, cfg.depth, phrases[0] if phrases else "", sets=cfg.n_sets
        )
        # the literal words after each set's context ("of a" for "a photo of a"; "" when random)
        self.suffixes = [self.prompts.suffix] + [""] * (cfg.n_sets - 1)
        with torch.no_grad():  # sets 1.. from their own phrases (the random draw is unchanged)
            for i, phrase in enumerate(phrases[1:], start=1):
                self.prompts.ctx[i] = phrase_init(backbone, phrase, cfg.n_ctx)
                self.suffixes[i] = remaining_words(backbone, phrase, cfg.n_ctx)
        self.head = HierarchicalOTHead(cfg.solver())
        self.on_classnames_changed()

    def on_classnames_changed(self) -> None:
        rendered: dict[str, torch.Tensor] = {}  # one tokenisation per distinct suffix
        for suffix in self.suffixes:
            if suffix not in rendered:
                rendered[suffix] = build_class_prompts(
                    self.backbone,
                    self.classnames,
                    self.config.n_ctx,
                    template=f"{suffix} {{}}." if suffix else "{}.",
                ).tokens
        tokens = torch.stack([rendered[s] for s in self.suffixes])  # [N, K, T]
        suffix = self.suffixes[0]
        # end of the class name in prompt 0: the same prompt without the final "." (however the
        # tokenizer renders it: one token in CLIP's BPE, none where punctuation is stripped)
        bare_template = f"{suffix} {{}}" if suffix else "{}"
        bare = build_class_prompts(
            self.backbone, self.classnames, self.config.n_ctx, template=bare_template
        ).tokens
        self.register_buffer("name_end", self.backbone.eot_index(bare), persistent=False)  # [K]
        self.register_buffer("tokens", tokens, persistent=False)

    def encode_classes(self) -> dict[str, torch.Tensor]:
        """Class features per text prompt set: ``global [K, N, D]``, ``tokens [K, N, L, D]``
        and ``mask [K, N, L]`` (the tokens the token-level OT uses) for the head; ``ids`` and
        ``context`` ``[K, N, L]`` (token ids, learnable-context slots) to label them."""
        ctx, deep = self.prompts.text()  # [N, b, W], depth-1 x [N, b, W]
        out = self.backbone.forward_text(
            self.tokens, ctx.unsqueeze(1), deep=[d.unsqueeze(1) for d in deep], return_tokens=True
        )  # pooled [N, K, D], tokens [N, K, T', D], eot [N, K]
        T = out.tokens.shape[2]
        pos = torch.arange(T, device=out.eot.device)
        if self.config.token_window == "own":
            mask = pos <= out.eot.unsqueeze(-1)  # [N, K, T]
        else:
            window = (
                self.name_end
            )  # [K]: positions 0 .. the class name's last token (CLIP: eot - 2)
            mask = (pos < window.unsqueeze(-1)).unsqueeze(0).expand(out.eot.shape[0], -1, -1)
        L = int(mask.sum(-1).max())
        ids = self.tokens[..., :L].transpose(0, 1)  # [K, N, L]
        context = torch.zeros_like(ids, dtype=torch.bool)
        start = self.backbone.text_start  # the context placeholders follow SOS (if any)
        context[..., start : start + self.config.n_ctx] = True
        return {
            "global": out.pooled.transpose(0, 1),  # [K, N, D]
            "tokens": out.tokens[:, :, :L].transpose(0, 1),  # [K, N, L, D]
            "mask": mask[:, :, :L].transpose(0, 1),  # [K, N, L]
            "ids": ids,
            "context": context,
        }

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        vis, vdeep = self.prompts.visual()  # [M, b, Wv]
        out = self.backbone.forward_image(
            images, vis, deep=vdeep, position=self.config.position, return_tokens=True
        )  # pooled [B, M, D], tokens [B, M, J, D]
        scale = self.backbone.logit_scale
        logits, extras = self.head(out.pooled, out.tokens, classes, scale)
        scored = ExplainFeatures(
            self.head,
            out.pooled,
            classes["global"],
            scale,
            image_tokens=out.tokens,
            prompt_slice=out.prompt_slice,
            text_tokens=classes["tokens"],
            text_mask=classes["mask"],
            text_ids=classes["ids"],
            context_slots=classes["context"],
        )
        return MethodOutput(
            logits,
            normalize_mean(out.pooled, 1),
            normalize_mean(classes["global"], 1),
            extras,
            explain=scored,
        )
