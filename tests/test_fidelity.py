"""Fidelity to the released code (issue 14): PLOT++ stages, trade-off term, template init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptalign.methods import create_method

from conftest import images_for

CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]


def _converged_plan(sim: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain kernel-domain Sinkhorn on ``[..., M, N]`` similarities, uniform marginals, run to
    convergence in float64 (independent of promptalign.ot)."""
    K = torch.exp(-(1.0 - sim.double()) / eps)
    M, N = sim.shape[-2:]
    a = torch.full(sim.shape[:-1], 1.0 / M, dtype=torch.float64)
    b = torch.full(sim.shape[:-2] + (N,), 1.0 / N, dtype=torch.float64)
    c = torch.ones_like(b)
    for _ in range(2000):
        r = a / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = b / (K.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


def _reference_logits(m, x: torch.Tensor, trade_off: bool) -> torch.Tensor:
    """PLOT++ logits from the backbone's raw features, written out as the released forward."""
    bb = m.backbone
    with torch.no_grad():
        img = bb.forward_image(x, m.visual, deep=list(m.deep_visual.unbind(0))).pooled  # [B, M, D]
        txt = bb.forward_text(m.tokens.unsqueeze(0), m.ctx.unsqueeze(1)).pooled  # [N, K, D]
    sim = torch.einsum("bmd,nkd->bkmn", F.normalize(img, dim=-1), F.normalize(txt, dim=-1))
    plan = _converged_plan(sim, eps=m.config.eps).float()
    scale = bb.logit_scale
    logits = scale * (plan * sim).sum((-2, -1))
    if trade_off:
        logits = (
            logits + scale * F.normalize(img.mean(1), dim=-1) @ F.normalize(txt.mean(0), dim=-1).t()
        )
    return logits


def test_plot_stage1_logits_are_ot_plus_mean_feature_term(tiny):
    x = images_for(tiny, 3)
    opts = {"tol": 1e-9, "max_iter": 2000}  # both sides at the converged plan
    s1 = create_method("plot", tiny, CLASSES, stage="visual", **opts).eval()
    s2 = create_method("plot", tiny, CLASSES, stage="joint", **opts).eval()
    s2.load_prompt_state_dict(s1.prompt_state_dict())
    with torch.no_grad():
        l1, l2 = s1.logits(x), s2.logits(x)
    torch.testing.assert_close(l1, _reference_logits(s1, x, trade_off=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, _reference_logits(s2, x, trade_off=False), rtol=1e-5, atol=1e-5)
    # the term is really there: the difference is the global cosine logit, not zero
    assert (l1 - l2).abs().max() > 0.1


def test_plot_stage1_trains_visual_prompts_only_with_cached_text(tiny):
    m = create_method("plot", tiny, CLASSES, stage="visual").train()
    out = m.training_step((images_for(tiny, 4), torch.arange(4) % len(CLASSES)))
    out["loss"].backward()
    assert m.visual.grad is not None and m.visual.grad.abs().sum() > 0
    assert m.ctx.grad is None and not m.ctx.requires_grad
    assert m.num_trainable() == m.visual.numel()


def test_plot_text_sets_start_from_the_template(tiny):
    """Released CTX_INIT path: set i from phrase i, the template's own words for set 1."""
    m = create_method("plot", tiny, CLASSES, template="a photo of a {}, a type of pet.")
    emb = tiny.embed_tokens(
        tiny.tokenize(["a photo of a", "this is a photo", "this is picture of", "one picture of a"])
    )[:, 1:5]
    torch.testing.assert_close(m.ctx.detach(), emb.float())
    # the class side keeps the template's tail: "X X X X dog, a type of pet."
    ref = tiny.tokenize(["X X X X dog, a type of pet."])
    assert torch.equal(m.tokens[0], ref[0])


def test_plot_template_words_beyond_n_ctx_stay_literal(tiny):
    m = create_method("plot", tiny, CLASSES, template="a photo of a person doing {}.")
    emb = tiny.embed_tokens(tiny.tokenize(["a photo of a", "this is a photo"]))[:, 1:5]
    torch.testing.assert_close(m.ctx.detach()[:2], emb.float())
    assert torch.equal(m.tokens[0], tiny.tokenize(["X X X X person doing dog."])[0])
    # a template without words before the class: every set from the released phrases
    dtd = create_method("plot", tiny, CLASSES, template="{} texture.")
    first = tiny.embed_tokens(tiny.tokenize(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(dtd.ctx.detach()[0], first.float())
    assert torch.equal(dtd.tokens[0], tiny.tokenize(["X X X X dog texture."])[0])


def test_plot_without_template_starts_random():
    import promptalign

    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    m = create_method("plot", bb, CLASSES)
    std = float(m.ctx.detach().std())
    assert 0.015 < std < 0.025
    assert m.tokens.shape[0] == len(CLASSES)


def test_plot_defaults_match_released_vit_b16_count():
    """N = M = 4, 4 text and 2 visual tokens on ViT-B/16: 4*4*512 + 4*2*768 = 14,336."""
    import promptalign

    bb = promptalign.load_backbone("ViT-B-16", weights=None)
    m = create_method("plot", bb, ["dog", "cat"])
    assert m.num_trainable() == 14_336
    assert create_method("plot", bb, ["dog", "cat"], stage="visual").num_trainable() == 6_144


# --------------------------------------------------------------------------- two-stage recipe
TRAIN = [
    "--arch",
    "tiny-shapes",
    "--dataset",
    "synthetic_colour_shapes",
    "--shots",
    "2",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--no-progress",
    "optim.batch_size=32",
    "optim.eval_batch_size=256",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One synthetic data folder for the training tests of this file (generated on first use)."""
    return str(tmp_path_factory.mktemp("data"))


def test_plot_two_stages_through_promptalign_train(tmp_path, data_root):
    from safetensors.torch import load_file

    from promptalign.cli import main
    from promptalign.config import load_yaml

    root = ["--data-root", data_root]
    s1, s2, s2b = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "stage2-trained"
    assert (
        main(
            [
                "train",
                "--method",
                "plot",
                "--out",
                str(s1),
                *root,
                *TRAIN,
                "method.options.stage=visual",
                "optim.epochs=1",
            ]
        )
        == 0
    )
    # stage 2 with no epochs: its prompts are exactly where stage 1 ended
    assert (
        main(
            [
                "train",
                "--method",
                "plot",
                "--out",
                str(s2),
                "--init-from",
                str(s1),
                *root,
                *TRAIN,
                "optim.epochs=0",
            ]
        )
        == 0
    )
    p1, p2 = load_file(str(s1 / "prompts.safetensors")), load_file(str(s2 / "prompts.safetensors"))
    assert set(p1) == set(p2) and all(torch.equal(p1[k], p2[k]) for k in p1)
    cfg = load_yaml(s2 / "config.yaml")
    assert cfg.method.init_from == str(s1) and cfg.method.options.get("stage", "joint") == "joint"
    # the dataset template reached the method ("a {}"), recorded for evaluation
    assert cfg.method.options["template"] == "a {}"
    # stage 2 trained: every prompt moves, starting from stage 1's
    assert (
        main(
            [
                "train",
                "--method",
                "plot",
                "--out",
                str(s2b),
                "--init-from",
                str(s1),
                *root,
                *TRAIN,
                "optim.epochs=1",
            ]
        )
        == 0
    )
    p3 = load_file(str(s2b / "prompts.safetensors"))
    assert not torch.equal(p3["ctx"], p1["ctx"]) and not torch.equal(p3["visual"], p1["visual"])


def test_init_from_refuses_another_method(tmp_path, capsys, data_root):
    from promptalign.cli import main

    root = ["--data-root", data_root]
    assert (
        main(
            [
                "train",
                "--method",
                "coop",
                "--out",
                str(tmp_path / "c"),
                *root,
                *TRAIN,
                "optim.epochs=0",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--method",
                "plot",
                "--out",
                str(tmp_path / "p"),
                "--init-from",
                str(tmp_path / "c"),
                *root,
                *TRAIN,
                "optim.epochs=0",
            ]
        )
        != 0
    )
    assert "init_from needs a 'plot' run, this one is 'coop'" in capsys.readouterr().err


def test_benchmark_runs_plot_two_stage_recipe(tmp_path, data_root):
    import json

    from safetensors.torch import load_file

    import promptalign
    from promptalign.benchmark import run_benchmark
    from promptalign.config import load_yaml

    bb = promptalign.load_backbone("tiny-shapes")
    overrides = [
        "backbone.arch=tiny-shapes",
        "backbone.weights=null",
        "run.device=cpu",
        "data.workers=0",
        "data.shots=2",
        "optim.epochs=1",
        "optim.batch_size=32",
        "optim.eval_batch_size=256",
    ]
    s = run_benchmark(
        "base2new",
        methods=["plot@two_stage"],
        datasets=["synthetic_colour_shapes"],
        seeds=[1],
        data_root=data_root,
        out=tmp_path / "b",
        overrides=overrides,
        backbone=bb,
    )
    assert not s.failed and len(s.ran) == 1
    # a job's folder is named by its key and the fingerprint of its resolved config
    (job,) = (
        tmp_path / "b" / "base2new" / "jobs" / "synthetic_colour_shapes" / "plot@two_stage"
    ).glob("shots16-seed1-*")
    c1, c2 = (
        load_yaml(job / "run-stage1" / "config.yaml"),
        load_yaml(job / "run-stage2" / "config.yaml"),
    )
    assert c1.method.options["stage"] == "visual" and c1.method.init_from is None
    assert c2.method.options["stage"] == "joint" and c2.method.init_from == str(job / "run-stage1")
    result = json.loads((job / "result.json").read_text())["result"]
    assert set(result) == {"base", "new", "H"}
    # stage 1 left the text prompts at their (template) initialisation; stage 2 moved them
    p1 = load_file(str(job / "run-stage1" / "prompts.safetensors"))
    p2 = load_file(str(job / "run-stage2" / "prompts.safetensors"))
    assert not torch.equal(p1["ctx"], p2["ctx"])
    # the published PLOT++ row is printed beside the recipe's
    assert "| plot@two_stage | **average** |" in s.tables["base2new"]
    # a re-run skips the finished job; an unknown recipe names the known ones
    assert run_benchmark(
        "base2new",
        methods=["plot@two_stage"],
        datasets=["synthetic_colour_shapes"],
        seeds=[1],
        data_root=data_root,
        out=tmp_path / "b",
        overrides=overrides,
        backbone=bb,
    ).skipped == [s.ran[0]]
    # an unknown recipe is refused once, before any job runs, naming the recipes there are
    from promptalign.config import ConfigError

    with pytest.raises(ConfigError, match="two_stage"):
        run_benchmark(
            "base2new",
            methods=["plot@three"],
            datasets=["synthetic_colour_shapes"],
            seeds=[1],
            data_root=data_root,
            out=tmp_path / "b",
            overrides=overrides,
            backbone=bb,
        )


# ------------------------------------------------------------------------- ALIGN reference stopping
def _trained_like(seed: int, B=6, K=8, M=4, N=4, J=24, L=8, D=64):
    """Features whose costs look like a trained CLIP's: global cosines ~0.06-0.8, token cosines
    up to ~0.64, and prompt sets spread enough that the OT moves the logits by a few per cent."""
    g = torch.Generator().manual_seed(seed)
    common, cls = torch.randn(D, generator=g), torch.randn(K, D, generator=g)
    lab = torch.arange(B) % K
    ig = 1.8 * common + 1.2 * cls[lab][:, None] + 1.9 * torch.randn(B, M, D, generator=g)
    tg = 1.8 * common + 1.2 * cls[:, None] + 1.9 * torch.randn(K, N, D, generator=g)
    it = 0.4 * common + 0.4 * cls[lab][:, None, None] + 1.1 * torch.randn(B, M, J, D, generator=g)
    tt = 0.4 * common + 0.4 * cls[:, None, None] + 1.1 * torch.randn(K, N, L, D, generator=g)
    return ig, it, tg, tt


def test_align_reference_preset_sits_at_the_converged_answer():
    from promptalign.methods.align import ALIGNConfig
    from promptalign.ot import hierarchical_ot

    cfg = ALIGNConfig.from_preset("reference")
    opts = {
        "form": cfg.form,
        "beta": cfg.beta,
        "eps": cfg.eps,
        "domain": cfg.domain,
        "backend": "torch",
    }
    worst_preset, worst_loose = 0.0, 0.0
    for seed in range(3):
        ig, it, tg, tt = _trained_like(seed)
        sim = torch.einsum("bmd,knd->bkmn", F.normalize(ig, dim=-1), F.normalize(tg, dim=-1))
        tok = torch.einsum("bmjd,knld->bkmnjl", F.normalize(it, dim=-1), F.normalize(tt, dim=-1))
        assert (
            0.0 < float(sim.min()) < 0.2 and 0.7 < float(sim.max()) < 0.9 and float(tok.max()) < 0.7
        )
        exact = hierarchical_ot(
            ig.double(), it.double(), tg.double(), tt.double(), max_iter=5000, tol=1e-11, **opts
        ).score
        assert ((exact - sim.double().mean((-2, -1))).abs() / exact).max() > 0.05  # the OT matters

        def rel(res, exact=exact):
            return float(((res.score.double() - exact).abs() / exact.abs()).max())

        preset = hierarchical_ot(ig, it, tg, tt, max_iter=cfg.max_iter, tol=cfg.tol, **opts)
        assert bool(preset.prompt_stats.converged >= 1.0) and bool(
            preset.token_stats.converged >= 1.0
        )
        worst_preset = max(worst_preset, rel(preset))
        worst_loose = max(
            worst_loose, rel(hierarchical_ot(ig, it, tg, tt, max_iter=100, tol=1e-2, **opts))
        )
    assert worst_preset <= 1e-5
    assert worst_loose > 2e-5  # the former per-problem 1e-2 stopped measurably short


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
def test_eval_resize_matches_open_clip(mode, size):
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image

    from promptalign.backbone import Preprocess
    from promptalign.data import build_transform

    rng = np.random.default_rng(0)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pre = Preprocess(image_size=size, mean=mean, std=std, interpolation="bicubic", resize_mode=mode)
    ours = build_transform(pre, train=False)
    theirs = image_transform(
        size, is_train=False, mean=mean, std=std, resize_mode=mode, interpolation="bicubic"
    )
    for hw in [(300, 451), (517, 233)]:  # landscape and portrait, odd sizes (rounding, padding)
        img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        a, b = ours(img), theirs(img)
        assert tuple(a.shape) == tuple(b.shape) == (3, *size)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if mode == "longest":  # fits inside and pads: the border is black (normalised)
        tall = ours(Image.fromarray(rng.integers(0, 256, (400, 100, 3), dtype=np.uint8)))
        torch.testing.assert_close(tall[0, :, 0], torch.full((size[0],), -mean[0] / std[0]))


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
