"""The backbone wrapper: identity with open_clip, prompt placement, truncation, gradients."""

from __future__ import annotations

import pytest
import torch

import promptalign

from conftest import assert_rel_close, images_for

CLASSES = ["dog", "golden retriever", "sea lion", "a"]


def _tokens(bb, texts=None):
    return bb.tokenize(texts or [f"a photo of a {c}." for c in CLASSES])


# ---------------------------------------------------------------- identity with open_clip
def test_zero_length_prompts_reproduce_open_clip_text(backbone):
    tok = _tokens(backbone)
    ref = backbone.clip.encode_text(tok)
    empty = torch.zeros(0, backbone.text_width)
    full = backbone.forward_text(tok, empty, truncate=False).pooled
    assert torch.equal(full, ref)  # same ops, same order: bit-identical
    assert_rel_close(backbone.forward_text(tok, empty).pooled, ref)
    assert_rel_close(backbone.encode_text(tok), ref)


def test_zero_length_prompts_reproduce_open_clip_image(backbone):
    x = images_for(backbone, 3)
    ref = backbone.clip.encode_image(x)
    for position in ("after_patches", "after_cls"):
        out = backbone.forward_image(x, torch.zeros(0, backbone.vision_width), position=position)
        assert_rel_close(out.pooled, ref)
    assert torch.equal(backbone.encode_image(x), ref)


def test_vit_b16_random_weights_identity():
    torch.manual_seed(0)
    bb = promptalign.load_backbone("ViT-B-16")
    assert (bb.embed_dim, bb.text_width, bb.vision_width) == (512, 512, 768)
    assert (bb.text_layers, bb.vision_layers, bb.n_patches) == (12, 12, 196)
    tok = bb.tokenize(["a photo of a dog.", "a photo of a very small and rather fluffy cat."])
    with torch.no_grad():
        assert_rel_close(bb.forward_text(tok, torch.zeros(0, 512)).pooled, bb.clip.encode_text(tok))
        x = torch.randn(2, 3, 224, 224)
        assert_rel_close(bb.forward_image(x, torch.zeros(0, 768)).pooled, bb.clip.encode_image(x))


def test_normalize_flag(tiny):
    tok = _tokens(tiny)
    out = tiny.encode_text(tok, normalize=True)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(CLASSES)))


# ---------------------------------------------------------------- prompt semantics
def test_text_ctx_equal_to_word_embeddings_reproduces_plain_text(backbone):
    """Placeholders replaced by the embeddings of 'a photo of a' must equal encoding that text."""
    plain = backbone.tokenize(["a photo of a dog."])
    placeholder = backbone.tokenize(["X X X X dog."])
    ctx = backbone.embed_tokens(plain)[0, 1:5]  # [4, W]
    out = backbone.forward_text(placeholder, ctx).pooled
    assert_rel_close(out, backbone.encode_text(plain))


def test_text_custom_positions_middle_class_token(tiny):
    """Slots need not follow SOS: ctx at positions 1,2 and 4,5 around a one-token class name."""
    plain = tiny.tokenize(["a photo dog of a."])
    placeholder = tiny.tokenize(["X X dog X X."])
    emb = tiny.embed_tokens(plain)[0]
    positions = torch.tensor([1, 2, 4, 5])
    out = tiny.forward_text(placeholder, emb[positions], positions=positions).pooled
    assert_rel_close(out, tiny.encode_text(plain))


def test_deep_text_prompts_change_output_only_when_given(tiny):
    tok = tiny.tokenize(["X X dog."])
    ctx = torch.randn(2, tiny.text_width)
    base = tiny.forward_text(tok, ctx).pooled
    deep = tiny.forward_text(tok, ctx, deep=[torch.randn(2, tiny.text_width)]).pooled
    assert not torch.allclose(base, deep)
    # a deep prompt equal to what already sits in the slots after block 0 changes nothing
    with torch.no_grad():
        t = tiny.text.src  # the open_clip TextTransformer behind the seam adapter
        x = tiny.embed_tokens(tok)[:, :6]
        x = tiny._place(x, ctx[None], torch.arange(1, 3)[None]) + t.positional_embedding[:6]
        x = t.transformer.resblocks[0](x, attn_mask=t.attn_mask[:6, :6])
    same = tiny.forward_text(tok, ctx, deep=[x[0, 1:3]]).pooled
    assert_rel_close(same, base)


def test_text_broadcast_many_prompt_sets(tiny):
    """tokens [1, K, T] x ctx [N, 1, n, W] -> [N, K, ...] equals encoding each set alone."""
    tok = tiny.tokenize([f"X X {c}." for c in CLASSES])
    ctx = torch.randn(3, 1, 2, tiny.text_width)
    deep = [torch.randn(3, 1, 2, tiny.text_width), torch.randn(2, tiny.text_width)]
    out = tiny.forward_text(tok[None], ctx, deep=deep, return_tokens=True)
    assert out.pooled.shape == (3, len(CLASSES), tiny.embed_dim)
    T = int(tiny.eot_index(tok).max()) + 1
    assert out.tokens.shape == (3, len(CLASSES), T, tiny.embed_dim)
    assert out.eot.shape == (3, len(CLASSES))
    for n in range(3):
        one = tiny.forward_text(tok, ctx[n, 0], deep=[deep[0][n, 0], deep[1]]).pooled
        assert_rel_close(out.pooled[n], one)


def test_vision_prompt_shapes_and_sets(backbone):
    x = images_for(backbone, 2)
    W, D, G = backbone.vision_width, backbone.embed_dim, backbone.n_patches
    one = backbone.forward_image(x, torch.randn(3, W), return_tokens=True)
    assert one.pooled.shape == (2, D)
    assert one.tokens.shape == (2, G + 3, D)
    assert one.prompt_slice == slice(G, G + 3)
    prompts = torch.randn(4, 3, W)
    deep = [torch.randn(4, 3, W) for _ in range(backbone.vision_layers - 1)]
    many = backbone.forward_image(x, prompts, deep=deep, return_tokens=True)
    assert many.pooled.shape == (2, 4, D)
    assert many.tokens.shape == (2, 4, G + 3, D)
    for m in range(4):
        single = backbone.forward_image(
            x, prompts[m], deep=[d[m] for d in deep], return_tokens=True
        )
        assert_rel_close(many.pooled[:, m], single.pooled)
        assert_rel_close(many.tokens[:, m], single.tokens)
    after_cls = backbone.forward_image(
        x, prompts, deep=deep, position="after_cls", return_tokens=True
    )
    assert after_cls.prompt_slice == slice(0, 3)
    # prompts carry no positional embedding and attention is permutation-equivariant, so the
    # insertion point only permutes the output tokens; the CLS output is unchanged
    assert_rel_close(after_cls.pooled, many.pooled, tol=1e-5)
    assert_rel_close(after_cls.tokens[:, :, :3], many.tokens[:, :, G:], tol=1e-5)
    assert_rel_close(after_cls.tokens[:, :, 3:], many.tokens[:, :, :G], tol=1e-5)


def test_vision_tokens_match_open_clip_token_output(tiny):
    """Without prompts the token outputs equal open_clip's ln_post'ed tokens times proj."""
    x = images_for(tiny, 2)
    out = tiny.forward_image(x, return_tokens=True)
    v = tiny.clip.visual
    v.output_tokens = True
    try:
        pooled, tokens = v(x)
    finally:
        v.output_tokens = False
    assert_rel_close(out.pooled, pooled)
    assert_rel_close(out.tokens, tokens @ v.proj)


# ---------------------------------------------------------------- truncation
def test_text_truncation_is_exact(backbone):
    tok = backbone.tokenize(["X X dog.", "X X a much longer description of a small brown dog."])
    ctx = torch.randn(2, backbone.text_width)
    deep = [torch.randn(2, backbone.text_width)] * 2
    short = backbone.forward_text(tok, ctx, deep=deep, return_tokens=True)
    full = backbone.forward_text(tok, ctx, deep=deep, return_tokens=True, truncate=False)
    T = short.tokens.shape[1]
    assert T == int(backbone.eot_index(tok).max()) + 1 < backbone.context_length
    # Truncation changes the attention matmul shapes, so the fp32 reduction order differs with
    # the CPU's kernels (AVX2 vs AVX-512 gave up to 3.6e-6 relative): 1e-5 relative is fp32
    # agreement; a wrong mask or a dropped token moves outputs by O(1e-1).
    assert_rel_close(short.pooled, full.pooled, tol=1e-5)
    assert_rel_close(short.tokens, full.tokens[:, :T], tol=1e-5)


def test_prompt_after_eot_is_rejected(tiny):
    tok = tiny.tokenize(["dog."])
    with pytest.raises(ValueError, match="after the end-of-text"):
        tiny.forward_text(tok, torch.randn(2, tiny.text_width), positions=torch.tensor([5, 6]))


# ---------------------------------------------------------------- gradients
def test_frozen_clip_gets_no_gradients_prompts_do(backbone):
    tok = backbone.tokenize(["X X dog.", "X X cat."])
    ctx = torch.randn(2, backbone.text_width, requires_grad=True)
    tdeep = torch.randn(2, backbone.text_width, requires_grad=True)
    vp = torch.randn(2, 2, backbone.vision_width, requires_grad=True)
    vdeep = torch.randn(2, 2, backbone.vision_width, requires_grad=True)
    text = backbone.forward_text(tok, ctx, deep=[tdeep], return_tokens=True)
    img = backbone.forward_image(images_for(backbone, 2), vp, deep=[vdeep], return_tokens=True)
    loss = (img.pooled.sum(1) @ text.pooled.t()).sum() + img.tokens.mean() + text.tokens.mean()
    loss.backward()
    for t in (ctx, tdeep, vp, vdeep):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.clip.parameters())
    assert not any(p.requires_grad for p in backbone.parameters())


def test_train_mode_keeps_clip_in_eval(tiny):
    tiny.train()
    try:
        assert tiny.training and not tiny.clip.training
        assert not any(m.training for m in tiny.clip.modules())
    finally:
        tiny.eval()


# ---------------------------------------------------------------- bad prompt inputs
def test_wrong_prompt_width_names_both_widths(tiny):
    tok = tiny.tokenize(["X X dog."])
    with pytest.raises(ValueError, match=f"{tiny.text_width + 1}.*{tiny.text_width}"):
        tiny.forward_text(tok, torch.randn(2, tiny.text_width + 1))
    with pytest.raises(ValueError, match=f"{tiny.vision_width}"):
        tiny.forward_image(images_for(tiny, 1), torch.randn(2, 3))
    with pytest.raises(ValueError, match="at most"):
        tiny.forward_image(
            images_for(tiny, 1),
            torch.randn(2, tiny.vision_width),
            deep=[torch.randn(2, tiny.vision_width)] * tiny.vision_layers,
        )
    with pytest.raises(ValueError, match="position"):
        tiny.forward_image(
            images_for(tiny, 1), torch.randn(2, tiny.vision_width), position="before"
        )
