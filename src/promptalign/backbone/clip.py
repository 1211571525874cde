"""A frozen open_clip model with seams for prompt learning.

`Backbone` wraps an open_clip ``CLIP`` / ``CustomTextCLIP`` (never a fork of it) and exposes, for
each tower, the pieces prompt-learning methods need: token embedding, the transformer blocks, the
final norm and projection, and a runner that places learnable prompt tokens into the sequence
(shallow prompts before the first block, deep prompts replacing the same slots before later
blocks). The runner returns the global feature and every token projected into the joint space.

The tower-specific steps live in one adapter per tower type (:mod:`.towers`): open_clip's own ViT
and text transformer, timm ViT / EVA image towers (SigLIP, SigLIP 2, EVA-02, register tokens) and
Hugging Face text encoders. The tokenizer's layout (start token or not, end and pad ids, length)
is read from the tokenizer (:mod:`.tokens`). With zero-length prompts the runners reproduce
open_clip's own ``encode_image`` / ``encode_text`` (tested per family to 1e-5). No method name
appears here: methods decide *what* the prompts are; the backbone only knows *where* they go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import TextConvention, probe_convention
from .towers import TextTower, UnsupportedTower, VisionTower, text_tower, vision_tower

VisionPromptPosition = Literal["after_patches", "after_cls"]


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing resolved from the architecture and its weights.

    Attributes:
        image_size: (height, width) the vision tower expects.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: resize interpolation ("bicubic", "bilinear", ...).
        resize_mode: open_clip resize mode ("shortest", "longest", "squash").
    """

    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


@dataclass
class TextFeatures:
    """Output of the prompted text tower.

    Attributes:
        pooled: the tower's global feature, projected (CLIP: at the end-of-text token; SigLIP: at
            the last position; Hugging Face towers: mean or first token). ``[*S, D]``
        tokens: every token after the final norm + projection, up to the truncated length.
            ``[*S, T', D]`` (None unless requested). Positions ``0..eot`` are the text (with its
            start token where the tokenizer has one) and its end token.
        eot: index of the end-of-text token in each sequence. ``[*S]``
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None
    eot: torch.Tensor


@dataclass
class VisionFeatures:
    """Output of the prompted vision tower.

    Attributes:
        pooled: the tower's pooled feature (class token, patch mean or attention pool) after its
            final norm + projection. ``[B, D]`` or ``[B, P, D]`` for P prompt sets.
        tokens: every token except the prefix tokens (class token, registers): patches and
            prompt tokens in sequence order, after the final norm + token-wise projection.
            ``[B, J, D]`` or ``[B, P, J, D]`` (None unless requested).
        prompt_slice: where the prompt tokens sit inside ``tokens``.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None
    prompt_slice: slice


def _broadcast_batch(*shapes: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise ValueError(
            f"prompt and token batch shapes do not broadcast: {[tuple(s) for s in shapes]}"
        ) from e


def _flat(t: torch.Tensor, batch: torch.Size, tail: int) -> torch.Tensor:
    """Expand ``t`` (batch dims + ``tail`` trailing dims) to ``batch`` and flatten the batch."""
    tail_shape = t.shape[t.dim() - tail :]
    return t.expand(*batch, *tail_shape).reshape(batch.numel(), *tail_shape)


class Backbone(nn.Module):
    """A frozen CLIP-style model with prompt seams. Build it with :func:`promptalign.load_backbone`.

    Attributes:
        clip: the wrapped open_clip model (frozen, always in eval mode).
        tokenizer: the open_clip tokenizer of this architecture.
        preprocess: image preprocessing resolved from architecture + weights.
        arch: architecture name; weights: the tag or file the weights came from (None = random).
        vision, text: the seam adapters of the two towers (:mod:`promptalign.backbone.towers`).
        convention: the tokenizer's layout (start token, end/pad ids, length).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        preprocess: Preprocess,
        arch: str,
        weights: str | None,
    ):
        super().__init__()
        try:
            vision = vision_tower(getattr(clip, "visual", None))
            text = text_tower(clip)
        except UnsupportedTower as e:
            raise UnsupportedTower(e.tower, e.seam, e.fix, arch=arch) from None
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.arch = arch
        self.weights = weights
        self.vision: VisionTower = vision
        self.text: TextTower = text
        self.convention: TextConvention = probe_convention(lambda t: tokenizer(list(t)))
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

    # ------------------------------------------------------------------ facts from the model
    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space."""
        return self.vision.embed_dim

    @property
    def text_width(self) -> int:
        return self.text.width

    @property
    def vision_width(self) -> int:
        return self.vision.width

    @property
    def text_layers(self) -> int:
        return self.text.layers

    @property
    def vision_layers(self) -> int:
        return self.vision.layers

    @property
    def context_length(self) -> int:
        """Length of every tokenized text (from the tokenizer)."""
        return self.convention.context_length

    @property
    def text_start(self) -> int:
        """Index of the first content token: 1 after a start token (CLIP, RoBERTa), 0 without
        (SigLIP's SentencePiece). Default slot of the first text prompt token."""
        return self.convention.start

    @property
    def n_patches(self) -> int:
        """Number of patch tokens of the vision tower (excluding class and register tokens)."""
        return self.vision.n_patches

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches in the vision sequence (class token, registers; 0 for
        SigLIP)."""
        return self.vision.n_prefix

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision.weight.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's (frozen) logit scale, exponentiated."""
        return self.clip.logit_scale.detach().exp()

    def train(self, mode: bool = True) -> Backbone:
        # The CLIP stays in eval mode whatever the caller does: it is frozen, and dropout or
        # patch dropout inside it would make prompt training non-deterministic.
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize with the model's own tokenizer to ``[S, context_length]`` long ids."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def token_count(self, text: str) -> int:
        """Number of content tokens of ``text`` (without start/end tokens), e.g. a class name's."""
        return int(self.convention.end_index(self.tokenize([text]))[0]) - self.text_start

    def decode_after(self, text: str, n: int) -> str:
        """The text of ``text``'s content tokens after its first ``n`` (MaPLe's literal suffix)."""
        tokens = self.tokenize([text])[0]
        ids = tokens[self.text_start + n : int(self.convention.end_index(tokens))].tolist()
        inner = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps one
        if inner is not None and hasattr(inner, "decode"):
            return inner.decode(ids, skip_special_tokens=True).strip()
        return self.tokenizer.decode(ids).strip()

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token of each sequence. ``[*S, T] -> [*S]``

        Where the text tower pools at that token (CLIP's argmax / eos pooling), its own rule;
        otherwise the tokenizer's end token (SigLIP: first ``</s>``; RoBERTa: ``</s>``)."""
        own = self.text.pool_index(tokens)
        return own if own is not None else self.convention.end_index(tokens)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings (no positional embedding). ``[*S, T] -> [*S, T, text_width]``"""
        return self.text.embed(tokens)

    # ------------------------------------------------------------------ text tower
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Same result as open_clip's ``encode_text`` (causal towers run only up to the longest
        EOT)."""
        out = self.forward_text(tokens).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def forward_text(
        self,
        tokens: torch.Tensor,
        ctx: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        deep: Sequence[torch.Tensor] | None = None,
        return_tokens: bool = False,
        truncate: bool = True,
    ) -> TextFeatures:
        """Prompted text forward.

        Args:
            tokens: token ids ``[*S, T]`` (with placeholder tokens where the context goes).
            ctx: shallow prompt ``[*Sc, n, text_width]``; replaces the embeddings at ``positions``.
                Batch dims of ``tokens``, ``ctx`` and ``deep`` broadcast, so ``tokens [1, K, T]``
                with ``ctx [N, 1, n, W]`` encodes N prompt sets for K classes in one batch.
            positions: slots the prompt occupies, ``[n]`` or ``[*Sp, n]``; default
                ``text_start .. text_start + n - 1`` (right after the start token, or at 0 for
                tokenizers without one). Deep prompts replace the same slots.
            deep: prompts for layers 1..len(deep) (each ``[*Sd, n, text_width]``), replacing the
                slots before those blocks.
            return_tokens: also return every token after the final norm + projection.
            truncate: run only up to the longest EOT in the batch where that is exact (causal
                towers pooled at the EOT); bidirectional towers always run the full length.

        Returns:
            TextFeatures with batch shape the broadcast of the inputs' batch shapes.
        """
        key_mask = self.text.key_mask(tokens) if self.text.needs_key_mask else None
        return self.forward_text_embeds(
            self.embed_tokens(tokens),
            self.eot_index(tokens),
            ctx=ctx,
            positions=positions,
            deep=deep,
            return_tokens=return_tokens,
            truncate=truncate,
            key_mask=key_mask,
        )

    def forward_text_embeds(
        self,
        embeds: torch.Tensor,
        eot: torch.Tensor,
        *,
        ctx: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        deep: Sequence[torch.Tensor] | None = None,
        return_tokens: bool = False,
        truncate: bool = True,
        key_mask: torch.Tensor | None = None,
    ) -> TextFeatures:
        """Lower seam of :meth:`forward_text`: start from word embeddings ``[*S, T, W]`` (without
        positional embedding) and EOT indices ``[*S]``; same prompt arguments. ``key_mask``
        ``[*S, T]`` (True = attend) is used by towers that mask padding; default: positions up to
        the EOT."""
        deep = list(deep or [])
        if ctx is not None:
            if ctx.shape[-1] != self.text_width:
                raise ValueError(
                    f"text prompt width {ctx.shape[-1]} does not match the text tower width "
                    f"{self.text_width} of {self.arch!r}"
                )
            if positions is None:
                start = self.text_start
                positions = torch.arange(start, start + ctx.shape[-2], device=embeds.device)
        if deep and positions is None:
            raise ValueError(
                "deep text prompts need `positions` or a shallow `ctx` to define their slots"
            )
        if len(deep) > self.text_layers - 1:
            raise ValueError(
                f"{len(deep)} deep text prompts given but the text tower has {self.text_layers} "
                f"layers (at most {self.text_layers - 1} deep prompts)"
            )
        shapes = [embeds.shape[:-2], eot.shape]
        if ctx is not None:
            shapes.append(ctx.shape[:-2])
        if positions is not None:
            shapes.append(positions.shape[:-1])
        if key_mask is not None:
            shapes.append(key_mask.shape[:-1])
        shapes += [d.shape[:-2] for d in deep]
        batch = _broadcast_batch(*shapes)

        x = _flat(embeds, batch, 2)  # [S, T, W]
        eot_f = eot.expand(batch).reshape(-1)  # [S]
        pos_f = None
        if positions is not None:
            pos_f = _flat(positions, batch, 1)  # [S, n]
        seq_len = x.shape[1]
        end = int(eot_f.max().item()) + 1 if eot_f.numel() else seq_len
        if pos_f is not None and pos_f.numel() and int(pos_f.max().item()) >= end:
            raise ValueError(
                f"a prompt slot (position {int(pos_f.max())}) lies after the end-of-text token "
                f"(longest EOT at {end - 1}); put the placeholders before EOT"
            )
        run_len = end if truncate and self.text.truncatable else seq_len
        x = x[:, :run_len]
        if ctx is not None:
            x = self._place(x, _flat(ctx, batch, 2).to(x.dtype), pos_f)
        mask_f = None
        if self.text.needs_key_mask:
            if key_mask is None:
                mask_f = torch.arange(run_len, device=x.device) <= eot_f.unsqueeze(-1)  # [S, T']
            else:
                mask_f = _flat(key_mask, batch, 1)[:, :run_len]
        deep_f = [_flat(d, batch, 2) for d in deep]

        def before_block(i: int, h: torch.Tensor) -> torch.Tensor:
            if 1 <= i <= len(deep_f):
                return self._place(h, deep_f[i - 1].to(h.dtype), pos_f)
            return h

        pooled, hidden = self.text.encode(x, eot_f, mask_f, before_block)
        tokens = self.text.project(hidden) if return_tokens else None
        return TextFeatures(
            pooled=pooled.reshape(*batch, -1),
            tokens=tokens.reshape(*batch, *tokens.shape[1:]) if tokens is not None else None,
            eot=eot_f.reshape(batch),
        )

    @staticmethod
    def _place(
        x: torch.Tensor, prompt: torch.Tensor, positions: torch.Tensor | None
    ) -> torch.Tensor:
        """Out-of-place write of ``prompt [S, n, W]`` into ``x [S, T, W]`` at
        ``positions [S, n]``."""
        if prompt.shape[1] == 0:
            return x
        if positions is None:
            raise ValueError("prompt slots unknown: pass `positions`")
        if positions.shape[-1] != prompt.shape[1]:
            raise ValueError(
                f"{positions.shape[-1]} prompt positions given for {prompt.shape[1]} prompt tokens"
            )
        index = positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.scatter(1, index, prompt)

    # ------------------------------------------------------------------ vision tower
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Same result as open_clip's ``encode_image``."""
        out = self.forward_image(images).pooled
        return F.normalize(out, dim=-1) if normalize else out

    def forward_image(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None = None,
        *,
        deep: Sequence[torch.Tensor] | None = None,
        position: VisionPromptPosition = "after_patches",
        return_tokens: bool = False,
    ) -> VisionFeatures:
        """Prompted image forward.

        Args:
            images: ``[B, 3, H, W]`` preprocessed images.
            prompts: shallow visual prompt ``[n, vision_width]`` (one set) or
                ``[P, n, vision_width]`` (P sets; every image is encoded once per set and outputs
                gain a P axis). Inserted after the positional embedding, before the pre-block norm.
            deep: prompts for layers 1..len(deep), each ``[n, W]`` or ``[P, n, W]``, replacing the
                prompt slots before those blocks.
            position: "after_patches" (MaPLe / VPT / IVLP) or "after_cls" (UPT): after the prefix
                tokens (class token and registers; at 0 for towers without them).
            return_tokens: also return every non-prefix token after the final norm + projection.
        """
        if position not in ("after_patches", "after_cls"):
            raise ValueError(
                f"visual prompt position {position!r} unknown; use 'after_patches' or 'after_cls'"
            )
        tower = self.vision
        deep = list(deep or [])
        if deep and prompts is None:
            raise ValueError("deep visual prompts need shallow `prompts` to define their slots")
        if len(deep) > self.vision_layers - 1:
            raise ValueError(
                f"{len(deep)} deep visual prompts given but the vision tower has "
                f"{self.vision_layers} layers (at most {self.vision_layers - 1} deep prompts)"
            )
        B = images.shape[0]
        x, aux = tower.embed(images)  # [B, prefix + G, W]

        n_sets: int | None = None
        n = 0
        start = tower.n_prefix if position == "after_cls" else x.shape[1]
        if prompts is not None:
            if prompts.shape[-1] != self.vision_width:
                raise ValueError(
                    f"visual prompt width {prompts.shape[-1]} does not match the vision tower "
                    f"width {self.vision_width} of {self.arch!r}"
                )
            if prompts.dim() == 3:
                n_sets = prompts.shape[0]
                x = x.unsqueeze(1).expand(B, n_sets, *x.shape[1:]).reshape(B * n_sets, *x.shape[1:])
            elif prompts.dim() != 2:
                raise ValueError(
                    f"visual prompts must be [n, W] or [P, n, W], got {tuple(prompts.shape)}"
                )
            n = prompts.shape[-2]
            p = self._expand_visual(prompts, B, n_sets).to(x.dtype)  # [B*P, n, W]
            x = torch.cat([x[:, :start], p, x[:, start:]], dim=1)
        x = tower.pre(x)

        run = tower.runner(aux, start, n)
        for i in range(self.vision_layers):
            if 1 <= i <= len(deep):
                d = self._expand_visual(deep[i - 1], B, n_sets).to(x.dtype)
                if d.shape[1] != n:
                    raise ValueError(
                        f"deep visual prompt for layer {i} has {d.shape[1]} tokens, "
                        f"the shallow prompt {n}"
                    )
                x = torch.cat([x[:, :start], d, x[:, start + n :]], dim=1)
            x = run(i, x)

        # the tower pools over its own tokens; prompts acted through attention
        own = torch.cat([x[:, :start], x[:, start + n :]], dim=1) if n else x
        pooled = tower.pool(own)
        tokens = tower.tokens(x)[:, tower.n_prefix :] if return_tokens else None
        lead = (B, n_sets) if n_sets is not None else (B,)
        first = start - tower.n_prefix
        return VisionFeatures(
            pooled=pooled.reshape(*lead, -1),
            tokens=tokens.reshape(*lead, *tokens.shape[1:]) if tokens is not None else None,
            prompt_slice=slice(first, first + n),
        )

    @staticmethod
    def _expand_visual(p: torch.Tensor, batch: int, n_sets: int | None) -> torch.Tensor:
        """``[n, W]`` or ``[P, n, W]`` -> ``[B*P, n, W]`` matching the flattened image batch."""
        if n_sets is None:
            if p.dim() != 2:
                raise ValueError(f"expected a visual prompt [n, W], got {tuple(p.shape)}")
            return p.unsqueeze(0).expand(batch, -1, -1)
        if p.dim() == 2:
            p = p.unsqueeze(0).expand(n_sets, -1, -1)
        if p.shape[0] != n_sets:
            raise ValueError(f"visual prompt has {p.shape[0]} sets, expected {n_sets}")
        return p.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * n_sets, *p.shape[1:])
