"""Token conventions of a tokenizer, read off the tokenizer itself.

CLIP's BPE writes ``[SOS] content [EOT] 0 0 ...``; SigLIP's SentencePiece (T5 vocab) writes
``content [EOS] [EOS] ...`` (no start token, padding with the EOS id); SigLIP 2's Gemma vocab writes
``content [EOS] [PAD] ...``; RoBERTa-style tokenizers write ``<s> content </s> <pad> ...``. Prompt
placement needs three facts that differ between them: where the content starts (after a start
token or at 0), which id ends the text, and the fixed sequence length. :func:`probe_convention`
reads them by tokenizing two probe strings, so no tokenizer family is named here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tokenize = Callable[[Sequence[str]], torch.Tensor]


@dataclass(frozen=True)
class TextConvention:
    """How a tokenizer lays out a text.

    Attributes:
        context_length: fixed length of every tokenized sequence.
        start: index of the first content token (1 after a start token such as CLIP's SOS or
            RoBERTa's ``<s>``, 0 for SentencePiece tokenizers without one).
        end_id: id of the token that ends the text (CLIP's EOT, SentencePiece's ``</s>``); for a
            tokenizer that appends no end token, the padding id.
        pad_id: padding id (equal to ``end_id`` for SigLIP's T5 vocabulary).
    """

    context_length: int
    start: int
    end_id: int
    pad_id: int

    def end_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token of each sequence (first ``end_id`` at or after
        ``start``; the last position for a sequence truncated without one). ``[*S, T] -> [*S]``"""
        T = tokens.shape[-1]
        pos = torch.arange(T, device=tokens.device)
        hit = (tokens == self.end_id) & (pos >= self.start)
        first = torch.where(hit, pos, torch.full_like(pos, T)).amin(dim=-1)
        return first.clamp_max(T - 1)


def probe_convention(tokenize: Tokenize) -> TextConvention:
    """Read a tokenizer's convention from ``tokenize([""])`` and ``tokenize(["a"])``."""
    empty, one = tokenize(["", "a"])
    T = int(empty.shape[-1])
    # a start token opens every text, the empty one included; content never equals it
    start = 1 if int(empty[0]) == int(one[0]) else 0
    return TextConvention(
        context_length=T, start=start, end_id=int(empty[start]), pad_id=int(empty[-1])
    )
