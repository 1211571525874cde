"""Building open_clip models whose towers come from timm or Hugging Face, offline included.

Two promptalign extensions of open_clip's model config, for small random models of any family:

* ``vision_cfg.timm_model_kwargs``: keyword arguments for the timm model constructor
  (``embed_dim``, ``depth``, ``num_heads``, ``img_size``, ``reg_tokens``, ...). open_clip's
  ``TimmModel`` passes none, so the variant is registered once with timm under a derived name
  (``pa_<model>_<hash>``) whose entrypoint calls the original one with these arguments.
  ``img_size`` defaults to ``vision_cfg.image_size``.
* ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` may be local directories (a ``config.json``
  for the model, saved tokenizer files), read by transformers without network access.

Families (open_clip configs shipped with open_clip_torch 3.3): OpenAI / LAION CLIP (native
towers), SigLIP and SigLIP 2 (timm ViT with "map" head, no class token + bidirectional text
tower pooled at the last position, SentencePiece tokenizer), EVA-02 (timm Eva, rotary
positions), PE-Core (timm Eva with rope + map head), timm ViTs with register tokens, and text
towers from Hugging Face (RoBERTa, XLM-RoBERTa, mT5 encoder).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

TIMM_KWARGS = "timm_model_kwargs"


def _register_timm_variant(base: str, kwargs: dict[str, Any]) -> str:
    """Register ``base`` with ``kwargs`` bound under a derived timm name; return that name."""
    import timm
    from timm.models import is_model, model_entrypoint, register_model

    if not is_model(base):
        raise ValueError(
            f"timm_model_name {base!r} is not a timm model; see timm.list_models() for the names"
        )
    digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    name = f"pa_{base}_{digest}"
    if is_model(name):
        return name
    entry = model_entrypoint(base)

    def variant(pretrained: bool = False, **extra: Any):
        if pretrained:
            raise ValueError(
                f"{name}: a resized timm variant has no pretrained timm weights; set "
                "timm_model_pretrained false (CLIP weights load after the model is built)"
            )
        return entry(pretrained=False, **{**kwargs, **extra})

    variant.__name__ = name
    variant.__qualname__ = name
    register_model(variant)
    log.debug("registered timm variant %s = %s(%s) (timm %s)", name, base, kwargs, timm.__version__)
    return name


def prepare_model_cfg(cfg: dict[str, Any], *, weights_given: bool) -> dict[str, Any]:
    """Resolve the promptalign extensions of a model config into a plain open_clip config."""
    cfg = copy.deepcopy(cfg)
    vision = cfg.get("vision_cfg", {})
    if TIMM_KWARGS in vision:
        kwargs = dict(vision.pop(TIMM_KWARGS))
        if "timm_model_name" not in vision:
            raise ValueError(
                f"vision_cfg has {TIMM_KWARGS} but no timm_model_name; add the timm model name"
            )
        if vision.get("timm_model_pretrained", False):
            raise ValueError(
                f"vision_cfg.{TIMM_KWARGS} builds a resized timm model, which has no pretrained "
                "timm weights: set timm_model_pretrained to false"
            )
        size = vision.get("image_size", 224)
        kwargs.setdefault("img_size", size)
        vision["timm_model_name"] = _register_timm_variant(vision["timm_model_name"], kwargs)
    text = cfg.get("text_cfg", {})
    if "hf_model_name" in text:
        cfg["custom_text"] = True  # open_clip's create_model: HF text towers live under .text
    if "hf_model_name" in text and weights_given:
        # the whole CLIP's weights are loaded afterwards: do not fetch the language model's own
        # (open_clip's create_model does the same)
        text["hf_model_pretrained"] = False
    return cfg


def build_tokenizer(cfg: dict[str, Any]):
    """The tokenizer a model config names: open_clip's HFTokenizer for ``hf_tokenizer_name``
    (a hub id, fetched when online, or a local directory), else CLIP's BPE."""
    import open_clip

    text = cfg["text_cfg"]
    length = text.get("context_length")
    name = text.get("hf_tokenizer_name") or (
        text.get("hf_model_name") if "hf_model_name" in text else None
    )
    if name:
        try:
            return open_clip.tokenizer.HFTokenizer(
                name,
                context_length=length or 77,
                tokenizer_mode=text.get("tokenizer_mode"),
                **dict(text.get("tokenizer_kwargs", {})),
            )
        except ImportError as e:
            raise ImportError(
                f"tokenizer {name!r} needs the Hugging Face tokenizers: pip install transformers "
                f"(and sentencepiece for SentencePiece vocabularies) ({e})"
            ) from e
        except (OSError, ValueError) as e:
            raise OSError(
                f"tokenizer {name!r} could not be loaded ({e}); without network access point "
                "text_cfg.hf_tokenizer_name at a local directory of saved tokenizer files"
            ) from e
    return _clip_bpe(length or 77)


@functools.lru_cache(maxsize=8)
def _clip_bpe(context_length: int):
    """CLIP's BPE tokenizer (reading its merges takes about a second: built once per length)."""
    import open_clip

    return open_clip.SimpleTokenizer(context_length=context_length)
