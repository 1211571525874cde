"""Every open_clip family on a small random model: identity with open_clip at zero-length prompts,
prompt placement for each tokenizer convention, visual prompts and token outputs, every registered
method's forward/backward, errors naming the missing seam, and ALIGN / MaPLe trained via the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, HAS_TRANSFORMERS, NEEDS_TRANSFORMERS, family_config

import promptalign
from promptalign.backbone.towers import UnsupportedTower
from promptalign.methods import create_method, list_methods
from promptalign.methods.prompts import build_class_prompts, phrase_init

from conftest import small_config

CLASSES = ["dog", "sea lion", "golden retriever"]
TOL = 1e-5  # max abs difference to open_clip on fp32


def _param(f):
    skip = pytest.mark.skipif(
        f in NEEDS_TRANSFORMERS and not HAS_TRANSFORMERS, reason="needs transformers"
    )
    return pytest.param(f, marks=skip, id=f)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids thread spin-waits that dominate on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, promptalign.Backbone] = {}

    def get(family: str) -> promptalign.Backbone:
        if family not in cache:
            torch.manual_seed(0)
            cache[family] = promptalign.load_backbone(
                family_config(family, tmp_path_factory.mktemp(family))
            )
        return cache[family]

    return get


@pytest.fixture(params=[_param(f) for f in FAMILIES])
def bb(request, built) -> promptalign.Backbone:
    return built(request.param)


def _images(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *bb.preprocess.image_size, generator=g)


# ---------------------------------------------------------------- identity with open_clip
def test_zero_length_prompts_reproduce_open_clip(bb):
    x = _images(bb, 3)
    tok = bb.tokenize(["a photo of a dog.", "a golden retriever", "sea lion"])
    with torch.no_grad():
        ref_i, ref_t = bb.clip.encode_image(x), bb.clip.encode_text(tok)
        for position in ("after_patches", "after_cls"):
            out = bb.forward_image(x, torch.zeros(0, bb.vision_width), position=position).pooled
            assert (out - ref_i).abs().max() <= TOL
        text = bb.forward_text(tok, torch.zeros(0, bb.text_width)).pooled
        full = bb.forward_text(tok, torch.zeros(0, bb.text_width), truncate=False).pooled
    assert (text - ref_t).abs().max() <= TOL and (full - ref_t).abs().max() <= TOL
    assert text.shape == (3, bb.embed_dim) and out.shape == (3, bb.embed_dim)


def test_nothing_hard_codes_widths_or_lengths(bb):
    """Widths, depths, token counts and the context length come from the model and tokenizer."""
    assert bb.context_length == bb.tokenize(["a"]).shape[-1] == 32
    assert bb.text_width == bb.embed_tokens(bb.tokenize(["a"])).shape[-1]
    tower = bb.clip.visual
    trunk = getattr(tower, "trunk", None)
    if trunk is not None:
        assert (
            (bb.vision_layers, bb.vision_width) == (len(trunk.blocks), trunk.embed_dim) == (2, 32)
        )
        assert bb.n_prefix == trunk.num_prefix_tokens and bb.n_patches == 4


def test_tower_depths_are_read_without_loading_weights(bb, request, tmp_path):
    """What a run's config fits prompt depths to (read from the architecture config, timm and
    Hugging Face towers built on the meta device) is what the built model has."""
    from promptalign.backbone import tower_depths

    cfg = family_config(request.node.callspec.params["bb"], tmp_path)
    assert tower_depths(cfg) == (bb.text_layers, bb.vision_layers)


# ---------------------------------------------------------------- text conventions
EXPECTED_LAYOUT = {  # (start, end id == pad id) per family tokenizer
    "clip": (1, False),
    "eva02": (1, False),
    "pe": (1, False),
    "vit_registers": (1, False),
    "siglip": (0, True),
    "siglip2": (0, False),
    "hf_roberta": (1, False),
    "hf_mt5": (0, False),
    "nllb_siglip": (1, False),
}


def test_tokenizer_convention_is_read_from_the_tokenizer(bb, request):
    family = request.node.callspec.params["bb"]
    start, end_is_pad = EXPECTED_LAYOUT[family]
    c = bb.convention
    assert c.start == bb.text_start == start
    assert (c.end_id == c.pad_id) == end_is_pad
    tok = bb.tokenize(["a photo of a dog", "sea lion"])
    eot = bb.eot_index(tok)
    assert tok[0, int(eot[0])] == c.end_id and tok[1, int(eot[1])] == c.end_id
    # content length: "a photo of a dog" is five words, each one token in every test vocabulary
    assert bb.token_count("a photo of a dog") == 5 and int(eot[0]) == start + 5


def test_context_slots_are_found_for_every_convention(bb):
    """Placeholders replaced by the word embeddings of 'a photo of a' reproduce the plain text."""
    p = build_class_prompts(bb, ["dog", "sea lion"], n_ctx=4)
    assert p.positions.tolist() == [list(range(bb.text_start, bb.text_start + 4))] * 2
    ctx = phrase_init(bb, "a photo of a", 4)
    plain = bb.tokenize(["a photo of a dog.", "a photo of a sea lion."])
    with torch.no_grad():
        got = bb.forward_text(p.tokens, ctx, positions=p.positions).pooled
        default = bb.forward_text(p.tokens, ctx).pooled  # default slots: text_start ..
        ref = bb.encode_text(plain)
    assert (got - ref).abs().max() <= TOL and (default - ref).abs().max() <= TOL
    # front / middle class positions: the slots surround the class name wherever it tokenizes
    for where in ("front", "middle"):
        q = build_class_prompts(bb, ["sea lion"], n_ctx=4, class_position=where)
        assert (
            q.tokens.gather(1, q.positions) != bb.tokenize(["sea lion"]).gather(1, q.positions)
        ).any()
        assert len(set(q.positions[0].tolist())) == 4


def test_text_tokens_window_and_deep_prompts(bb):
    tok = build_class_prompts(bb, CLASSES, n_ctx=2).tokens
    ctx = torch.randn(3, 1, 2, bb.text_width)  # 3 prompt sets
    deep = [torch.randn(3, 1, 2, bb.text_width)]
    with torch.no_grad():
        out = bb.forward_text(tok[None], ctx, return_tokens=True)
        out_deep = bb.forward_text(tok[None], ctx, deep=deep, return_tokens=True)
    assert out.pooled.shape == (3, 3, bb.embed_dim)
    T = out.tokens.shape[2]
    assert out.tokens.shape == (3, 3, T, bb.embed_dim) and int(out.eot.max()) < T
    if not bb.text.truncatable:  # bidirectional towers always see the whole fixed-length text
        assert T == bb.context_length
    assert not torch.allclose(out.pooled, out_deep.pooled)
    # the pooled feature of towers pooled at the end-of-text token is that token's feature
    if bb.text.pool == "eot":
        idx = out.eot[..., None, None].expand(-1, -1, 1, bb.embed_dim)
        torch.testing.assert_close(out.tokens.gather(2, idx)[:, :, 0], out.pooled)


def test_align_released_token_window_ends_at_the_class_name(bb):
    """The released window drops what follows the class name (CLIP: "." and EOT; SigLIP, whose
    tokenizer strips punctuation: only EOS), whatever the tokenizer."""
    m = create_method("align", bb, CLASSES, preset="reference", **small_config("align"))
    with torch.no_grad():
        window = m.encode_classes()["mask"][:, 0].sum(-1)  # [K] tokens in prompt 0's window
    for k, name in enumerate(CLASSES):
        name_tok = bb.tokenize([f"a {name}"])[0]  # the name after a word, as in the prompt
        last_of_name = name_tok[int(bb.eot_index(name_tok)) - 1]
        assert m.tokens[0, k, int(window[k]) - 1] == last_of_name


def test_hugging_face_deep_prompt_hooks_are_removed(built):
    if not HAS_TRANSFORMERS:
        pytest.skip("needs transformers")
    bb = built("hf_roberta")
    tok = build_class_prompts(bb, CLASSES, n_ctx=2).tokens
    bb.forward_text(tok, torch.randn(2, bb.text_width), deep=[torch.randn(2, bb.text_width)])
    assert all(not layer._forward_pre_hooks for layer in bb.text._layers)


# ---------------------------------------------------------------- vision prompts
def test_visual_prompts_position_tokens_and_rotary_alignment(bb):
    """Prompt tokens carry no position (added after the absolute embedding, identity rotation in
    rotary towers), so the pooled feature cannot depend on where they sit: after the patches or
    after the prefix tokens give the same result, shallow and deep."""
    x = _images(bb)
    p = torch.randn(2, 3, bb.vision_width)  # 2 sets of 3 tokens
    deep = [torch.randn(2, 3, bb.vision_width)]
    with torch.no_grad():
        a = bb.forward_image(x, p, deep=deep, position="after_patches", return_tokens=True)
        b = bb.forward_image(x, p, deep=deep, position="after_cls", return_tokens=True)
        plain = bb.encode_image(x)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a.pooled[:, 0], plain)
    J = bb.n_patches + 3
    assert a.tokens.shape == (2, 2, J, bb.embed_dim) and a.pooled.shape == (2, 2, bb.embed_dim)
    assert a.prompt_slice == slice(bb.n_patches, J) and b.prompt_slice == slice(0, 3)
    # the same token (a patch) at its two places: identical features
    torch.testing.assert_close(a.tokens[:, :, 0], b.tokens[:, :, 3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        a.tokens[:, :, a.prompt_slice], b.tokens[:, :, b.prompt_slice], atol=1e-5, rtol=1e-4
    )


# ---------------------------------------------------------------- every method on every family
@pytest.mark.parametrize("name", list_methods())
def test_every_method_forward_backward(bb, name):
    torch.manual_seed(0)
    native = bb.vision.kind == "open_clip ViT" and bb.text.kind == "open_clip text transformer"
    try:
        m = create_method(name, bb, CLASSES, **small_config(name)).train()
    except UnsupportedTower as e:  # a method may need a seam only open_clip's own towers have
        assert not native and "missing seam" in str(e), str(e)
        return
    x, y = _images(bb, 2), torch.tensor([0, 2])
    out = m.training_step((x, y))
    assert torch.isfinite(out["loss"])
    trainable = m.trainable_parameters()
    if trainable:
        out["loss"].backward()
        got = {id(p) for p in m.parameters() if p.grad is not None}
        assert got == {id(p) for p in trainable}, f"{name}: gradients on the wrong parameters"
    assert not any(p.requires_grad or p.grad is not None for p in bb.parameters())
    with torch.no_grad():
        logits = m.eval().logits(x)
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()


# ---------------------------------------------------------------- unsupported families
def test_unsupported_towers_name_the_missing_seam():
    cases = [
        (
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                "text_cfg": {"context_length": 8, "width": 16, "heads": 2, "layers": 1},
            },
            "vision",
            "ResNet",
        ),
        (
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 16,
                    "patch_size": 16,
                    "head_width": 8,
                    "attentional_pool": True,
                    "attn_pooler_heads": 2,
                },
                "text_cfg": {"context_length": 8, "width": 16, "heads": 2, "layers": 1},
            },
            "vision",
            "attentional",
        ),
        (
            {
                "embed_dim": 16,
                "custom_text": True,
                "vision_cfg": {
                    "image_size": 32,
                    "timm_model_name": "convnext_atto",
                    "timm_model_pretrained": False,
                    "timm_pool": "avg",
                    "timm_proj": "linear",
                },
                "text_cfg": {"context_length": 8, "width": 16, "heads": 2, "layers": 1},
            },
            "vision",
            "ConvNeXt",
        ),
    ]
    for cfg, tower, word in cases:
        with pytest.raises(UnsupportedTower, match="missing seam") as e:
            promptalign.load_backbone(cfg)
        assert e.value.tower == tower and word in str(e.value) and "architecture" in str(e.value)


# ---------------------------------------------------------------- the CLI on non-CLIP families
@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    from data_fixtures import make_json_dataset

    root = tmp_path_factory.mktemp("families_cli")
    make_json_dataset(root / "data", "oxford_pets")
    return root


def _cli_family(family, root):
    from safetensors.torch import save_file

    arch = root / f"{family}.json"
    arch.write_text(json.dumps(family_config(family, root)))
    weights = root / f"{family}.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        bb = promptalign.load_backbone(arch)
        save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items()}, str(weights))
    return arch, weights


@pytest.mark.parametrize("family", [_param("siglip"), _param("eva02")])
@pytest.mark.parametrize("method", ["align", "maple"])
def test_align_and_maple_train_through_the_cli(cli_data, tmp_path, family, method, capsys):
    from safetensors.torch import load_file

    from promptalign.cli import main

    arch, weights = _cli_family(family, cli_data)
    opts = [f"method.options.{k}={json.dumps(v)}" for k, v in small_config(method).items()]
    out = tmp_path / "run"
    args = [
        "train",
        "--method",
        method,
        "--dataset",
        "oxford_pets",
        "--data-root",
        str(cli_data / "data"),
        "--shots",
        "2",
        "--seed",
        "1",
        "--out",
        str(out),
        "--arch",
        str(arch),
        "--weights",
        str(weights),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "optim.epochs=2",
        "optim.batch_size=2",
        "optim.eval_batch_size=8",
        *opts,
    ]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    # the prompts moved away from their initialisation
    torch.manual_seed(0)
    init = create_method(
        method,
        promptalign.load_backbone(arch, weights=str(weights)),
        ["abyssinian", "american bulldog", "beagle"],
        **small_config(method),
    )
    trained = load_file(str(out / "prompts.safetensors"))
    moved = [
        k
        for k, v in init.prompt_state_dict().items()
        if k in trained and not torch.equal(v, trained[k])
    ]
    assert moved


def test_bidirectional_text_tower_with_padding_mask_matches_open_clip(tmp_path):
    """open_clip's TextTransformer with use_pad_mask (bidirectional, padded keys masked)."""
    cfg = family_config("clip", tmp_path)
    cfg["custom_text"] = True
    cfg["text_cfg"] = {**cfg["text_cfg"], "no_causal_mask": True}
    plain = promptalign.load_backbone(cfg)
    clip = plain.clip
    clip.text.use_pad_mask = True
    bb = promptalign.Backbone(clip, plain.tokenizer, plain.preprocess, "pad-mask", None)
    assert bb.text.needs_key_mask and not bb.text.truncatable
    tok = bb.tokenize(["a photo of a dog.", "sea lion"])
    with torch.no_grad():
        ref = bb.clip.encode_text(tok)
        assert (bb.encode_text(tok) - ref).abs().max() <= TOL
        # padded keys are masked: whatever sits in the padding leaves the feature unchanged
        emb, eot = bb.embed_tokens(tok), bb.eot_index(tok)
        pad = (torch.arange(tok.shape[1]) > eot[:, None])[..., None]
        noisy = torch.where(pad, torch.randn_like(emb), emb)
        out = bb.forward_text_embeds(noisy, eot, key_mask=tok != 0).pooled
        assert (out - ref).abs().max() <= TOL
        clip.text.use_pad_mask = False  # the control: without the mask the padding leaks in
        unmasked = promptalign.Backbone(
            clip, plain.tokenizer, plain.preprocess, "no-pad-mask", None
        )
        assert (unmasked.forward_text_embeds(noisy, eot).pooled - ref).abs().max() > 1e-3


def test_placeholder_that_is_not_one_token_is_named(built, monkeypatch):
    if not HAS_TRANSFORMERS:
        pytest.skip("needs transformers")
    from promptalign.methods import prompts

    bb = built("hf_mt5")  # its tokenizer keeps case: "Q" is two pieces ("▁", "Q")
    monkeypatch.setattr(prompts, "PLACEHOLDER", "Q")
    monkeypatch.setattr(prompts, "ALT_PLACEHOLDER", "Z")
    with pytest.raises(ValueError, match="'Q' is not one token"):
        build_class_prompts(bb, ["dog"], n_ctx=2)
