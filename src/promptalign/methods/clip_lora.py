"""CLIP-LoRA: low-rank adapters on the attention projections of both CLIP encoders.

Zanella, Ben Ayed. "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024,
arXiv 2405.18541, https://github.com/MaxZanella/CLIP-LoRA (run_utils.py defaults, lora.py,
loralib/layers.py followed here). For every attention block of the chosen encoders and every
target projection t in (q, k, v[, o]): ``t(x) = W_t x + b_t + s * B_t A_t dropout(x)`` with rank
``r`` = 2, ``s = alpha / sqrt(r)`` (the released ``LoRALayer.scaling``; alpha = 1), dropout 0.25
on the adapter's input only, A Kaiming-uniform and B zero (so training starts at zero-shot CLIP).
Class features come from the fixed prompt "a photo of a {}." (the released datasets use it for
every dataset). AdamW (lr 2e-4, weight decay 0.01), batch 32, cosine schedule, 500 x N-shot
iterations (``iterations_per_shot``, which the engine converts to epochs for the run's classes).

The frozen backbone is never modified: while a tower runs, :meth:`CLIPLoRA.adapted` swaps each
attention module of that tower for a wrapper that computes the adapted projections and puts the
original module back on exit (also on errors). In evaluation (or with dropout 0) the wrapper
calls the original module functionally with merged weights ``W + s B A``, so zero B matrices give
exactly zero-shot CLIP and :meth:`CLIPLoRA.merged_state_dict` (a copy of the CLIP weights with
the adapters merged, for export) gives the same logits as the unmerged adapters.

Checked against the release (commit 358f0d7; every released value is a row of
:attr:`CLIPLoRAConfig.RELEASED`, with its file and line): the class prompt is "a photo of a {}."
for every dataset. Each released ``datasets/*.py`` first writes its dataset's hand-written
template and then overwrites it with this prompt (e.g. datasets/dtd.py:7-10, datasets/imagenet.py:
179-188), so the ``prompt`` field is not the dataset's template and the engine never fills it in.

Deviations from the released code: the released cosine schedule steps per iteration down to 1e-6
(lora.py:76); here it steps per epoch down to 0, by the shared trainer.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.towers import UnsupportedTower
from ..config import FieldError, OptimConfig
from ..registry import METHODS
from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    Released,
    ReleasedSetting,
    cosine_logits,
)

TARGETS = ("q", "k", "v", "o")


_RELEASED = Released(
    "https://github.com/MaxZanella/CLIP-LoRA",
    (
        ReleasedSetting("rank", 2, "run_utils.py:35"),
        ReleasedSetting("lora_alpha", 1.0, "run_utils.py:36"),
        ReleasedSetting("dropout", 0.25, "run_utils.py:37"),
        ReleasedSetting("targets", ("q", "k", "v"), "run_utils.py:34"),
        ReleasedSetting("encoders", "both", "run_utils.py:33"),
        ReleasedSetting(
            "prompt", "a photo of a {}.", "datasets/*.py (e.g. dtd.py:10, imagenet.py:188)"
        ),
        ReleasedSetting("optim.optimizer", "adamw", "lora.py:75"),
        ReleasedSetting("optim.lr", 2e-4, "run_utils.py:28"),
        ReleasedSetting("optim.weight_decay", 0.01, "lora.py:75"),
        ReleasedSetting("optim.batch_size", 32, "run_utils.py:30"),
        ReleasedSetting("iterations_per_shot", 500, "run_utils.py:29, lora.py:73"),
        ReleasedSetting("optim.warmup_epochs", 0, "lora.py:76 (no warm-up)"),
        ReleasedSetting("optim.scheduler", "cosine", "lora.py:76"),
        ReleasedSetting("encoders", "vision", "run_utils.py:33 (--encoder)", preset="vision_only"),
        ReleasedSetting("encoders", "text", "run_utils.py:33 (--encoder)", preset="text_only"),
    ),
)


@dataclass(frozen=True)
class CLIPLoRAConfig(MethodConfig):
    """Attributes:
    rank: LoRA rank r.
    lora_alpha: LoRA alpha; the update is scaled by ``lora_alpha / sqrt(rank)``.
    dropout: dropout on the adapter input (training only).
    targets: attention projections adapted, from ("q", "k", "v", "o").
    encoders: "both", "vision" or "text".
    prompt: the fixed class prompt.
    iterations_per_shot: the published schedule, ``iterations_per_shot`` x shots optimiser steps
        of ``optim.batch_size``; the engine turns it into epochs for the run's classes (0: use
        ``optim``'s epochs instead). A run's own ``optim.epochs`` takes precedence.
    """

    rank: int = 2
    lora_alpha: float = 1.0
    dropout: float = 0.25
    targets: tuple[str, ...] = ("q", "k", "v")
    encoders: Literal["both", "vision", "text"] = "both"
    prompt: str = "a photo of a {}."
    iterations_per_shot: int = 500
    optim: OptimConfig = OptimConfig(
        optimizer="adamw",
        lr=2e-4,
        weight_decay=0.01,
        batch_size=32,
        epochs=10,
        warmup_epochs=0,
    )
    PRESETS = {
        # the paper's ablations: adapters in one encoder only
        "vision_only": {"encoders": "vision"},
        "text_only": {"encoders": "text"},
    }
    RELEASED = _RELEASED

    def check(self) -> None:
        super().check()
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise FieldError(f"targets: {list(self.targets)} invalid; choose from {TARGETS}")
        if self.rank < 1:
            raise FieldError(f"rank: {self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError(f"dropout: {self.dropout} must be in [0, 1)")
        if "{}" not in self.prompt:
            raise FieldError(
                f"prompt: {self.prompt!r} has no '{{}}' placeholder for the class name"
            )
        if self.iterations_per_shot < 0:
            raise FieldError(f"iterations_per_shot: {self.iterations_per_shot} must be >= 0")

    def iteration_budget(self, shots: int | None) -> int | None:
        if self.iterations_per_shot <= 0 or shots is None:
            return None
        return self.iterations_per_shot * shots


class LoRAAdapter(nn.Module):
    """A and B of every target projection of one attention block (``{t}_A [r, W]``,
    ``{t}_B [W, r]``)."""

    def __init__(self, width: int, rank: int, targets: tuple[str, ...]):
        super().__init__()
        self.targets = targets
        for t in targets:
            a = torch.empty(rank, width)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (released init_lora_param)
            self.register_parameter(f"{t}_A", nn.Parameter(a))
            self.register_parameter(f"{t}_B", nn.Parameter(torch.zeros(width, rank)))

    def delta(self, t: str) -> torch.Tensor:
        """``B_t A_t``, ``[W, W]``."""
        return getattr(self, f"{t}_B") @ getattr(self, f"{t}_A")

    def merged(self, mha: nn.MultiheadAttention, scaling: float) -> dict[str, torch.Tensor]:
        """The attention module's weights with the adapters merged (differentiable in A, B)."""
        out = {}
        if any(t in self.targets for t in "qkv"):
            zero = mha.in_proj_weight.new_zeros(mha.embed_dim, mha.embed_dim)
            deltas = [self.delta(t) * scaling if t in self.targets else zero for t in "qkv"]
            out["in_proj_weight"] = mha.in_proj_weight + torch.cat(deltas).to(
                mha.in_proj_weight.dtype
            )
        if "o" in self.targets:
            w = mha.out_proj.weight
            out["out_proj.weight"] = w + (self.delta("o") * scaling).to(w.dtype)
        return out


class _LoRAAttention(nn.Module):
    """Stands in for an ``nn.MultiheadAttention`` while a tower runs (never stored)."""

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        adapter: LoRAAdapter,
        scaling: float,
        dropout: float,
        training: bool,
    ):
        super().__init__()
        self.mha, self.adapter, self.scaling, self.p = mha, adapter, scaling, dropout
        self.training = training

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **kwargs):
        if not (self.training and self.p > 0):
            weights = self.adapter.merged(self.mha, self.scaling)
            return torch.func.functional_call(
                self.mha,
                weights,
                (query, key, value),
                {"need_weights": need_weights, "attn_mask": attn_mask, **kwargs},
            )
        return self._with_dropout(query, key, value, attn_mask), None

    def _lora(self, x: torch.Tensor, t: str) -> torch.Tensor:
        a, b = getattr(self.adapter, f"{t}_A"), getattr(self.adapter, f"{t}_B")
        x = F.dropout(x, self.p, training=True)  # one mask per projection (one Dropout each)
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scaling

    def _with_dropout(self, query, key, value, attn_mask) -> torch.Tensor:
        """Self-attention with the adapters' dropout on their inputs (cannot be merged)."""
        m = self.mha
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError(
                "CLIP-LoRA adapts self-attention only (query, key and value must be the same)"
            )
        x = query if m.batch_first else query.transpose(0, 1)  # [B, T, W]
        B, T, W = x.shape
        H = m.num_heads
        qkv = list(F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1))  # 3 x [B, T, W]
        for i, t in enumerate("qkv"):
            if t in self.adapter.targets:
                qkv[i] = qkv[i] + self._lora(x, t)
        q, k, v = (y.view(B, T, H, W // H).transpose(1, 2) for y in qkv)  # [B, H, T, W/H]
        mask = (
            attn_mask.to(q.dtype)
            if attn_mask is not None and attn_mask.is_floating_point()
            else attn_mask
        )
        if mask is not None and mask.dtype == torch.bool:
            mask = ~mask  # nn.MultiheadAttention: True = masked; SDPA: True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, W/H]
        out = out.transpose(1, 2).reshape(B, T, W)
        y = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        if "o" in self.adapter.targets:
            y = y + self._lora(out, "o")
        return y if m.batch_first else y.transpose(0, 1)


@METHODS.register("clip_lora")
class CLIPLoRA(PromptMethod):
    """Zero-shot CLIP with low-rank adapters in the attention of both encoders."""

    config_class = CLIPLoRAConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.scaling = cfg.lora_alpha / math.sqrt(cfg.rank)
        towers = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}[
            cfg.encoders
        ]
        self.towers = towers
        self.adapters = nn.ModuleDict()
        for tower in towers:
            for i, block in enumerate(self._blocks(tower)):
                mha = block.attn
                if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
                    raise ValueError(
                        f"{tower} block {i} of {backbone.arch!r} has attention "
                        f"{type(mha).__name__}; "
                        "CLIP-LoRA needs nn.MultiheadAttention with packed q/k/v projections"
                    )
                self.adapters[f"{tower}_{i}"] = LoRAAdapter(mha.embed_dim, cfg.rank, cfg.targets)
        self.on_classnames_changed()

    def _blocks(self, tower: str) -> nn.ModuleList:
        """The residual blocks of open_clip's own transformer in ``tower``; other tower types
        (timm, Hugging Face) have no packed q/k/v ``nn.MultiheadAttention`` to adapt."""
        adapter = self.backbone.vision if tower == "vision" else self.backbone.text
        module = getattr(adapter, "v", None) if tower == "vision" else getattr(adapter, "src", None)
        blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
        if blocks is None:
            raise UnsupportedTower(
                tower,
                f"open_clip transformer blocks with nn.MultiheadAttention for CLIP-LoRA "
                f"({getattr(adapter, 'kind', type(adapter).__name__)} tower)",
                "use a model whose towers are open_clip's own (e.g. ViT-B-16), or "
                "method.options.encoders=vision/text for the tower that has them",
                arch=self.backbone.arch,
            )
        return blocks

    def on_classnames_changed(self) -> None:
        tokens = self.backbone.tokenize([self.config.prompt.format(c) for c in self.classnames])
        self.register_buffer("tokens", tokens, persistent=False)

    # ------------------------------------------------------------------ adapters
    @contextlib.contextmanager
    def adapted(self, tower: str) -> Iterator[None]:
        """Run ``tower`` ("vision" / "text") with the adapters; the backbone is restored on exit."""
        if tower not in self.towers:
            yield
            return
        blocks = self._blocks(tower)
        originals = [b.attn for b in blocks]
        try:
            for i, b in enumerate(blocks):
                b.attn = _LoRAAttention(
                    originals[i],
                    self.adapters[f"{tower}_{i}"],
                    self.scaling,
                    self.config.dropout,
                    self.training,
                )
            yield
        finally:
            for b, mha in zip(blocks, originals):
                b.attn = mha

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the CLIP weights (open_clip state-dict keys) with the adapters merged in."""
        state = {k: v.detach().clone() for k, v in self.backbone.clip.state_dict().items()}
        names = {id(m): n for n, m in self.backbone.clip.named_modules()}
        for tower in self.towers:
            for i, block in enumerate(self._blocks(tower)):
                prefix = names[id(block.attn)]
                for key, value in (
                    self.adapters[f"{tower}_{i}"].merged(block.attn, self.scaling).items()
                ):
                    state[f"{prefix}.{key}"] = value.detach().clone()
        return state

    def export_merged(self, path: str | os.PathLike) -> None:
        """Write :meth:`merged_state_dict` as safetensors, loadable as open_clip weights."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.merged_state_dict().items()}, str(path))

    # ------------------------------------------------------------------ roles
    def encode_classes(self) -> torch.Tensor:
        with self.adapted("text"):
            return F.normalize(self.backbone.encode_text(self.tokens), dim=-1)  # [K, D]

    def forward_with_text(self, images: torch.Tensor, classes: Any) -> MethodOutput:
        with (
            self.adapted("vision"),
            torch.set_grad_enabled(torch.is_grad_enabled() and "vision" in self.towers),
        ):
            img = F.normalize(self.backbone.encode_image(images), dim=-1)  # [B, D]
        return MethodOutput(cosine_logits(img, classes, self.backbone.logit_scale), img, classes)
