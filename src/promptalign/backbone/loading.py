"""Building a :class:`Backbone` from an architecture name and a weights tag or file.

Architecture: any open_clip model name (``ViT-B-16``, ``ViT-L-14``, ...), a config shipped with
promptalign (``pa-tiny-vit``), a path to an open_clip-style JSON config, or a config dict.
Weights: None (random initialisation), an open_clip pretrained tag (downloaded and cached by
open_clip when online), or a local file: an open_clip / OpenAI-format state dict as
``.safetensors`` or a ``.pt``/``.pth``/``.bin`` file read with ``torch.load(weights_only=True)``.
TorchScript archives are refused: promptalign never calls ``torch.jit.load`` on user files.

Preprocessing (image size, mean/std, interpolation) is resolved here, from architecture + weights,
and never from method or dataset configs.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .clip import Backbone, Preprocess
from .families import build_tokenizer, prepare_model_cfg
from .towers import text_tower, vision_tower

log = logging.getLogger(__name__)

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# Pretrained models shipped inside the package: name -> (architecture config, weights file).
# They load through the same path as any local weights file.
# shipped models: name -> (open_clip-style config in configs/, weights file in this package)
SHIPPED_PRETRAINED = {
    # the first tiny CLIP (3-layer, 48-wide text tower): kept so earlier run folders still load
    "tiny-shapes": ("pa-tiny-shapes", "weights/tiny-shapes.safetensors"),
    # its image tower, locked, with a 4-layer, 96-wide text tower trained on rich captions: the
    # model of the demo and the README tables (issue 18)
    "tiny-shapes-v2": ("pa-tiny-shapes-v2", "weights/tiny-shapes-v2.safetensors"),
    # the same text recipe on a new image tower with 6 px patches (64 patches, not 36): deep
    # visual prompts then displace less of the image (issue 18)
    "tiny-shapes-v3": ("pa-tiny-shapes-v3", "weights/tiny-shapes-v3.safetensors"),
}


class BackboneError(ValueError):
    """An architecture or weights input that cannot be built; the message names it and the fix."""


class WeightsError(BackboneError):
    """A weights file could not be read or does not fit the architecture."""


def _open_clip():
    import open_clip  # imported lazily: it pulls in torchvision and timm

    return open_clip


def _shipped_configs() -> dict[str, Path]:
    root = resources.files("promptalign.backbone") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".json")}


def list_backbones() -> list[str]:
    """Architecture names accepted by :func:`load_backbone` (shipped configs, then open_clip's)."""
    return (
        sorted(SHIPPED_PRETRAINED) + sorted(_shipped_configs()) + list(_open_clip().list_models())
    )


def list_pretrained(arch: str) -> list[str]:
    """open_clip pretrained tags known for ``arch``."""
    return list(_open_clip().list_pretrained_tags_by_model(arch))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON model config (UTF-8, an optional byte-order mark)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BackboneError(
            f"{path}: not valid JSON ({e}); expected an open_clip model config"
        ) from None
    except UnicodeDecodeError as e:
        raise BackboneError(
            f"{path}: not UTF-8 text (byte at offset {e.start}); re-save it as UTF-8"
        ) from None


def resolve_arch(
    arch: str | os.PathLike | Mapping[str, Any],
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Return ``(name, model_cfg, preprocess_overrides)`` for an architecture spec."""
    pre: dict[str, Any] = {}
    if isinstance(arch, Mapping):
        name, cfg = "custom", copy.deepcopy(dict(arch))
    else:
        shipped = _shipped_configs()
        path = Path(arch)
        if str(arch) in shipped:
            name, cfg = str(arch), _read_json(shipped[str(arch)])
        elif path.suffix == ".json" or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"architecture config {path} does not exist")
            name, cfg = path.stem, _read_json(path)
        else:
            name = str(arch).replace("/", "-")
            cfg = _open_clip().get_model_config(name)
            if cfg is None:
                raise BackboneError(
                    f"unknown architecture {str(arch)!r}: not a promptalign config "
                    f"({', '.join(sorted(shipped))}), not an open_clip model name "
                    "(see `promptalign.list_backbones()`), and not a JSON config file"
                )
            cfg = copy.deepcopy(cfg)
    if "model_cfg" in cfg:  # open_clip_config.json layout (hf-hub / local-dir)
        pre = dict(cfg.get("preprocess_cfg", {}))
        cfg = cfg["model_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise BackboneError(
            f"architecture {name!r}: config lacks {missing}; expected an open_clip model config"
        )
    return name, cfg, pre


class TowerDepths(NamedTuple):
    """Transformer layers of the two towers of an architecture."""

    text: int
    vision: int


def tower_depths(arch: str | os.PathLike | Mapping[str, Any]) -> TowerDepths:
    """The layer counts of ``arch``'s text and vision towers, as a built :class:`Backbone` counts
    them, without loading weights: open_clip's own towers read ``layers`` from the architecture
    config; a timm or Hugging Face tower is built on the meta device (no memory, no weights).

    Args:
        arch: as :func:`load_backbone` takes it (a shipped model's name included).

    Raises:
        BackboneError: an unknown architecture; UnsupportedTower: a tower without prompt seams.
    """
    if isinstance(arch, str) and not Path(arch).expanduser().exists():
        return _named_tower_depths(arch)  # a shipped or open_clip name: computed once
    return _tower_depths(arch)


@functools.lru_cache(maxsize=32)
def _named_tower_depths(arch: str) -> TowerDepths:
    return _tower_depths(SHIPPED_PRETRAINED[arch][0] if arch in SHIPPED_PRETRAINED else arch)


def _tower_depths(arch: str | os.PathLike | Mapping[str, Any]) -> TowerDepths:
    _, cfg, _ = resolve_arch(arch)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    native = "timm_model_name" not in vision and "hf_model_name" not in text
    if native and isinstance(vision.get("layers"), int) and isinstance(text.get("layers"), int):
        return TowerDepths(text["layers"], vision["layers"])
    with torch.device("meta"):
        model = _build_model(prepare_model_cfg(cfg, weights_given=True))
    return TowerDepths(text_tower(model).layers, vision_tower(model.visual).layers)


def _build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    oc = _open_clip()
    cfg = copy.deepcopy(cfg)
    custom_text = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        raise BackboneError("CoCa-style models (multimodal_cfg) are not supported")
    cls = oc.CustomTextCLIP if custom_text else oc.CLIP
    return cls(**cfg)


def _tokenizer(name: str, cfg: dict[str, Any]):
    oc = _open_clip()
    hf = "hf_tokenizer_name" in cfg["text_cfg"] or "hf_model_name" in cfg["text_cfg"]
    if oc.get_model_config(name) is not None and not hf:
        return oc.get_tokenizer(name)
    return build_tokenizer(cfg)  # families.py: HF tokenizer (hub id or local dir) or CLIP BPE


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or weights-only torch file, with errors naming the
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                raise WeightsError(
                    f"{path} is a TorchScript archive; promptalign never runs torch.jit.load on "
                    "files. Use the matching open_clip pretrained tag (e.g. weights='openai'), or "
                    "convert the file once to a plain state dict (safetensors) in a trusted session"
                )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise WeightsError(
            f"{path}: could not be read as a weights-only torch file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Save a plain state dict "
            "(torch.save(model.state_dict(), ...)) or a .safetensors file"
        ) from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a non-empty state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {bad[:10]}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _fmt_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights_file(model: torch.nn.Module, path: str | os.PathLike, arch: str = "") -> None:
    """Load a weights file into an open_clip model strictly; mismatches name the file and keys."""
    oc = _open_clip()
    sd = read_state_dict(path)
    for k in _OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = oc.model.convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and sd["logit_scale"].shape != model.logit_scale.shape:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_fmt_keys(shapes, 5)}")
        raise WeightsError(
            f"{path}: weights do not fit architecture {arch!r}; "
            + "; ".join(parts)
            + ". Check that the file was saved from this architecture."
        )
    model.load_state_dict(sd, strict=True)


_OPENAI_LAYOUT = (
    "token_embedding.weight",
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "ln_final.weight",
)


def _peek_tensors(path: Path) -> dict[str, torch.dtype] | None:
    """Key -> dtype of a weights file without reading its data (safetensors header, or a
    memory-mapped weights-only torch file); None when it cannot be read that way (the real load
    then reports the problem)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - "F16", "F32"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("constants.pkl") for n in z.namelist()):
                    return None  # TorchScript: refused by read_state_dict
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure is reported by the real load
        return None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        return None
    out = {
        str(k).removeprefix("module."): v.dtype
        for k, v in obj.items()
        if isinstance(v, torch.Tensor)
    }
    return out


def openai_quickgelu_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is a state dict of OpenAI's released CLIP (trained with QuickGELU), or None.

    OpenAI's files use the top-level CLIP key layout (``visual.*``, ``transformer.*``,
    ``token_embedding``, ``positional_embedding``, ``text_projection``, ``logit_scale``), which
    open_clip's own CLIP checkpoints share, so the layout alone does not decide it. What only
    OpenAI's files carry (see open_clip's ``build_model_from_openai_state_dict`` and
    ``convert_weights_to_lp``): the JIT-era entries ``input_resolution`` / ``context_length`` /
    ``vocab_size``, or OpenAI's partial fp16 storage (attention / linear weights fp16, LayerNorms
    fp32).
    """
    keys = _peek_tensors(Path(path))
    if (
        not keys
        or not all(k in keys for k in _OPENAI_LAYOUT)
        or not any(k.startswith("visual.") for k in keys)
    ):
        return None
    extra = [k for k in _OPENAI_EXTRA_KEYS if k in keys]
    if extra:
        return f"it holds the OpenAI JIT-era entries {extra}"
    attn = next(
        (
            k
            for k in keys
            if k.startswith("transformer.resblocks.") and k.endswith("attn.in_proj_weight")
        ),
        None,
    )
    half = {torch.float16, "F16"}
    if attn is not None and keys[attn] in half and keys["ln_final.weight"] not in half:
        return "it stores OpenAI's partial fp16 layout (attention weights fp16, LayerNorms fp32)"
    return None


def _switch_on_quickgelu(cfg: dict[str, Any], name: str, path: Path) -> None:
    """QuickGELU for OpenAI-released weights loaded under an arch without it (logged)."""
    reason = openai_quickgelu_reason(path)
    if reason is None or cfg.get("quick_gelu", False):
        return
    cfg["quick_gelu"] = True
    log.warning(
        "%s is an OpenAI CLIP state dict (%s): OpenAI trained with QuickGELU, so it is switched on "
        "for architecture %r (as %r would); nn.GELU would move the logits by a few per cent",
        path,
        reason,
        name,
        f"{name}-quickgelu",
    )


OFFLINE_ADVICE = (
    "To work offline, use the built-in model (arch 'tiny-shapes-v3', --arch tiny-shapes-v3 on the "
    "command line; its weights ship with promptalign) or a local weights file (weights=FILE, "
    "--weights FILE)"
)
PROBE_TIMEOUT_S = 3.0


def fetch_pretrained(
    tag_cfg: Mapping[str, Any], name: str, tag: str, cache_dir: str | None = None
) -> Path:
    """The local file of an open_clip pretrained tag: from the cache when it is there, else
    downloaded. Without network access this fails after one short connection try (not after the
    hub client's retry loop), with how to work offline.

    Raises:
        WeightsError: the weights are not cached and cannot be downloaded.
    """
    oc = _open_clip()
    cached = _cached_pretrained(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    host = _download_host(tag_cfg)
    if host is not None:
        problem = _unreachable(host)
        if problem is not None:
            raise WeightsError(
                f"could not reach {host} to download open_clip pretrained weights {tag!r} for "
                f"{name!r} ({problem}; no network?). {OFFLINE_ADVICE}"
            )
    try:
        return Path(oc.download_pretrained(dict(tag_cfg), cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - hub and urllib errors of every kind
        first = str(e).splitlines()[0] if str(e) else ""
        raise WeightsError(
            f"could not fetch open_clip pretrained weights {tag!r} for {name!r} "
            f"({type(e).__name__}: {first[:300]}). {OFFLINE_ADVICE}"
        ) from e


def _uses_hub(tag_cfg: Mapping[str, Any]) -> bool:
    from open_clip.pretrained import has_hf_hub

    return bool(tag_cfg.get("hf_hub")) and has_hf_hub()


def _cached_pretrained(tag_cfg: Mapping[str, Any], cache_dir: str | None) -> Path | None:
    """The already downloaded file of a pretrained tag (as open_clip would pick it), or None."""
    if tag_cfg.get("file"):
        return Path(tag_cfg["file"])
    if _uses_hub(tag_cfg):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        model_id, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        for f in [*_get_safe_alternatives(filename), filename]:
            hit = try_to_load_from_cache(model_id, f, cache_dir=cache_dir)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        return None
    url = tag_cfg.get("url", "")
    if url:  # open_clip checks the file's checksum and downloads nothing when it matches
        folder = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/clip").expanduser()
        if (folder / os.path.basename(url)).is_file():
            return Path(_open_clip().download_pretrained(dict(tag_cfg), cache_dir=cache_dir))
    return None


def _download_host(tag_cfg: Mapping[str, Any]) -> str | None:
    """The host a download would contact, or None when a proxy decides (no direct probe)."""
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None
    if _uses_hub(tag_cfg):
        return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    return urlparse(tag_cfg.get("url", "")).hostname or None


def _unreachable(host: str, port: int = 443) -> str | None:
    """Why ``host`` cannot be reached (one connection try of at most :data:`PROBE_TIMEOUT_S`
    seconds, name lookup included), or None when it can."""
    import socket
    import threading

    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(None)
        except OSError as e:
            result.append(e.strerror or str(e) or type(e).__name__)

    t = threading.Thread(target=probe, daemon=True)  # a name lookup ignores socket timeouts
    t.start()
    t.join(PROBE_TIMEOUT_S + 1.0)
    return result[0] if result else f"no answer within {PROBE_TIMEOUT_S:.0f} s"


def load_backbone(
    arch: str | os.PathLike | Mapping[str, Any],
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen :class:`Backbone`.

    Args:
        arch: open_clip architecture name, shipped promptalign config, JSON config path, or dict;
            "tiny-shapes-v2", "tiny-shapes-v3" (6 px patches) and the earlier "tiny-shapes"
            are small CLIPs pretrained on the synthetic world, weights shipped.
        weights: None (random init), an open_clip pretrained tag, or a local weights file.
        device: where to put the model.
        dtype: parameter dtype (fp32 default; use autocast for mixed precision).
        cache_dir: open_clip download cache for pretrained tags.

    Returns:
        The frozen backbone, its tokenizer and preprocessing resolved from ``arch`` + ``weights``.
    """
    oc = _open_clip()
    shipped_name = arch if isinstance(arch, str) and arch in SHIPPED_PRETRAINED else None
    if shipped_name is not None:
        arch, shipped = SHIPPED_PRETRAINED[arch]
        if weights is None:
            weights = str(resources.files("promptalign.backbone") / shipped)
    name, cfg, pre_over = resolve_arch(arch)
    pre = {
        "size": cfg["vision_cfg"].get("image_size", 224),
        "mean": tuple(oc.OPENAI_DATASET_MEAN),
        "std": tuple(oc.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    pre.update(pre_over)
    weights_path: Path | None = None
    weights_label: str | None = None
    if weights is not None:
        tag_cfg = oc.get_pretrained_cfg(name, str(weights)) if not isinstance(arch, Mapping) else {}
        if tag_cfg:
            if tag_cfg.get("quick_gelu", False) and not cfg.get("quick_gelu", False):
                cfg["quick_gelu"] = True  # the tag was trained with QuickGELU; match it
            for k in ("mean", "std", "interpolation", "resize_mode"):
                if k in tag_cfg:
                    pre[k] = tag_cfg[k]
            weights_path = fetch_pretrained(tag_cfg, name, str(weights), cache_dir)
            weights_label = str(weights)
        elif Path(weights).is_file():
            weights_path = Path(weights)
            weights_label = str(weights_path)
            _switch_on_quickgelu(cfg, name, weights_path)
        else:
            tags = list_pretrained(name) if not isinstance(arch, Mapping) else []
            raise FileNotFoundError(
                f"weights {str(weights)!r} is neither an open_clip pretrained tag for {name!r} "
                f"(known tags: {', '.join(tags) or 'none'}) nor an existing file"
                + (
                    f"; {shipped_name!r} ships its own weights: leave weights unset (None, or "
                    f"backbone.weights=null in a config)"
                    if shipped_name
                    else ""
                )
            )
    # families.py: timm_model_kwargs (small timm towers), no HF LM download under CLIP weights
    cfg = prepare_model_cfg(cfg, weights_given=weights_path is not None)
    model = _build_model(cfg)
    if weights_path is not None:
        load_weights_file(model, weights_path, arch=name)
    else:
        log.info("architecture %s built with random weights (no `weights` given)", name)
    model = model.to(device=device, dtype=dtype)
    size = pre["size"]
    preprocess = Preprocess(
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        mean=tuple(float(m) for m in pre["mean"]),
        std=tuple(float(s) for s in pre["std"]),
        interpolation=str(pre["interpolation"]),
        resize_mode=str(pre["resize_mode"]),
    )
    return Backbone(model, _tokenizer(name, cfg), preprocess, arch=name, weights=weights_label)
