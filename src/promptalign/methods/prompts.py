"""Prompt pieces shared by the methods: placeholder tokenisation, context init, depth checks and
MaPLe's coupled prompts.

Learnable context goes where placeholder tokens ("X") sit in a tokenised prompt; the backbone's
prompted text forward replaces their embeddings at the recorded positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbone import Backbone
from .heads import normalize_mean

log = logging.getLogger(__name__)

ClassPosition = Literal["end", "middle", "front"]
PLACEHOLDER = "X"
ALT_PLACEHOLDER = "Y"  # a second one-token word: where the two renderings differ are the slots


@dataclass
class ClassPrompts:
    """Tokenised class prompts: ``tokens [K, T]`` and the context slots ``positions [K, n]``."""

    tokens: torch.Tensor
    positions: torch.Tensor


def build_class_prompts(
    backbone: Backbone,
    classnames: Sequence[str],
    n_ctx: int,
    template: str = "{}.",
    class_position: ClassPosition = "end",
) -> ClassPrompts:
    """Tokenise ``n_ctx`` placeholders + ``template.format(name)`` for every class.

    ``class_position`` (CoOp): "end" -> ``X..X name.``; "front" -> ``name X..X.``; "middle" ->
    ``X..X name X..X.`` (half the context on each side). Front/middle use the template "{}.".
    """
    if class_position not in ("end", "middle", "front"):
        raise ValueError(
            f"class_position {class_position!r} unknown; use 'end', 'middle' or 'front'"
        )
    if class_position != "end" and template != "{}.":
        raise ValueError("class_position 'middle'/'front' work with the plain template '{}.'")

    def render(ph: str) -> list[str]:
        texts = []
        for name in classnames:
            if class_position == "end":
                texts.append(f"{' '.join([ph] * n_ctx)} {template.format(name)}".strip())
            elif class_position == "front":
                texts.append(f"{name} {' '.join([ph] * n_ctx)}.")
            else:
                half = n_ctx // 2
                left, right = " ".join([ph] * half), " ".join([ph] * (n_ctx - half))
                texts.append(f"{left} {name} {right}.".strip())
        return texts

    tokens = backbone.tokenize(render(PLACEHOLDER))
    pos = _slots(tokens, backbone.tokenize(render(ALT_PLACEHOLDER)), n_ctx, classnames)
    first = torch.arange(backbone.text_start, backbone.text_start + n_ctx, device=pos.device)
    if class_position == "end" and not bool((pos == first).all()):
        raise ValueError(
            f"the placeholder {PLACEHOLDER!r} is not one token of this tokenizer (slots found at "
            f"{pos[0].tolist()}, expected {first.tolist()}): the text prompt cannot start at "
            f"position {backbone.text_start}"
        )
    eot = backbone.eot_index(tokens)
    too_long = [c for c, e, p in zip(classnames, eot.tolist(), pos.tolist()) if p and max(p) >= e]
    if too_long:
        raise ValueError(
            f"prompts for classes {too_long[:5]} do not fit the context length "
            f"{backbone.context_length} with {n_ctx} context tokens; shorten the class names"
        )
    return ClassPrompts(tokens=tokens, positions=pos)


def _slots(
    tokens: torch.Tensor, alt: torch.Tensor, n_ctx: int, classnames: Sequence[str]
) -> torch.Tensor:
    """Context slots located through the model's own tokenizer, whatever its layout (start token
    or not, BPE or SentencePiece): the positions where the prompts rendered with two different
    placeholder words differ. ``[K, n_ctx]``"""
    diff = tokens != alt  # [K, T]
    bad = [c for c, k in zip(classnames, diff.sum(-1).tolist()) if k != n_ctx]
    if bad:
        raise ValueError(
            f"prompts for classes {bad[:5]} do not show {n_ctx} separate placeholder tokens after "
            f"tokenization ({PLACEHOLDER!r} / {ALT_PLACEHOLDER!r} must each be one token of the "
            "model's tokenizer and the prompt must fit its context length); shorten the class names"
        )
    pos = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    return pos[diff].reshape(len(classnames), n_ctx)


def phrase_init(backbone: Backbone, phrase: str, n: int) -> torch.Tensor:
    """Word embeddings of the first ``n`` tokens of ``phrase`` (CoOp/MaPLe init). ``[n, W]``"""
    count = backbone.token_count(phrase)
    if count < n:
        raise ValueError(
            f"init phrase {phrase!r} has {count} tokens, fewer than the {n} context tokens"
        )
    with torch.no_grad():
        start = backbone.text_start  # 1 after a start token (CLIP), 0 without (SigLIP)
        return (
            backbone.embed_tokens(backbone.tokenize([phrase]))[0, start : start + n].float().clone()
        )


def remaining_words(backbone: Backbone, phrase: str, n: int) -> str:
    """The part of ``phrase`` after its first ``n`` tokens, kept as literal text (MaPLe/ALIGN)."""
    words = phrase.split()
    # common words are single tokens; fall back to decoding the model's tokens when one splits
    if len(words) >= n and all(backbone.token_count(w) == 1 for w in words[:n]):
        return " ".join(words[n:])
    return backbone.decode_after(phrase, n)


def normal_init(
    *shape: int, std: float = 0.02, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def check_depth(depth: int, layers: int, what: str) -> int:
    """The prompt depth to use in a tower of ``layers`` layers.

    A depth beyond the tower (e.g. the published depth 9 on a 3-layer tiny model) is clamped to
    ``layers`` with a logged note, so every method's defaults run on every backbone; a depth
    below 1 is an error. A method records the depth it uses in its ``config``, so the run's
    config.yaml holds it and the note is logged once per run, not by every later command.
    """
    if depth < 1:
        raise ValueError(f"{what} depth {depth} must be at least 1")
    if depth > layers:
        log.warning(
            "%s depth %d is deeper than the tower's %d layers: using depth %d (the run's config "
            "records it)",
            what,
            depth,
            layers,
            layers,
        )
        return layers
    return depth


class CoupledPrompts(nn.Module):
    """Text prompts per layer and the Linear maps that turn them into visual prompts (MaPLe's
    coupling, Khattak et al., CVPR 2023). Used by MaPLe and ALIGN; ``sets`` > 1 gives one prompt
    set per mode, the first ``init_sets`` initialised from ``ctx_init``. ``depth`` is clamped to
    the shallower tower (:func:`check_depth`); :attr:`depth` is the depth used."""

    def __init__(
        self,
        backbone: Backbone,
        n_ctx: int,
        depth: int,
        ctx_init: str,
        sets: int = 1,
        init_sets: int = 1,
    ):
        super().__init__()
        depth = check_depth(depth, backbone.text_layers, "text prompt")
        self.depth = check_depth(depth, backbone.vision_layers, "visual prompt")
        Wt, Wv = backbone.text_width, backbone.vision_width
        ctx = normal_init(sets, n_ctx, Wt)
        self.suffix = ""
        if ctx_init:
            ctx[:init_sets] = phrase_init(backbone, ctx_init, n_ctx)
            self.suffix = remaining_words(backbone, ctx_init, n_ctx)
        self.ctx = nn.Parameter(ctx)  # [S, n, Wt]
        self.deep_ctx = nn.Parameter(
            normal_init(self.depth - 1, sets, n_ctx, Wt)
        )  # [depth-1, S, n, Wt]
        self.proj = nn.Linear(Wt, Wv)  # layer 0
        self.deep_proj = nn.ModuleList(nn.Linear(Wt, Wv) for _ in range(self.depth - 1))

    def text(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.ctx, list(self.deep_ctx.unbind(0))

    def visual(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Visual prompts ``[S, n, Wv]`` and deep ones, each Linear_l of the text prompt."""
        return self.proj(self.ctx), [p(d) for p, d in zip(self.deep_proj, self.deep_ctx.unbind(0))]


def check_templates(templates: Sequence[str]) -> None:
    """Every hand-made template must hold the class name's ``{}`` slot."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")


@torch.no_grad()
def template_ensemble(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Frozen CLIP class features from hand-made templates: the mean of each class's normalised
    template features, normalised again (CLIP's prompt ensemble). ``[K, D]``"""
    texts = [t.format(c) for c in classnames for t in templates]
    feats = backbone.encode_text(backbone.tokenize(texts))  # [K*T, D]
    return normalize_mean(feats.view(len(classnames), len(templates), -1), dim=1)  # [K, D]
