"""What individual methods must compute (the registry tests cover the shared contract)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptalign.methods import MethodOutput, create_method
from promptalign.methods.base import Batch
from promptalign.methods.npt import NPTRegularizer, etf_gram
from promptalign.ot import sinkhorn

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


def test_align_single_mode_without_token_term_is_maple(tiny):
    """M = N = 1, b tokens, beta = 0: ALIGN's score is the prompt-level cosine, i.e. MaPLe."""
    torch.manual_seed(0)
    align = create_method("align", tiny, CLASSES, n_sets=1, depth=2, beta=0.0).eval()
    maple = create_method("maple", tiny, CLASSES, depth=2).eval()
    maple.load_prompt_state_dict(align.prompt_state_dict())  # same CoupledPrompts layout
    x, _ = _batch(tiny)
    with torch.no_grad():
        torch.testing.assert_close(align.logits(x), maple.logits(x), rtol=1e-5, atol=1e-5)
        ref = create_method("align", tiny, CLASSES, preset="reference", n_sets=1, depth=2).eval()
        ref.load_prompt_state_dict(align.prompt_state_dict())
        torch.testing.assert_close(ref.logits(x), maple.logits(x), rtol=1e-5, atol=1e-5)


def test_align_reference_preset_is_the_released_semantics(tiny):
    torch.manual_seed(0)
    m = create_method("align", tiny, CLASSES, preset="reference", n_sets=3, depth=2).eval()
    cfg = m.config
    assert (cfg.form, cfg.token_window, cfg.beta, cfg.eps, cfg.max_iter, cfg.tol) == (
        "released",
        "prompt0",
        1.0,
        0.1,
        100,
        1e-5,  # tol: issue 14 item 7
    )
    x, _ = _batch(tiny)
    with torch.no_grad():
        cls = m.encode_classes()
        # token window: positions 0 .. eot(prompt 0) - 2 for every prompt of a class
        eot0 = tiny.eot_index(m.tokens[0])
        for k in range(len(CLASSES)):
            assert cls["mask"][k].sum(-1).tolist() == [int(eot0[k]) - 1] * 3
        # prompts n >= 1 are two tokens shorter, so their window includes "." and EOT
        eot1 = tiny.eot_index(m.tokens[1])
        assert torch.equal(eot1, eot0 - 2)
        # logits = scale * <T, s>, T from C = (1 - s) + <T_hat, S>, computed here step by step
        vis, vdeep = m.prompts.visual()
        img = tiny.forward_image(x, vis, deep=vdeep, return_tokens=True)
        r, z = F.normalize(img.tokens, dim=-1), F.normalize(img.pooled, dim=-1)
        s_tok, h = F.normalize(cls["tokens"], dim=-1), F.normalize(cls["global"], dim=-1)
        S = torch.einsum("bmjd,knld->bkmnjl", r, s_tok)
        inner = sinkhorn(
            1 - S,
            eps=0.1,
            max_iter=100,
            tol=1e-2,
            domain="kernel",
            mask_b=cls["mask"][None, :, None],
            check_every=5,
        )
        s = torch.einsum("bmd,knd->bkmn", z, h)
        outer = sinkhorn(
            (1 - s) + (inner.plan * S).sum((-2, -1)),
            eps=0.1,
            max_iter=100,
            tol=1e-2,
            domain="kernel",
            check_every=5,
        )
        expected = tiny.logit_scale * (outer.plan * s).sum((-2, -1))
        torch.testing.assert_close(m.logits(x), expected, rtol=1e-5, atol=1e-5)


def test_align_paper_form_token_window_and_gradient(tiny):
    torch.manual_seed(0)
    m = create_method("align", tiny, CLASSES, depth=2).train()
    cls = m.encode_classes()
    eot = tiny.eot_index(m.tokens)  # [N, K]
    assert torch.equal(cls["mask"].sum(-1), (eot + 1).t())  # SOS .. EOT of each prompt
    out = m.training_step(_batch(tiny))
    for key in ("ot_token_converged", "ot_prompt_converged"):
        assert 0.0 <= float(out[key]) <= 1.0
    out["loss"].backward()
    assert m.prompts.ctx.grad.abs().sum() > 0


def test_align_forms_differ_only_by_the_token_term(tiny):
    """With beta = 0 the paper and released forms coincide; the token term makes the difference."""
    torch.manual_seed(0)
    paper = create_method("align", tiny, CLASSES, depth=2, beta=0.0, tol=1e-6, max_iter=1000).eval()
    released = create_method(
        "align", tiny, CLASSES, depth=2, form="released", beta=0.0, tol=1e-6, max_iter=1000
    ).eval()
    released.load_prompt_state_dict(paper.prompt_state_dict())
    x, _ = _batch(tiny)
    with torch.no_grad():
        torch.testing.assert_close(paper.logits(x), released.logits(x), rtol=1e-4, atol=1e-4)
        with_tokens = create_method("align", tiny, CLASSES, depth=2, beta=1.0).eval()
        with_tokens.load_prompt_state_dict(paper.prompt_state_dict())
        assert not torch.allclose(with_tokens.logits(x), paper.logits(x), atol=1e-3)


def test_plot_reports_convergence_and_stage_freezes_text(tiny):
    torch.manual_seed(0)
    m = create_method("plot", tiny, CLASSES).train()
    out = m.training_step(_batch(tiny))
    assert 0.0 <= float(out["ot_converged"]) <= 1.0 and float(out["ot_iters"]) >= 1
    visual_only = create_method("plot", tiny, CLASSES, stage="visual")
    names = {
        n for n, p in visual_only.named_parameters() if p.requires_grad and "backbone" not in n
    }
    assert names == {"visual", "deep_visual"} or names == {"visual"}


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


def test_etf_gram_is_a_simplex_etf():
    G = etf_gram(5)
    assert torch.allclose(G.diagonal(), torch.ones(5))
    assert torch.allclose(G.sum(1), torch.zeros(5), atol=1e-6)  # vectors sum to zero
    assert torch.linalg.matrix_rank(G) == 4


def test_npt_regularizer_on_any_method_and_its_terms(tiny):
    torch.manual_seed(0)
    m = create_method(
        "coop",
        tiny,
        CLASSES,
        n_ctx=4,
        regularizers=("npt",),
        regularizer_options={"npt": {"text_weight": 2.0, "image_weight": 0.5}},
    ).train()
    out = m.training_step(_batch(tiny))
    assert {"npt_text", "npt_image"} <= set(out)
    torch.testing.assert_close(out["loss"], out["ce"] + out["npt_text"] + out["npt_image"])
    # the terms vanish exactly at the ETF: text features forming an ETF, images on their class
    K, D = 4, 8
    basis = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(0)))[0]
    centered = torch.eye(K) - 1.0 / K
    etf = F.normalize((basis @ centered).t(), dim=-1)  # [K, D] simplex ETF
    labels = torch.tensor([0, 2])
    out = MethodOutput(torch.zeros(2, K), etf[labels], etf)
    terms = NPTRegularizer()(out, Batch(torch.zeros(2, 3, 8, 8), labels), m)
    assert terms["npt_text"] < 1e-10 and terms["npt_image"] < 1e-10


def test_npt_more_classes_than_width(tiny):
    many = [f"class {i}" for i in range(tiny.embed_dim + 8)]  # K - 1 > D
    torch.manual_seed(0)
    x = images_for(tiny, 2)
    y = torch.tensor([0, 1])
    m = create_method("coop", tiny, many, n_ctx=2, regularizers=("npt",)).train()
    out = m.training_step((x, y))
    assert torch.isfinite(out["npt_text"]) and torch.isfinite(out["npt_image"])
    strict = create_method(
        "coop",
        tiny,
        many,
        n_ctx=2,
        regularizers=("npt",),
        regularizer_options={"npt": {"too_many_classes": "error"}},
    ).train()
    with pytest.raises(ValueError, match="embedding width"):
        strict.training_step((x, y))


def test_npt_method_wraps_a_base_method(tiny):
    torch.manual_seed(0)
    m = create_method("npt", tiny, CLASSES, base_options={"depth": 2}).train()
    out = m.training_step(_batch(tiny))
    assert {"npt_text", "npt_image", "ce"} <= set(out)
    assert m.optim_preset == m.inner.optim_preset
    assert m.num_trainable() == m.inner.num_trainable()


def test_npt_resolved_config_spells_out_its_base_method(tiny, monkeypatch):
    import dataclasses

    from promptalign.benchmark import config_fingerprint
    from promptalign.config import MethodSpec, RunConfig
    from promptalign.methods.maple import MaPLeConfig
    from promptalign.registry import METHODS
    from promptalign.resolve import resolve_method

    spec = resolve_method(MethodSpec(name="npt", options={"base_options": {"depth": 2}}), "a {}")
    base = spec.options["base_options"]
    # every MaPLe field is in the record, with the run's change and MaPLe's published defaults
    assert base["depth"] == 2 and base["n_ctx"] == 2 and base["ctx_init"] == "a photo of a"
    assert base["optim"]["lr"] == 0.0035 and base["optim"]["batch_size"] == 4
    assert resolve_method(spec, "a {}") == spec  # resolving a resolved record changes nothing
    short = create_method("npt", tiny, CLASSES, base_options={"depth": 2})
    full = create_method("npt", tiny, CLASSES, **spec.options)
    assert full.inner.config == short.inner.config
    assert full.optim_preset == short.optim_preset
    # the dataset's template reaches a base that has a template field, unless the run sets one
    vpt = resolve_method(MethodSpec(name="npt", options={"base": "vpt"}), "a {}")
    assert vpt.options["base_options"]["template"] == "a {}"
    own = {"base": "vpt", "base_options": {"template": "my {}"}}
    mine = resolve_method(MethodSpec(name="npt", options=own), "a {}")
    assert mine.options["base_options"]["template"] == "my {}"
    # a benchmark job's fingerprint follows the wrapped method's defaults
    cfg = RunConfig(method=MethodSpec(name="npt"))
    before = config_fingerprint(cfg)

    @dataclasses.dataclass(frozen=True)
    class WiderMaPLe(MaPLeConfig):
        n_ctx: int = 3

    monkeypatch.setattr(METHODS.get("maple"), "config_class", WiderMaPLe)
    assert config_fingerprint(cfg) != before


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
