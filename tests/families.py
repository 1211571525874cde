"""Small random models of every open_clip family promptalign supports, built offline.

Each family is an open_clip config dict shaped like the real one (same tower types, pooling, masks,
tokenizer conventions) with tiny widths: timm towers are resized through
``vision_cfg.timm_model_kwargs``; tokenizers that live on the Hugging Face hub are replaced by small
ones trained here on the fly with the same layout (SentencePiece unigram without start token and
with ``</s>`` as end and pad for SigLIP; Gemma-like pad 0 / eos 1 for SigLIP 2; RoBERTa's
``<s> ... </s> <pad>``), and the Hugging Face text model is a tiny random RoBERTa config written to
a local folder. Families needing ``transformers`` are skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "x",
    "y",
    "dog",
    "cat",
    "sea",
    "lion",
    "red",
    "car",
    "tree",
    "airplane",
    "golden",
    "retriever",
    "boat",
    "bird",
    "fish",
    "small",
    "big",
    "picture",
    "an",
    "image",
    "circle",
    "square",
    "triangle",
    "star",
    "X",
    "Y",
]


def _corpus() -> list[str]:
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    lines += [
        "x x x x y y y y a photo of a",
        "X X Y Y X Y",
        "a photo of a dog.",
        "a photo of a cat.",
    ]
    return lines * 20


def sentencepiece_tokenizer(folder: Path, *, pad: str) -> Path:
    """A SentencePiece-style unigram tokenizer (``▁``-prefixed pieces, no start token, ``</s>``
    appended) saved for ``AutoTokenizer``; ``pad`` is "</s>" (SigLIP's T5 vocab: pad = eos) or
    "<pad>" (SigLIP 2's Gemma vocab). Whole-word pieces score above single characters, so known
    words are one token and any other word still tokenizes, character by character."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(WORDS))]
    vocab += [("\u2581", -8.0)] + [
        (c, -10.0) for c in string.ascii_letters + string.digits + ".,-'"
    ]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token=pad, unk_token="<unk>"
    )
    hf.save_pretrained(str(folder))
    return folder


def roberta_tokenizer_and_model(folder: Path) -> Path:
    """A byte-level BPE tokenizer with RoBERTa's specials and a tiny random RoBERTa config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.save_pretrained(str(folder))
    RobertaConfig(
        vocab_size=len(hf),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    ).save_pretrained(str(folder))
    return folder


def _timm(name: str, **cfg) -> dict:
    kwargs = {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "patch_size": 16,
        **cfg.pop("kwargs", {}),
    }
    return {
        "image_size": 32,
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_model_kwargs": kwargs,
        **cfg,
    }


CLIP_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}


def _siglip_text(tokenizer: Path, vocab: int, **extra) -> dict:
    return {
        "context_length": 32,
        "vocab_size": vocab,
        "hf_tokenizer_name": str(tokenizer),
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 32,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
        **extra,
    }


def family_config(family: str, tmp: Path) -> dict:
    """The small open_clip config of ``family`` (tokenizer / model files written under ``tmp``)."""
    if family == "clip":  # OpenAI / LAION CLIP: open_clip's own towers
        return {
            "embed_dim": 24,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 32,
                "patch_size": 16,
                "head_width": 16,
            },
            "text_cfg": CLIP_TEXT,
        }
    if family in ("siglip", "siglip2"):  # ViT-B-16-SigLIP / ViT-B-16-SigLIP2 shapes
        tok = sentencepiece_tokenizer(
            tmp / f"{family}-tokenizer", pad="</s>" if family == "siglip" else "<pad>"
        )
        extra = {"act_kwargs": {"approximate": "tanh"}} if family == "siglip2" else {}
        return {
            "embed_dim": 32,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": _timm("vit_base_patch16_siglip_224", timm_pool="map", timm_proj="none"),
            "text_cfg": _siglip_text(tok, 128, **extra),
        }
    if family == "eva02":  # EVA02-B-16: timm Eva with rotary positions + CLIP text tower
        return {
            "embed_dim": 24,
            "custom_text": True,
            "vision_cfg": _timm("eva02_base_patch16_clip_224", timm_pool="token", timm_proj=None),
            "text_cfg": CLIP_TEXT,
        }
    if family == "pe":  # PE-Core-B-16: timm Eva with rope, class token and a map head
        return {
            "embed_dim": 24,
            "custom_text": True,
            "vision_cfg": _timm("vit_pe_core_base_patch16_224", timm_pool="map", timm_proj=None),
            "text_cfg": {**CLIP_TEXT, "context_length": 32},
        }
    if family == "vit_registers":  # timm ViT with class + 4 register tokens, linear projection
        return {
            "embed_dim": 24,
            "custom_text": True,
            "vision_cfg": _timm(
                "vit_small_patch14_reg4_dinov2", timm_pool="token", timm_proj="linear"
            ),
            "text_cfg": CLIP_TEXT,
        }
    if family == "hf_roberta":  # roberta-ViT-B-32: Hugging Face text tower, mean pooling
        folder = roberta_tokenizer_and_model(tmp / "roberta")
        return {
            "embed_dim": 24,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 32,
                "patch_size": 16,
                "head_width": 16,
            },
            "text_cfg": {
                "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder),
                "hf_model_pretrained": False,
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": "linear",
                "context_length": 32,
            },
        }
    if family == "hf_mt5":  # mt5-base-ViT-B-32: Hugging Face T5 encoder, SentencePiece, no SOS
        folder = sentencepiece_tokenizer(tmp / "mt5", pad="<pad>")
        from transformers import MT5Config

        MT5Config(
            vocab_size=128,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ).save_pretrained(str(folder))
        return {
            "embed_dim": 24,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 32,
                "patch_size": 16,
                "head_width": 16,
            },
            "text_cfg": {
                "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder),
                "hf_model_pretrained": False,
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": "mlp",
                "context_length": 32,
            },
        }
    if (
        family == "nllb_siglip"
    ):  # nllb-clip-base-siglip: SigLIP's timm tower + NLLB (M2M100) encoder
        folder = roberta_tokenizer_and_model(
            tmp / "nllb"
        )  # same specials as NLLB: <s> 0, <pad> 1, </s> 2
        from transformers import M2M100Config

        M2M100Config(
            vocab_size=400,
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            scale_embedding=True,
        ).save_pretrained(str(folder))
        return {
            "embed_dim": 32,
            "custom_text": True,
            "init_logit_bias": -10,
            "vision_cfg": _timm("vit_base_patch16_siglip_224", timm_pool="map", timm_proj="none"),
            "text_cfg": {
                "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder),
                "hf_model_pretrained": False,
                "hf_pooler_type": "cls_pooler",
                "hf_proj_type": "linear",
                "context_length": 32,
            },
        }
    raise KeyError(family)


FAMILIES = (
    "clip",
    "siglip",
    "siglip2",
    "eva02",
    "pe",
    "vit_registers",
    "hf_roberta",
    "hf_mt5",
    "nllb_siglip",
)
NEEDS_TRANSFORMERS = {"siglip", "siglip2", "hf_roberta", "hf_mt5", "nllb_siglip"}
