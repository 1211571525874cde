"""Method-specific tests of the second-round methods: Tip-Adapter-F, CLIP-LoRA, PromptSRC, ProDA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import promptalign
from promptalign.config import RunConfig, apply_overrides
from promptalign.engine import train
from promptalign.methods import create_method
from promptalign.methods.base import cosine_logits

from conftest import images_for
from data_fixtures import make_json_dataset

CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]


def _fixed_batches(bb, n=10, seed=0):
    """A deterministic 'training split': n images with labels cycling over the classes."""
    x = images_for(bb, n, seed)
    y = torch.arange(n) % len(CLASSES)

    def batches(view=0, crop_scale=None):  # the same images for every view and crop
        for i in range(0, n, 4):
            yield x[i : i + 4], y[i : i + 4]

    return batches


# ---------------------------------------------------------------------------- Tip-Adapter-F
def test_tip_adapter_alpha_zero_is_zero_shot_exactly(tiny):
    zs = create_method("zeroshot", tiny, CLASSES).eval()
    tip = create_method("tip_adapter_f", tiny, CLASSES, init_alpha=0.0, augment_views=2).eval()
    tip.fit_before_training(_fixed_batches(tiny))
    assert tip.keys.shape == (10, tiny.embed_dim) and tip.keys.requires_grad
    with torch.no_grad():
        tip.keys.add_(torch.randn_like(tip.keys))  # trained keys: still no effect at alpha 0
    x = images_for(tiny, 6, seed=3)
    with torch.no_grad():
        assert torch.equal(tip.logits(x), zs.logits(x))


def test_tip_adapter_cache_is_the_mean_of_augmented_views_and_one_hot_values(tiny):
    tip = create_method("tip_adapter_f", tiny, CLASSES, augment_views=1)
    batches = _fixed_batches(tiny)
    tip.fit_before_training(batches)
    x = torch.cat([b[0] for b in batches()])
    with torch.no_grad():
        expected = F.normalize(tiny.encode_image(x), dim=-1)
    torch.testing.assert_close(tip.keys.detach(), expected)
    assert torch.equal(tip.values, F.one_hot(torch.arange(10) % 5, 5).float())
    # the cache term: a training image's own key has affinity 1, so it adds alpha * exp(0)
    tip.eval()
    with torch.no_grad():
        logits = tip.logits(x[:1])
        zs = create_method("zeroshot", tiny, CLASSES).eval().logits(x[:1])
        aff = expected[:1] @ expected.t()
        cache = torch.exp(-1.0 * (1 - aff)) @ tip.values
    torch.testing.assert_close(logits, zs + 1.17 * cache)


def test_tip_adapter_search_uses_validation_and_new_classes_fall_back_to_zero_shot(tiny):
    tip = create_method("tip_adapter_f", tiny, CLASSES, augment_views=1, search_step=(8, 5))
    tip.fit_before_training(_fixed_batches(tiny))
    tip.eval()
    val = _fixed_batches(tiny, n=12, seed=9)
    x_val, y_val = (torch.cat(t) for t in zip(*val()))
    with torch.no_grad():
        f = F.normalize(tiny.encode_image(x_val), dim=-1)
        clip = create_method("zeroshot", tiny, CLASSES).eval().logits(x_val)
        aff = f @ tip.keys.t()
    grid = []  # brute force over the released grid: beta in 0.1 + i (7 - 0.1) / 8, alpha likewise
    for i in range(8):
        for j in range(5):
            beta, alpha = 0.1 + i * 6.9 / 8, 0.1 + j * 2.9 / 5
            logits = clip + alpha * torch.exp(-beta * (1 - aff)) @ tip.values
            grid.append(100.0 * (logits.argmax(-1) == y_val).float().mean().item())
    chosen = tip.select_on_validation(val)
    assert abs(chosen["val_accuracy"] - max(grid)) < 1e-4
    assert float(tip.alpha) == chosen["alpha"] and float(tip.beta) == chosen["beta"]
    with torch.no_grad():
        acc = 100.0 * (tip.logits(x_val).argmax(-1) == y_val).float().mean().item()
    assert abs(acc - chosen["val_accuracy"]) < 1e-4
    # a class the cache never saw gets no cache contribution
    tip.set_classnames(["airplane", "dog"])
    assert torch.equal(tip.values[:, 0], torch.zeros(10)) and tip.values[:, 1].sum() == 2
    state = tip.prompt_state_dict()
    other = create_method("tip_adapter_f", tiny, CLASSES)
    other.load_prompt_state_dict(state)
    other.set_classnames(["airplane", "dog"])
    x = images_for(tiny, 3, seed=5)
    with torch.no_grad():
        assert torch.equal(other.eval().logits(x), tip.logits(x))


# ---------------------------------------------------------------------------- CLIP-LoRA
def test_clip_lora_zero_b_is_zero_shot_exactly_and_leaves_the_backbone_untouched(backbone):
    before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    attn_before = [type(b.attn) for b in backbone.clip.visual.transformer.resblocks]
    lora = create_method("clip_lora", backbone, CLASSES).eval()
    x = images_for(backbone, 4, seed=2)
    with torch.no_grad():  # zero-shot CLIP with the released prompt, straight from the backbone
        text = F.normalize(
            backbone.encode_text(backbone.tokenize([f"a photo of a {c}." for c in CLASSES])), dim=-1
        )
        zs = cosine_logits(
            F.normalize(backbone.encode_image(x), dim=-1), text, backbone.logit_scale
        )
        assert torch.equal(lora.logits(x), zs)
    lora.train()
    out = lora.training_step((x, torch.tensor([0, 1, 2, 3])))
    out["loss"].backward()
    assert [type(b.attn) for b in backbone.clip.visual.transformer.resblocks] == attn_before
    after = backbone.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad or p.grad is not None for p in backbone.parameters())
    # the B matrices get gradient at step 0 (A's only through B, zero here)
    assert all(float(m.q_B.grad.abs().sum()) > 0 for m in lora.adapters.values())


def test_clip_lora_merged_weights_give_the_unmerged_logits(backbone, tmp_path):
    import copy

    from safetensors.torch import load_file

    lora = create_method("clip_lora", backbone, CLASSES, targets=("q", "k", "v", "o"))
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    lora.eval()
    x = images_for(backbone, 4, seed=4)
    with torch.no_grad():
        unmerged = lora.logits(x)
    lora.export_merged(tmp_path / "merged.safetensors")
    merged_bb = copy.deepcopy(backbone)
    merged_bb.clip.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    zs = create_method("zeroshot", merged_bb, CLASSES, template="a photo of a {}.").eval()
    with torch.no_grad():
        merged = zs.logits(x)
        plain = (
            create_method("zeroshot", backbone, CLASSES, template="a photo of a {}.")
            .eval()
            .logits(x)
        )
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(plain, unmerged, atol=1e-3)  # the adapters do change the logits


def test_clip_lora_dropout_path_equals_merged_path_without_dropout(tiny):
    """The training path (explicit attention with adapter dropout) matches the merged path when
    dropout is off in it: compare a p = 0 module in train mode with the eval logits."""
    lora = create_method("clip_lora", tiny, CLASSES, targets=("q", "k", "v", "o"))
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = images_for(tiny, 3, seed=6)
    lora.eval()
    with torch.no_grad():
        ref = lora.logits(x)
    lora.train()
    object.__setattr__(lora, "config", lora.config.replace(dropout=1e-12))
    with torch.no_grad():
        got = lora(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_clip_lora_epochs_follow_the_iteration_budget(tiny):
    from promptalign.config import OptimConfig, resolve_optim

    lora = create_method("clip_lora", tiny, CLASSES)

    def epochs_for(shots):  # as the engine resolves a run that leaves optim.epochs unset
        budget = lora.config.iteration_budget(shots)
        optim = resolve_optim(
            OptimConfig(), lora.optim_preset, shots, iterations=budget, num_classes=lora.num_classes
        )
        return optim.epochs

    # 500 x 16 iterations at batch 32 over 16 x 5 images: ceil(80 / 32) = 3 steps per epoch
    assert epochs_for(16) == -(-500 * 16 // 3)
    assert epochs_for(1) == 500  # 5 images: one step per epoch


# ---------------------------------------------------------------------------- PromptSRC
def test_promptsrc_aggregation_weights_sum_to_one_and_are_gaussian():
    from promptalign.methods.promptsrc import gpa_weights

    w = gpa_weights(20, 15.0, 1.0)
    assert w.shape == (20,) and abs(float(w.sum()) - 1.0) < 1e-12
    e = torch.arange(1, 21, dtype=torch.float64)
    gauss = torch.exp(-0.5 * (e - 15.0) ** 2)
    torch.testing.assert_close(w, gauss / gauss.sum(), rtol=1e-12, atol=0)
    assert int(w.argmax()) == 14  # epoch 15 (1-based) weighs most


def test_promptsrc_final_prompts_are_the_gaussian_weighted_average(tiny):
    from promptalign.methods.promptsrc import gpa_weights

    m = create_method(
        "promptsrc", tiny, CLASSES, text_depth=2, vision_depth=2, gpa_mean=2.0, gpa_std=0.7
    )
    history = []
    for epoch in range(3):
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in m.trainable_parameters()])
        m.on_epoch_end(epoch, 3)
    w = gpa_weights(3, 2.0, 0.7)
    for i, p in enumerate(m.trainable_parameters()):
        expected = sum(float(w[e]) * history[e][i] for e in range(3))
        torch.testing.assert_close(p.detach(), expected)


def test_promptsrc_consistency_terms_vanish_at_the_frozen_clip(tiny):
    """With the prompted features equal to the frozen ones, all three terms are zero."""
    m = create_method("promptsrc", tiny, CLASSES, text_depth=2, vision_depth=2)
    x = images_for(tiny, 3, seed=1)
    teacher = m.teacher_text()
    with torch.no_grad():
        img = F.normalize(tiny.encode_image(x), dim=-1)
    from promptalign.methods.base import Batch, MethodOutput

    out = MethodOutput(cosine_logits(img, teacher, tiny.logit_scale), img, teacher)
    terms = m.loss_terms(out, Batch(x, torch.tensor([0, 1, 2])))
    assert set(terms) == {"ce", "scl_text", "scl_image", "scl_logits"}  # CE from the base hook
    assert all(abs(float(terms[k])) < 1e-6 for k in ("scl_text", "scl_image", "scl_logits"))
    # and the text target is the normalised mean over the 60 templates
    assert len(m.config.teacher_templates) == 60
    with torch.no_grad():
        one = tiny.encode_text(tiny.tokenize([t.format("dog") for t in m.config.teacher_templates]))
    torch.testing.assert_close(teacher[0], F.normalize(one.mean(0), dim=-1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- ProDA
def small_proda(tiny, **changes):
    """4 prompts of 3 tokens, all encoded every step, no diversity term."""
    return create_method(
        "proda",
        tiny,
        CLASSES,
        n_prompts=4,
        n_ctx=3,
        prompts_per_step=4,
        diversity_weight=0.0,
        **changes,
    )


def test_proda_loss_is_cross_entropy_when_the_covariance_is_zero(tiny):
    m = small_proda(tiny, position_mix=(0.0, 0.0, 1.0))
    with torch.no_grad():
        m.ctx.copy_(m.ctx[:1].expand_as(m.ctx))  # every prompt the same: zero covariance
    m.train()
    x, y = images_for(tiny, 4, seed=1), torch.tensor([0, 3, 1, 4])
    out = m.training_step((x, y))
    assert set(out) >= {"loss", "surrogate", "ce", "acc"} and "diversity" not in out
    torch.testing.assert_close(out["loss"], out["ce"], rtol=1e-6, atol=1e-6)


def test_proda_surrogate_bounds_the_expected_cross_entropy_under_the_gaussian():
    """Sampling w = mu + sum_p eps_p (w^p - mu) / sqrt(P) draws exactly from the Gaussian with
    the prompts' mean and covariance; its mean CE stays below the surrogate."""
    from promptalign.methods.proda import surrogate_logits

    g = torch.Generator().manual_seed(0)
    P, K, D, B = 6, 4, 8, 5
    w = F.normalize(torch.randn(P, K, D, generator=g, dtype=torch.float64), dim=-1)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 2, 3, 0])
    s = torch.tensor(5.0, dtype=torch.float64)
    bound = F.cross_entropy(surrogate_logits(w, z, y, s), y, reduction="none")  # [B]
    mu = w.mean(0)
    eps = torch.randn(20000, P, generator=g, dtype=torch.float64)
    samples = mu + torch.einsum("np,pkd->nkd", eps, w - mu) / P**0.5  # [N, K, D]
    logits = s * torch.einsum("bd,nkd->nbk", z, samples)  # [N, B, K]
    mc = (
        F.cross_entropy(logits.reshape(-1, K), y.repeat(20000), reduction="none")
        .view(20000, B)
        .mean(0)
    )
    assert (mc <= bound + 1e-3).all()
    assert (bound - mc).max() > 1e-3  # a real covariance: the bound is not tight
    # zero covariance: the surrogate logits are the mean-embedding logits
    same = mu.unsqueeze(0).expand(P, K, D)
    torch.testing.assert_close(surrogate_logits(same, z, y, s), s * z @ mu.t())


def test_proda_diagonal_covariance_is_the_per_dimension_blocks_of_the_reimplementations():
    """covariance="diagonal" keeps, for every pair of classes, only the per-dimension part of
    the prompts' covariance (divided by P + 1, as the public reimplementations do); checked
    against a loop over dimensions, and it too bounds the expected CE under its own Gaussian
    (dimensions independent)."""
    from promptalign.methods.proda import surrogate_logits

    g = torch.Generator().manual_seed(1)
    P, K, D, B = 5, 4, 8, 6
    w = F.normalize(torch.randn(P, K, D, generator=g, dtype=torch.float64), dim=-1)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    s = torch.tensor(4.0, dtype=torch.float64)
    mu, c = w.mean(0), w - w.mean(0)
    ref = torch.empty(B, K, dtype=torch.float64)
    for b in range(B):
        for j in range(K):
            v = sum(
                z[b, d] ** 2 * ((c[:, j, d] - c[:, y[b], d]) ** 2).sum() / (P + 1) for d in range(D)
            )
            ref[b, j] = s * z[b] @ mu[j] + 0.5 * s**2 * v
    got = surrogate_logits(w, z, y, s, "diagonal")
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, surrogate_logits(w, z, y, s, "full"))
    # its Gaussian: per dimension d, w_.d = mu_.d + sum_p eps_pd c_p.d / sqrt(P + 1)
    eps = torch.randn(20000, P, D, generator=g, dtype=torch.float64)
    samples = mu + torch.einsum("npd,pkd->nkd", eps, c) / (P + 1) ** 0.5
    logits = s * torch.einsum("bd,nkd->nbk", z, samples)
    mc = F.cross_entropy(logits.reshape(-1, K), y.repeat(20000), reduction="none")
    bound = F.cross_entropy(got, y, reduction="none")
    assert (mc.view(20000, B).mean(0) <= bound + 1e-3).all()


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_proda_training_step_uses_the_configured_covariance(tiny, covariance):
    from promptalign.methods.proda import surrogate_logits

    torch.manual_seed(0)
    m = small_proda(tiny, covariance=covariance).train()
    x, y = images_for(tiny, 4, seed=3), torch.tensor([0, 3, 1, 4])
    out = m.training_step((x, y))
    with torch.no_grad():
        img = F.normalize(tiny.encode_image(x), dim=-1)
        bound = surrogate_logits(m.encode_classes(), img, y, tiny.logit_scale, covariance)
    torch.testing.assert_close(out["surrogate"].detach(), F.cross_entropy(bound, y))


def test_proda_mixes_class_positions_and_infers_with_the_mean_embedding(tiny):
    m = create_method("proda", tiny, CLASSES, n_prompts=8, n_ctx=4, prompts_per_step=8).eval()
    assert m.position_of.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]  # front, middle, end
    tok = m.tokens_front[2]  # "sea lion X X X X ." : the context right after the name
    assert m.positions_front[2].tolist() == [3, 4, 5, 6] and int(tok[1]) != 0
    x = images_for(tiny, 3, seed=2)
    with torch.no_grad():
        per_prompt = m.encode_classes()
        img = F.normalize(tiny.encode_image(x), dim=-1)
        expected = tiny.logit_scale * img @ per_prompt.mean(0).t()
        assert per_prompt.shape == (8, len(CLASSES), tiny.embed_dim)
        torch.testing.assert_close(m.logits(x), expected)


# ---------------------------------------------------------------------------- through the trainer
def test_trainer_hooks_build_the_cache_search_on_val_and_aggregate_prompts(tmp_path):
    """fit_before_training / select_on_validation / on_epoch_end are called by the one trainer:
    the saved Tip-Adapter cache has shots x classes keys and its alpha/beta are the val choice;
    PromptSRC's saved prompts are the Gaussian aggregate."""
    make_json_dataset(tmp_path / "data", "oxford_pets")
    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    common = [
        "data.dataset=oxford_pets",
        f"data.root={tmp_path / 'data'}",
        "data.shots=2",
        "data.workers=0",
        "run.device=cpu",
        "run.progress=false",
        "optim.batch_size=4",
        "backbone.arch=pa-tiny-vit",
    ]
    cfg = apply_overrides(
        RunConfig(),
        [
            *common,
            "method.name=tip_adapter_f",
            "optim.epochs=1",
            "method.options.augment_views=2",
            "method.options.search_step=[4, 3]",
        ],
    )
    res = train(cfg, tmp_path / "tip", backbone=bb)
    state = load_file(str(tmp_path / "tip" / "prompts.safetensors"))
    n_classes = len(json.loads((tmp_path / "tip" / "run.json").read_text())["classnames"])
    assert state["keys"].shape == (2 * n_classes, bb.embed_dim)
    assert float(state["alpha"]) == res.metrics["val_selected_alpha"]
    assert float(state["beta"]) == res.metrics["val_selected_beta"]

    cfg = apply_overrides(
        RunConfig(),
        [
            *common,
            "method.name=promptsrc",
            "optim.epochs=2",
            "method.options.text_depth=2",
            "method.options.vision_depth=2",
            "method.options.gpa_mean=1.0",
            "method.options.gpa_std=1.0",
            'method.options.teacher_templates=["a photo of a {}."]',
        ],
    )
    train(cfg, tmp_path / "src", backbone=bb)
    state = load_file(str(tmp_path / "src" / "prompts.safetensors"))
    for name in ("ctx", "deep_ctx", "visual", "deep_visual"):
        torch.testing.assert_close(state[name], state[f"gpa_{name}"])
