"""Seams of the text towers open_clip builds: its own ``TextTransformer`` (CLIP's causal tower,
SigLIP's bidirectional one pooled at the last position) and ``HFTextEncoder`` (a Hugging Face
encoder such as RoBERTa / XLM-RoBERTa / mT5 with mean or CLS pooling).

Each adapter turns word embeddings (prompts already placed by the backbone) into the pooled,
projected feature and the final hidden states; ``before_block(i, x)`` is called before block
``i`` so the backbone can replace deep-prompt slots. With no prompts the result equals the
tower's own forward (tested per family).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from .errors import UnsupportedTower

BeforeBlock = Callable[[int, torch.Tensor], torch.Tensor]


def _project(x: torch.Tensor, proj: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if proj is None:
        return x
    if isinstance(proj, nn.Module):
        return proj(x)
    return x @ proj


class TextTower(abc.ABC):
    """Common interface; subclasses wrap one tower type (no parameters of their own).

    Attributes:
        width, layers: token width and block count.
        pool: "eot" (pooled at the end-of-text index: CLIP), "last" / "first" (a fixed position:
            SigLIP pools the last one), or "mean" / "cls" (Hugging Face poolers).
        truncatable: running only up to the longest end-of-text token gives the same result
            (causal attention pooled at the end-of-text token).
    """

    kind = ""
    width: int
    layers: int
    pool: str
    truncatable: bool = False
    needs_key_mask: bool = False

    @abc.abstractmethod
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[S, T]`` -> word embeddings ``[S, T, W]`` (no positions yet)."""

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Where the tower pools for these tokens, when it pools at the end-of-text token."""
        return None

    def key_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """``[S, T]`` True for tokens attention may look at, when the tower masks padding."""
        return None

    @abc.abstractmethod
    def encode(
        self,
        x: torch.Tensor,
        eot: torch.Tensor,
        key_mask: torch.Tensor | None,
        before_block: BeforeBlock,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [S, T, W]`` word embeddings -> (pooled ``[S, D]``, final hidden ``[S, T, W]``)."""

    @abc.abstractmethod
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> joint space, token-wise."""

    @property
    @abc.abstractmethod
    def weight(self) -> torch.Tensor:
        """A parameter of the tower, for its dtype and device."""


class OpenCLIPText(TextTower):
    """open_clip's ``TextTransformer`` (the CLIP model's own attributes, or ``.text`` of a
    ``CustomTextCLIP``): causal or bidirectional (``no_causal_mask``), pooled at the end-of-text
    token (``argmax`` / ``eos``) or at a fixed position (``last``: SigLIP, ``first``)."""

    kind = "open_clip text transformer"

    def __init__(self, model: nn.Module):
        src = model.text if hasattr(model, "text") else model
        self.src = src
        if getattr(src, "cls_emb", None) is not None:
            raise UnsupportedTower(
                "text",
                "a text tower without an appended CLS embedding (CoCa's embed_cls)",
                "CoCa-style text towers are not supported",
            )
        pool = getattr(src, "pool_type", getattr(model, "text_pool_type", "argmax"))
        if pool not in ("argmax", "eos", "last", "first"):
            raise UnsupportedTower(
                "text",
                f"a pooled text feature (pool_type {pool!r} returns every token)",
                "use pool_type 'argmax', 'eos', 'last' or 'first'",
            )
        self.pool_type = pool
        self.pool = "eot" if pool in ("argmax", "eos") else pool
        self.eos_id = getattr(src, "eos_id", getattr(model, "text_eos_id", None))
        self.causal = getattr(src, "attn_mask", None) is not None
        self.use_pad_mask = bool(getattr(src, "use_pad_mask", False))
        self.needs_key_mask = self.use_pad_mask
        self.pad_id = getattr(src, "pad_id", 0)
        self.truncatable = self.causal and self.pool == "eot" and not self.use_pad_mask
        self.width = src.token_embedding.embedding_dim
        self.layers = len(src.transformer.resblocks)
        self.heads = getattr(src, "heads", None)
        self.batch_first = getattr(src.transformer, "batch_first", True)

    @property
    def weight(self) -> torch.Tensor:
        return self.src.token_embedding.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.src.token_embedding(tokens).to(self.src.transformer.get_cast_dtype())

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return None

    def key_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return tokens != self.pad_id if self.use_pad_mask else None

    def encode(self, x, eot, key_mask, before_block):
        src = self.src
        L = x.shape[1]
        x = x + src.positional_embedding[:L].to(x.dtype)
        mask = src.attn_mask[:L, :L] if self.causal else None
        if self.use_pad_mask and key_mask is not None:
            # open_clip's TextTransformer._build_additive_mask: -inf on padded keys, per head
            add = torch.zeros(key_mask.shape[0], L, L, dtype=x.dtype, device=x.device)
            add.masked_fill_(~key_mask[:, None, :L].expand(-1, L, -1), float("-inf"))
            add = add.repeat_interleave(self.heads, 0)
            mask = add if mask is None else mask.unsqueeze(0) + add
        for i, block in enumerate(src.transformer.resblocks):
            x = before_block(i, x)
            if self.batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = src.ln_final(x)  # [S, T, W]
        if self.pool == "eot":
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        elif self.pool == "last":
            pooled = x[:, -1]
        else:
            pooled = x[:, 0]
        return _project(pooled, src.text_projection), x

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return _project(hidden, self.src.text_projection)


class HFText(TextTower):
    """open_clip's ``HFTextEncoder``: a Hugging Face encoder run from ``inputs_embeds``; deep
    prompts are written into the hidden states by forward pre-hooks on its layers."""

    kind = "Hugging Face text encoder"
    needs_key_mask = True

    def __init__(self, model: nn.Module):
        enc = model.text
        self.enc = enc
        self.model = enc.transformer
        self.pad_id = int(enc.config.pad_token_id)
        pooler = type(enc.pooler).__name__
        self.pool = {
            "MeanPooler": "mean",
            "ClsPooler": "cls",
            "ClsLastHiddenStatePooler": "cls",
        }.get(pooler)
        if self.pool is None:
            raise UnsupportedTower(
                "text",
                f"a pooler promptalign can place prompts under (got {pooler})",
                "use hf_pooler_type 'mean_pooler' or 'cls_pooler'",
            )
        self._layers = self._find_layers()
        self.layers = len(self._layers)
        self.width = self.model.get_input_embeddings().embedding_dim

    def _find_layers(self) -> nn.ModuleList:
        from open_clip.hf_configs import arch_dict

        names = []
        entry = arch_dict.get(getattr(self.enc.config, "model_type", ""), {})
        if "layer_attr" in entry.get("config_names", {}):
            names.append(entry["config_names"]["layer_attr"])
        names += ["layer", "layers", "block"]
        for owner in (getattr(self.model, "encoder", None), self.model):
            for name in names:
                layers = getattr(owner, name, None) if owner is not None else None
                if isinstance(layers, nn.ModuleList):
                    return layers
        raise UnsupportedTower(
            "text",
            f"the list of transformer layers of {type(self.model).__name__}",
            "deep prompts need the encoder's layer list (encoder.layer / block / layers)",
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(tokens)

    def key_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens != self.pad_id  # HFTextEncoder.forward's attention mask

    def encode(self, x, eot, key_mask, before_block):
        handles = []
        for i, layer in enumerate(self._layers):

            def hook(module, args, kwargs, i=i):
                if args:
                    return (before_block(i, args[0]), *args[1:]), kwargs
                kwargs["hidden_states"] = before_block(i, kwargs["hidden_states"])
                return args, kwargs

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            mask = key_mask.long()
            out = self.model(inputs_embeds=x, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
        pooled = self.enc.proj(self.enc.pooler(out, mask))
        return pooled, out.last_hidden_state

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.enc.proj(hidden)


def text_tower(model: nn.Module) -> TextTower:
    """The adapter for an open_clip text tower, or an error naming the seam it lacks."""
    src = getattr(model, "text", model)
    if hasattr(src, "transformer") and hasattr(src, "pooler") and hasattr(src, "config"):
        return HFText(model)
    if all(
        hasattr(src, a)
        for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
    ):
        return OpenCLIPText(model)
    raise UnsupportedTower(
        "text",
        f"token embedding / transformer / final norm of {type(src).__name__}",
        "prompt learning needs open_clip's TextTransformer or a Hugging Face encoder tower",
    )
