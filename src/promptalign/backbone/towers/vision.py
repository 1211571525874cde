"""Seams of the ViT image towers open_clip builds: its own ``VisionTransformer`` and timm ViTs.

Each adapter exposes the same five steps (open_clip's ``_embeds -> transformer -> _pool -> proj``,
timm's ``patch_embed -> _pos_embed -> norm_pre -> blocks -> norm -> forward_head``):

* ``embed(images)``: tokens with positional embedding, prefix tokens (class token, registers)
  first; prompts are inserted into this sequence by the backbone;
* ``pre(x)``: the norm before the blocks;
* ``runner(aux, at, n)``: a callable running block ``i``; ``aux`` carries what the blocks need
  besides the tokens (timm EVA's rotary embedding), adjusted for ``n`` prompt tokens at ``at``;
* ``pool(x)``: the tower's own pooling, norm and projection on a sequence without prompt tokens;
* ``tokens(x)``: every token after the final norm and the (token-wise) projection.

Prompt tokens carry no position: they are inserted after the absolute positional embedding is
added, and for rotary towers they receive the identity rotation (sin 0, cos 1), as the prefix
tokens do. They reach the pooled feature only through attention in the blocks; the tower pools
over its own tokens (class token, mean over patches, or the attention-pool "map" head of SigLIP).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedTower

Runner = Callable[[int, torch.Tensor], torch.Tensor]


def _linear_out(module: nn.Module | None, default: int) -> int:
    """Output width of the last Linear in ``module`` (``default`` when it has none)."""
    if module is None:
        return default
    out = default
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out = m.out_features
    return out


class VisionTower(abc.ABC):
    """Common interface; subclasses wrap one tower type (no parameters of their own)."""

    kind: str = ""
    width: int
    layers: int
    n_prefix: int
    n_patches: int
    embed_dim: int

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images -> prefix (class/register) + patch tokens ``[B, P+G, W]`` with absolute positions
        where the tower adds them, and the state its blocks need (e.g. rotary positions)."""

    @abc.abstractmethod
    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """What the tower applies after the prompts are inserted, before block 0 (pre-norm)."""

    @abc.abstractmethod
    def runner(self, aux: Any, at: int, n: int) -> Runner:
        """``(i, x) -> x`` running block ``i``, with ``n`` prompt tokens at position ``at`` (rotary
        towers give them an identity rotation)."""

    @abc.abstractmethod
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens -> the tower's pooled, projected feature."""

    @abc.abstractmethod
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens -> every non-prefix token, normed and projected."""

    @property
    @abc.abstractmethod
    def weight(self) -> torch.Tensor:
        """A parameter of the tower, for its dtype and device."""


class OpenCLIPViT(VisionTower):
    """open_clip's ``VisionTransformer`` (OpenAI CLIP, LAION ViT-B/L/H/g, ...)."""

    kind = "open_clip ViT"

    def __init__(self, visual: nn.Module):
        self.v = visual
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedTower(
                "vision",
                "attentional pooler of open_clip's VisionTransformer (attentional_pool)",
                "choose a config without attentional_pool (CLS-token or mean pooling)",
            )
        if visual.pool_type not in ("tok", "avg"):
            raise UnsupportedTower(
                "vision",
                f"pool_type {visual.pool_type!r} of open_clip's VisionTransformer",
                "use pool_type 'tok' or 'avg'",
            )
        self.width = visual.class_embedding.shape[-1]
        self.layers = len(visual.transformer.resblocks)
        self.n_prefix = 1
        self.n_patches = visual.positional_embedding.shape[0] - 1
        self.embed_dim = visual.proj.shape[1] if visual.proj is not None else self.width
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    @property
    def weight(self) -> torch.Tensor:
        return self.v.conv1.weight

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        v = self.v
        B = images.shape[0]
        x = v.conv1(images.to(self.weight.dtype))  # [B, W, gh, gw]
        x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)  # [B, G, W]
        cls = v.class_embedding.view(1, 1, -1).expand(B, -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, 1+G, W]
        return v.patch_dropout(x), None

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.ln_pre(x)

    def runner(self, aux: None, at: int, n: int) -> Runner:
        blocks = self.v.transformer.resblocks
        if self.batch_first:
            return lambda i, x: blocks[i](x)
        return lambda i, x: blocks[i](x.transpose(0, 1)).transpose(0, 1)

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.v.proj if self.v.proj is not None else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        if v.final_ln_after_pool:
            pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
            return self._proj(v.ln_post(pooled))
        x = v.ln_post(x)
        return self._proj(x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self._proj(self.v.ln_post(x))


class TimmViT(VisionTower):
    """A timm ViT trunk inside open_clip's ``TimmModel``: ``VisionTransformer`` (class token or
    not, register tokens, absolute positions, "token"/"avg"/"map" pooling: SigLIP, SigLIP 2,
    DINOv2-style registers) and ``Eva`` (EVA-02 and PE with rotary positions)."""

    kind = "timm ViT"
    _SEAMS = (
        "patch_embed",
        "_pos_embed",
        "norm_pre",
        "blocks",
        "norm",
        "forward_head",
        "num_prefix_tokens",
    )

    def __init__(self, visual: nn.Module):
        self.visual = visual
        trunk = visual.trunk
        missing = [s for s in self._SEAMS if not hasattr(trunk, s)]
        if missing:
            raise UnsupportedTower(
                "vision",
                f"token-sequence seams {missing} of timm model {type(trunk).__name__}",
                "prompt learning needs a timm ViT trunk (VisionTransformer or Eva); convolutional "
                "and hierarchical towers (ConvNeXt, FastViT, Swin) have no prompt token sequence",
            )
        self.trunk = trunk
        self.rope = getattr(trunk, "rope", None) is not None
        self.rope_per_block = bool(getattr(trunk, "rope_mixed", False))
        self.width = int(trunk.embed_dim)
        self.layers = len(trunk.blocks)
        self.n_prefix = int(trunk.num_prefix_tokens)
        self.n_patches = int(trunk.patch_embed.num_patches)
        self.embed_dim = _linear_out(visual.head, _linear_out(trunk.head, int(trunk.num_features)))

    @property
    def weight(self) -> torch.Tensor:
        return next(self.trunk.patch_embed.parameters())  # a conv stem (ViTamin) has no .proj

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.trunk
        x = t.patch_embed(images.to(self.weight.dtype))
        out = t._pos_embed(x)
        if isinstance(out, tuple):  # Eva: (tokens, rotary embedding)
            x, rope = out
        else:
            x, rope = t.patch_drop(out), None
        if x.dim() != 3:
            raise UnsupportedTower(
                "vision", "a [B, L, W] token sequence after _pos_embed", "use a ViT trunk"
            )
        return x, rope

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.norm_pre(x)

    @staticmethod
    def _identity_rows(rope: torch.Tensor, at: int, n: int) -> torch.Tensor:
        """Insert ``n`` identity rotations (sin 0, cos 1) at ``at`` along the token axis (-2)."""
        if n == 0:
            return rope
        half = rope.shape[-1] // 2
        shape = (*rope.shape[:-2], n, half)
        ident = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
        return torch.cat([rope[..., :at, :], ident, rope[..., at:, :]], dim=-2)

    def runner(self, aux: torch.Tensor | None, at: int, n: int) -> Runner:
        blocks = self.trunk.blocks
        if not self.rope or aux is None:
            return lambda i, x: blocks[i](x)
        # rotary embeddings cover the tokens after the prefix: prompt slots sit at at - n_prefix
        rel = at - self.n_prefix
        if self.rope_per_block:
            ropes = [self._identity_rows(aux[i], rel, n) for i in range(self.layers)]
            return lambda i, x: blocks[i](x, rope=ropes[i])
        rope = self._identity_rows(aux, rel, n)
        return lambda i, x: blocks[i](x, rope=rope)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.fc_norm(t.norm(x)) if hasattr(t, "fc_norm") else t.norm(x)
        return self.visual.head(t.head(x))


def vision_tower(visual: nn.Module | None) -> VisionTower:
    """The adapter for an open_clip image tower, or an error naming the seam it lacks."""
    if visual is None:
        raise UnsupportedTower("vision", "an image tower (model.visual)", "load a CLIP-style model")
    if hasattr(visual, "trunk"):
        return TimmViT(visual)
    if all(
        hasattr(visual, a)
        for a in ("conv1", "class_embedding", "positional_embedding", "transformer")
    ):
        return OpenCLIPViT(visual)
    raise UnsupportedTower(
        "vision",
        "token-sequence seams (patch embedding, class token, transformer) of "
        f"{type(visual).__name__}",
        "prompt learning needs a ViT image tower: open_clip's VisionTransformer or a timm ViT/EVA "
        "trunk (ResNet towers such as RN50 are not supported)",
    )
