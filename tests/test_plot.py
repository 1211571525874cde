"""PLOT and PLOT++ against the release: stage-1 logits (OT plus the mean-feature term), text sets
from the template, the released defaults, convergence reporting, and the two-stage recipe through
`promptalign train` and the benchmark."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptalign.methods import create_method

from conftest import CLASSES, images_for, labelled_batch


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


def test_plot_reports_convergence_and_stage_freezes_text(tiny):
    torch.manual_seed(0)
    m = create_method("plot", tiny, CLASSES).train()
    out = m.training_step(labelled_batch(tiny, 3))
    assert 0.0 <= float(out["ot_converged"]) <= 1.0 and float(out["ot_iters"]) >= 1
    visual_only = create_method("plot", tiny, CLASSES, stage="visual")
    names = {
        n for n, p in visual_only.named_parameters() if p.requires_grad and "backbone" not in n
    }
    assert names == {"visual", "deep_visual"} or names == {"visual"}
