"""What CoOp, CoCoOp, KgCoOp, MaPLe, UPT and zero-shot CLIP must compute, and method presets (the
registry tests cover the shared contract; ALIGN, PLOT, NPT and the others have their own files)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptalign.methods import create_method

from conftest import images_for

CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]


def _batch(bb, n=3):
    return images_for(bb, n), torch.arange(n) % len(CLASSES)


def test_maple_coupling_shapes_and_values(tiny):
    torch.manual_seed(0)
    m = create_method("maple", tiny, CLASSES, depth=3)
    ctx, deep = m.prompts.text()
    vis, vdeep = m.prompts.visual()
    assert ctx.shape == (1, 2, tiny.text_width) and len(deep) == 2
    assert vis.shape == (1, 2, tiny.vision_width) and len(vdeep) == 2
    assert all(d.shape == (1, 2, tiny.vision_width) for d in vdeep)
    torch.testing.assert_close(vis, m.prompts.proj(ctx))
    torch.testing.assert_close(vdeep[1], m.prompts.deep_proj[1](deep[1]))
    # initialised from the first two tokens of "a photo of a"; "of a" stays literal
    assert m.prompts.suffix == "of a"
    ref = tiny.embed_tokens(tiny.tokenize(["a photo"]))[0, 1:3]
    torch.testing.assert_close(ctx[0], ref)


def test_upt_prompt_tokens_really_mix(tiny):
    torch.manual_seed(0)
    m = create_method("upt", tiny, CLASSES).eval()
    with torch.no_grad():
        before = m.mixed_prompt()
        m.unified[0] += 1.0
        after = m.mixed_prompt()
    assert not torch.allclose(before[1:], after[1:])  # other tokens saw token 0 change


def test_cocoop_batched_equals_one_image_at_a_time(tiny):
    torch.manual_seed(0)
    m = create_method("cocoop", tiny, CLASSES).eval()
    x, _ = _batch(tiny, 3)
    with torch.no_grad():
        whole = m.logits(x)
        single = torch.cat([m.logits(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_class_token_positions(tiny, position):
    torch.manual_seed(0)
    m = create_method("coop", tiny, CLASSES, n_ctx=4, class_token_position=position)
    assert m.logits(_batch(tiny)[0]).shape == (3, len(CLASSES))
    # slots hold placeholders and nothing else
    placeholder = tiny.tokenize(["X"])[0, 1]
    picked = torch.gather(m.tokens, 1, m.positions)
    assert torch.all(picked == placeholder)


def test_coop_phrase_init_and_csc_cannot_change_classes(tiny):
    m = create_method("coop", tiny, CLASSES, ctx_init="a photo of a")
    assert m.ctx.shape == (4, tiny.text_width)
    csc = create_method("coop", tiny, CLASSES, csc=True, n_ctx=4)
    assert csc.ctx.shape == (len(CLASSES), 4, tiny.text_width)
    with pytest.raises(ValueError, match="class-specific context"):
        csc.set_classnames(["x", "y"])


def test_zeroshot_template_ensemble_is_mean_of_normalised_features(tiny):
    templates = ("a photo of a {}.", "a drawing of a {}.")
    m = create_method("zeroshot", tiny, CLASSES, templates=templates).eval()
    with torch.no_grad():
        feats = torch.stack(
            [
                F.normalize(tiny.encode_text(tiny.tokenize([t.format(c) for c in CLASSES])), dim=-1)
                for t in templates
            ]
        )
        expected = F.normalize(feats.mean(0), dim=-1)
        torch.testing.assert_close(m.encode_classes(), expected)
    with pytest.raises(ValueError, match="placeholder"):
        create_method("zeroshot", tiny, CLASSES, template="no slot")


def test_presets(tiny):
    m = create_method("maple", tiny, CLASSES, preset="cross_dataset", depth=2)
    assert m.config.optim.lr == 0.0026 and m.config.optim.epochs == 2
    with pytest.raises(ValueError, match="no preset 'nope'"):  # ConfigError is a ValueError
        create_method("maple", tiny, CLASSES, preset="nope")
    assert create_method("align", tiny, CLASSES, depth=2).optim_preset.epochs_for(1) == 30
    assert create_method("coop", tiny, CLASSES).optim_preset.epochs_for(16) == 200


def test_kgcoop_knowledge_guided_term(tiny):
    """kg = weight * (1 - mean cos(learned, frozen hand-crafted)), 0 while the context still is
    "a photo of a" and the template is "a photo of a {}."; it pulls the context back."""
    torch.manual_seed(0)
    m = create_method("kgcoop", tiny, CLASSES).train()
    assert m.config.weight == 8.0 and m.n_ctx == 4
    out = m.training_step(_batch(tiny))
    assert abs(float(out["kg"].detach())) < 1e-5
    with torch.no_grad():
        m.ctx.add_(torch.randn(m.ctx.shape, generator=torch.Generator().manual_seed(1)))
    out = m.training_step(_batch(tiny))
    learned = m.encode_classes()
    frozen = F.normalize(
        tiny.encode_text(tiny.tokenize([f"a photo of a {c}." for c in CLASSES])), dim=-1
    )
    expected = 8.0 * (1 - (learned * frozen).sum(-1).mean())
    torch.testing.assert_close(out["kg"], expected)
    # half the paper's mean squared L2 distance of the normalised features
    torch.testing.assert_close(out["kg"], 4.0 * (learned - frozen).pow(2).sum(-1).mean())
    torch.testing.assert_close(out["loss"], out["ce"] + out["kg"])
    m.zero_grad()
    out["kg"].backward()
    assert m.ctx.grad.abs().sum() > 0
