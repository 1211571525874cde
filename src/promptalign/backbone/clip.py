"""A frozen open_clip model with seams for prompt learning.

`Backbone` wraps an open_clip ``CLIP`` / ``CustomTextCLIP`` (never a fork of it) and exposes, for
each tower, the pieces prompt-learning methods need: token embedding, the transformer blocks, the
final norm and projection, and a runner that places learnable prompt tokens into the sequence
(shallow prompts before the first block, deep prompts replacing the same slots before later
blocks). The runner returns the global feature and every token projected into the joint space.

With zero-length prompts the runners reproduce open_clip's own ``encode_image`` / ``encode_text``
(the tests hold this to 1e-6). No method name appears here: methods decide *what* the prompts are;
the backbone only knows *where* they go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
        pooled: global feature at the end-of-text token, projected. ``[*S, D]``
        tokens: every token after ln_final + projection, up to the truncated length. ``[*S, T', D]``
            (None unless requested).
        eot: index of the end-of-text token in each sequence. ``[*S]``
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None
    eot: torch.Tensor


@dataclass
class VisionFeatures:
    """Output of the prompted vision tower.

    Attributes:
        pooled: CLS token after ln_post + projection. ``[B, D]`` or ``[B, P, D]`` for P prompt sets.
        tokens: every token except CLS (patches and prompt tokens, in sequence order) after
            ln_post + projection. ``[B, J, D]`` or ``[B, P, J, D]`` (None unless requested).
        prompt_slice: where the prompt tokens sit inside ``tokens``.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None
    prompt_slice: slice


class _TextParts:
    """Uniform view of the text tower of ``CLIP`` (attributes on the model) and
    ``CustomTextCLIP`` (a ``TextTransformer`` under ``.text``)."""

    def __init__(self, model: nn.Module):
        src = model.text if hasattr(model, "text") else model
        self.token_embedding: nn.Embedding = src.token_embedding
        self.positional_embedding: torch.Tensor = src.positional_embedding
        self.transformer: nn.Module = src.transformer
        self.ln_final: nn.Module = src.ln_final
        self.text_projection = src.text_projection
        self.attn_mask_owner = src
        self.pool_type: str = getattr(src, "pool_type", getattr(model, "text_pool_type", "argmax"))
        self.eos_id = getattr(src, "eos_id", getattr(model, "text_eos_id", None))
        if getattr(src, "cls_emb", None) is not None:
            raise ValueError(
                "text towers with an appended CLS embedding (CoCa) are not supported: prompt "
                "learning needs a causal CLIP text tower pooled at its end-of-text token"
            )
        if getattr(src, "attn_mask", None) is None:
            raise ValueError(
                "the text tower has no causal attention mask; promptalign needs a causal CLIP "
                "text tower (choose an architecture without 'no_causal_mask')"
            )
        if self.pool_type not in ("argmax", "eos"):
            raise ValueError(
                f"text pool_type {self.pool_type!r} is not supported; use an architecture whose "
                "text tower pools at the end-of-text token ('argmax' or 'eos')"
            )

    @property
    def attn_mask(self) -> torch.Tensor:
        return self.attn_mask_owner.attn_mask


def _project(x: torch.Tensor, proj: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj


def _broadcast_batch(*shapes: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise ValueError(
            f"prompt and token batch shapes do not broadcast: {[tuple(s) for s in shapes]}"
        ) from e


def _flat(t: torch.Tensor, batch: torch.Size, tail: int) -> torch.Tensor:
    """Expand ``t`` (batch dims + ``tail`` trailing dims) to ``batch`` and flatten the batch."""
    tail_shape = t.shape[t.dim() - tail:]
    return t.expand(*batch, *tail_shape).reshape(batch.numel(), *tail_shape)


class Backbone(nn.Module):
    """A frozen CLIP with prompt seams. Build it with :func:`promptalign.load_backbone`.

    Attributes:
        clip: the wrapped open_clip model (frozen, always in eval mode).
        tokenizer: the open_clip tokenizer of this architecture.
        preprocess: image preprocessing resolved from architecture + weights.
        arch: architecture name; weights: the tag or file the weights came from (None = random).
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
        visual = getattr(clip, "visual", None)
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer"):
            if not hasattr(visual, attr):
                raise ValueError(
                    f"architecture {arch!r}: the vision tower is {type(visual).__name__}, not an "
                    "open_clip VisionTransformer; prompt learning needs a ViT image tower"
                )
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError(
                f"architecture {arch!r}: the vision tower pools with "
                f"{getattr(visual, 'pool_type', '?')!r}/attention pooling; promptalign needs CLS-token pooling"
            )
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.arch = arch
        self.weights = weights
        self._text = _TextParts(clip)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

    # ------------------------------------------------------------------ facts from the model
    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space."""
        proj = self.clip.visual.proj
        return proj.shape[1] if proj is not None else self.vision_width

    @property
    def text_width(self) -> int:
        return self._text.token_embedding.embedding_dim

    @property
    def vision_width(self) -> int:
        return self.clip.visual.class_embedding.shape[-1]

    @property
    def text_layers(self) -> int:
        return len(self._text.transformer.resblocks)

    @property
    def vision_layers(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self._text.positional_embedding.shape[0]

    @property
    def n_patches(self) -> int:
        """Number of patch tokens (excluding CLS) of the vision tower."""
        return self.clip.visual.positional_embedding.shape[0] - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's (frozen) logit scale, exponentiated."""
        return self.clip.logit_scale.detach().exp()

    def train(self, mode: bool = True) -> "Backbone":
        # The CLIP stays in eval mode whatever the caller does: it is frozen, and dropout or
        # patch dropout inside it would make prompt training non-deterministic.
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize to ``[S, context_length]`` long tensor (SOS ... EOT, zero padded)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def token_count(self, text: str) -> int:
        """Number of BPE tokens of ``text`` without SOS/EOT (e.g. a class name's length)."""
        return len(self.tokenizer.encode(text))

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token of each sequence. ``[*S, T] -> [*S]``"""
        if self._text.pool_type == "eos":
            return (tokens == self._text.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings (no positional embedding). ``[*S, T] -> [*S, T, text_width]``"""
        cast = self._text.transformer.get_cast_dtype()
        return self._text.token_embedding(tokens).to(cast)

    # ------------------------------------------------------------------ text tower
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Same result as open_clip's ``encode_text`` (run only up to the longest EOT)."""
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
            positions: slots the prompt occupies, ``[n]`` or ``[*Sp, n]``; default ``1..n``
                (right after SOS). Deep prompts replace the same slots.
            deep: prompts for layers 1..len(deep) (each ``[*Sd, n, text_width]``), replacing the
                slots before those blocks.
            return_tokens: also return every token after ln_final + projection.
            truncate: run only up to the longest EOT in the batch. Exact under the causal mask.

        Returns:
            TextFeatures with batch shape the broadcast of the inputs' batch shapes.
        """
        return self.forward_text_embeds(
            self.embed_tokens(tokens), self.eot_index(tokens), ctx=ctx, positions=positions, deep=deep,
            return_tokens=return_tokens, truncate=truncate,
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
    ) -> TextFeatures:
        """Lower seam of :meth:`forward_text`: start from word embeddings ``[*S, T, W]`` (without
        positional embedding) and EOT indices ``[*S]``; same prompt arguments."""
        deep = list(deep or [])
        if ctx is not None:
            if ctx.shape[-1] != self.text_width:
                raise ValueError(
                    f"text prompt width {ctx.shape[-1]} does not match the text tower width "
                    f"{self.text_width} of {self.arch!r}"
                )
            if positions is None:
                positions = torch.arange(1, 1 + ctx.shape[-2], device=embeds.device)
        if deep and positions is None:
            raise ValueError("deep text prompts need `positions` or a shallow `ctx` to define their slots")
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
        shapes += [d.shape[:-2] for d in deep]
        batch = _broadcast_batch(*shapes)

        x = _flat(embeds, batch, 2)  # [S, T, W]
        eot_f = eot.expand(batch).reshape(-1)  # [S]
        pos_f = None
        if positions is not None:
            pos_f = _flat(positions, batch, 1)  # [S, n]
        seq_len = x.shape[1]
        run_len = int(eot_f.max().item()) + 1 if truncate and eot_f.numel() else seq_len
        if pos_f is not None and pos_f.numel() and int(pos_f.max().item()) >= run_len:
            raise ValueError(
                f"a prompt slot (position {int(pos_f.max())}) lies after the end-of-text token "
                f"(longest EOT at {run_len - 1}); put the placeholders before EOT"
            )
        x = x[:, :run_len]
        if ctx is not None:
            x = self._place(x, _flat(ctx, batch, 2).to(x.dtype), pos_f)

        t = self._text
        x = x + t.positional_embedding[:run_len].to(x.dtype)
        mask = t.attn_mask
        mask = mask[:run_len, :run_len] if mask is not None else None
        batch_first = getattr(t.transformer, "batch_first", True)
        for i, block in enumerate(t.transformer.resblocks):
            if 1 <= i <= len(deep):
                x = self._place(x, _flat(deep[i - 1], batch, 2).to(x.dtype), pos_f)
            if batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = t.ln_final(x)  # [S, T', W]
        pooled = _project(x[torch.arange(x.shape[0], device=x.device), eot_f], t.text_projection)
        tokens = _project(x, t.text_projection) if return_tokens else None
        return TextFeatures(
            pooled=pooled.reshape(*batch, -1),
            tokens=tokens.reshape(*batch, *tokens.shape[1:]) if tokens is not None else None,
            eot=eot_f.reshape(batch),
        )

    @staticmethod
    def _place(x: torch.Tensor, prompt: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Out-of-place write of ``prompt [S, n, W]`` into ``x [S, T, W]`` at ``positions [S, n]``."""
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
            prompts: shallow visual prompt ``[n, vision_width]`` (one set) or ``[P, n, vision_width]``
                (P sets; every image is encoded once per set and outputs gain a P axis). Inserted
                after the positional embedding, before ln_pre.
            deep: prompts for layers 1..len(deep), each ``[n, W]`` or ``[P, n, W]``, replacing the
                prompt slots before those blocks.
            position: "after_patches" (MaPLe / VPT / IVLP) or "after_cls" (UPT).
            return_tokens: also return every non-CLS token after ln_post + projection.
        """
        if position not in ("after_patches", "after_cls"):
            raise ValueError(
                f"visual prompt position {position!r} unknown; use 'after_patches' or 'after_cls'"
            )
        v = self.clip.visual
        deep = list(deep or [])
        if deep and prompts is None:
            raise ValueError("deep visual prompts need shallow `prompts` to define their slots")
        if len(deep) > self.vision_layers - 1:
            raise ValueError(
                f"{len(deep)} deep visual prompts given but the vision tower has "
                f"{self.vision_layers} layers (at most {self.vision_layers - 1} deep prompts)"
            )
        B = images.shape[0]
        x = v.conv1(images.to(self.dtype))  # [B, W, gh, gw]
        x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)  # [B, G, W]
        cls = v.class_embedding.view(1, 1, -1).expand(B, -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, 1+G, W]
        x = v.patch_dropout(x)

        n_sets: int | None = None
        n = 0
        start = 1 if position == "after_cls" else x.shape[1]
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
                raise ValueError(f"visual prompts must be [n, W] or [P, n, W], got {tuple(prompts.shape)}")
            n = prompts.shape[-2]
            p = self._expand_visual(prompts, B, n_sets).to(x.dtype)  # [B*P, n, W]
            x = torch.cat([x[:, :start], p, x[:, start:]], dim=1)
        x = v.ln_pre(x)

        batch_first = getattr(v.transformer, "batch_first", True)
        for i, block in enumerate(v.transformer.resblocks):
            if 1 <= i <= len(deep):
                d = self._expand_visual(deep[i - 1], B, n_sets).to(x.dtype)
                if d.shape[1] != n:
                    raise ValueError(
                        f"deep visual prompt for layer {i} has {d.shape[1]} tokens, the shallow prompt {n}"
                    )
                x = torch.cat([x[:, :start], d, x[:, start + n:]], dim=1)
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)

        if return_tokens or not v.final_ln_after_pool:
            x = v.ln_post(x)
            pooled = x[:, 0]
        else:
            pooled = v.ln_post(x[:, 0])
        pooled = _project(pooled, v.proj)
        tokens = _project(x[:, 1:], v.proj) if return_tokens else None
        lead = (B, n_sets) if n_sets is not None else (B,)
        return VisionFeatures(
            pooled=pooled.reshape(*lead, -1),
            tokens=tokens.reshape(*lead, *tokens.shape[1:]) if tokens is not None else None,
            prompt_slice=slice(start - 1, start - 1 + n),
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
