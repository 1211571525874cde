"""Weights and architecture loading: round trips, formats, and errors that name files and keys."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import promptalign
from promptalign.backbone import WeightsError, read_state_dict

from conftest import TINY_CUSTOM_TEXT, images_for


def _outputs(bb):
    with torch.no_grad():
        tok = bb.tokenize(["a photo of a dog.", "a sketch of a cat."])
        return bb.encode_text(tok), bb.encode_image(images_for(bb, 2))


def _state(bb):
    return {k: v.contiguous() for k, v in bb.clip.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_and_reload_by_path_is_identical(tiny, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(_state(tiny), str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in _state(tiny).items()}}, path)
    bb = promptalign.load_backbone("pa-tiny-vit", weights=str(path))
    assert bb.weights == str(path)
    for a, b in zip(_outputs(bb), _outputs(tiny)):
        assert torch.equal(a, b)


def test_openai_format_state_dict_loads_into_custom_text_layout(tmp_path):
    """An OpenAI/CLIP-layout file (text keys at top level) loads into the CustomTextCLIP layout."""
    cfg = copy.deepcopy(TINY_CUSTOM_TEXT)
    flat_cfg = {k: v for k, v in cfg.items() if k != "custom_text"}
    torch.manual_seed(3)
    src = promptalign.load_backbone(flat_cfg)  # CLIP layout: token_embedding, transformer.* ...
    sd = _state(src)
    sd.update(
        input_resolution=torch.tensor(48),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    path = tmp_path / "openai_style.pt"
    torch.save(sd, path)
    dst = promptalign.load_backbone(cfg, weights=path)
    assert hasattr(dst.clip, "text")
    for a, b in zip(_outputs(dst), _outputs(src)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        promptalign.load_backbone("pa-tiny-vit", weights=str(missing))


def test_mismatched_weights_name_file_and_keys(tiny, tmp_path):
    other = promptalign.load_backbone(copy.deepcopy(TINY_CUSTOM_TEXT))
    path = tmp_path / "other.safetensors"
    save_file(_state(other), str(path))
    with pytest.raises(WeightsError) as e:
        promptalign.load_backbone("pa-tiny-vit", weights=path)
    msg = str(e.value)
    assert "other.safetensors" in msg and "pa-tiny-vit" in msg
    assert "visual.conv1.weight" in msg and "shape mismatches" in msg


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    sd = _state(tiny)
    del sd["ln_final.weight"]
    sd["extra.thing"] = torch.zeros(1)
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        WeightsError,
        match=r"partial.safetensors.*missing keys: ln_final.weight.*unexpected keys: extra.thing",
    ):
        promptalign.load_backbone("pa-tiny-vit", weights=path)


def test_corrupt_files_give_clear_errors(tmp_path):
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        read_state_dict(bad_st)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(WeightsError, match="bad.pt.*weights-only"):
        read_state_dict(bad_pt)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(WeightsError, match="list.pt.*state dict"):
        read_state_dict(not_dict)


def test_arbitrary_pickles_are_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="evil.pt"):
        read_state_dict(path)


def test_torchscript_archives_are_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(WeightsError, match="TorchScript"):
        read_state_dict(path)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(FileNotFoundError, match="openai"):
        promptalign.load_backbone("ViT-B-16", weights="no_such_tag")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        promptalign.load_backbone("ViT-Q-99")


def test_unsupported_towers_are_refused():
    cfg = copy.deepcopy(TINY_CUSTOM_TEXT)
    cfg["vision_cfg"]["timm_model_name"] = "resnet18"
    with pytest.raises(ValueError, match="timm"):
        promptalign.load_backbone(cfg)


def test_preprocess_resolved_from_config_file(tmp_path):
    """An open_clip_config.json (model_cfg + preprocess_cfg) sets the preprocessing."""
    path = tmp_path / "open_clip_config.json"
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    path.write_text(json.dumps({"model_cfg": TINY_CUSTOM_TEXT, "preprocess_cfg": pre}))
    bb = promptalign.load_backbone(path)
    assert bb.preprocess.image_size == (48, 48)
    assert bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.preprocess.std == (0.25, 0.25, 0.25)
    assert bb.preprocess.interpolation == "bilinear"
    assert bb.arch == "open_clip_config"


def test_preprocess_defaults_follow_architecture(tiny):
    assert tiny.preprocess.image_size == (32, 32)
    assert tiny.preprocess.interpolation == "bicubic"
    assert len(tiny.preprocess.mean) == 3


def test_bad_json_config_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        promptalign.load_backbone(path)


def test_list_backbones_includes_shipped_and_open_clip():
    names = promptalign.list_backbones()
    assert "pa-tiny-vit" in names and "ViT-B-16" in names
    assert "openai" in promptalign.list_pretrained("ViT-B-16")


# --------------------------------------------------------------------------- QuickGELU safety
TINY_GELU = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 40, "heads": 4, "layers": 2},
}


def _acts(bb) -> set[str]:
    return {type(m).__name__ for n, m in bb.clip.named_modules() if n.endswith("mlp.gelu")}


def _outs(bb):
    with torch.no_grad():
        return bb.encode_text(bb.tokenize(["a photo of a dog."])), bb.encode_image(
            images_for(bb, 2)
        )


@pytest.fixture(scope="module")
def openai_src():
    """A small random CLIP trained 'as OpenAI did' (QuickGELU), in OpenAI's key layout."""
    import copy

    import promptalign

    torch.manual_seed(5)
    return promptalign.load_backbone({**copy.deepcopy(TINY_GELU), "quick_gelu": True})


@pytest.mark.parametrize("form", ["jit_keys_pt", "partial_fp16_safetensors"])
def test_openai_state_dict_switches_quickgelu_on(openai_src, tmp_path, caplog, form):
    import copy
    import logging

    from open_clip.model import convert_weights_to_lp
    from safetensors.torch import save_file

    import promptalign

    sd = {k: v.clone().contiguous() for k, v in openai_src.clip.state_dict().items()}
    assert {
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "logit_scale",
    } <= set(sd)
    if form == "jit_keys_pt":
        sd.update(
            input_resolution=torch.tensor(32),
            context_length=torch.tensor(77),
            vocab_size=torch.tensor(49408),
        )
        path = tmp_path / "clip_openai.pt"
        torch.save(sd, path)
    else:  # OpenAI's storage: linear / attention weights fp16, LayerNorms and embeddings fp32
        model = copy.deepcopy(openai_src.clip)
        convert_weights_to_lp(model, dtype=torch.float16)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert sd["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
        assert sd["ln_final.weight"].dtype == torch.float32
        path = tmp_path / "clip_openai.safetensors"
        save_file(sd, str(path))
    with caplog.at_level(logging.WARNING, logger="promptalign.backbone.loading"):
        bb = promptalign.load_backbone(
            copy.deepcopy(TINY_GELU), weights=str(path)
        )  # arch without quick_gelu
    assert _acts(bb) == {"QuickGELU"}
    assert "custom-quickgelu" in caplog.text and "OpenAI" in caplog.text
    ref = _outs(openai_src) if form == "jit_keys_pt" else None
    if ref is not None:
        for a, b in zip(_outs(bb), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_open_clip_gelu_state_dict_keeps_gelu(tmp_path, caplog):
    """open_clip's own CLIP checkpoints share the key layout but not OpenAI's markers: no switch."""
    import copy
    import logging

    from safetensors.torch import save_file

    import promptalign

    torch.manual_seed(6)
    src = promptalign.load_backbone(copy.deepcopy(TINY_GELU))
    path = tmp_path / "laion_style.safetensors"
    save_file({k: v.contiguous() for k, v in src.clip.state_dict().items()}, str(path))
    with caplog.at_level(logging.WARNING, logger="promptalign.backbone.loading"):
        bb = promptalign.load_backbone(copy.deepcopy(TINY_GELU), weights=str(path))
    assert _acts(bb) == {"GELU"} and "QuickGELU" not in caplog.text
    for a, b in zip(_outs(bb), _outs(src)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
