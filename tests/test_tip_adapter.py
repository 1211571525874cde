"""Tip-Adapter-F against its release: seeded cache views whatever the worker count, the cache crop,
the per-dataset configs, AdamW's eps and the search's zero-shot fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import promptalign
from promptalign.config import (
    ConfigError,
    MethodSpec,
    OptimConfig,
    RunConfig,
    apply_overrides,
    resolve_optim,
)
from promptalign.data import build_transform
from promptalign.data.loader import _VIEW_STREAM, mix_seed
from promptalign.data.templates import IMAGENET_SELECT_TEMPLATES
from promptalign.engine.build import build_run, record_batches
from promptalign.methods import create_method
from promptalign.methods.tip_adapter import TipAdapterFConfig
from promptalign.presets import PROTOCOLS, load_preset
from promptalign.resolve import resolve_config, resolve_method

from conftest import images_for
from data_fixtures import make_json_dataset

CLASSES = ["dog", "cat", "sea lion", "red car", "tree"]

# every configs/<dataset>.yaml of gaopengcuhk/Tip-Adapter (d0e2d6f), as read there:
# (search_scale, init_alpha, train_epoch); init_beta 1, lr 0.001, augment_epoch 10 and
# search_step [200, 20] in every one of them
RELEASED_CONFIGS = {
    "caltech101": ((12, 5), 3, 20),
    "dtd": ((13, 13), 2, 20),
    "eurosat": ((12, 10), 2, 100),
    "fgvc_aircraft": ((30, 30), 5, 20),  # configs/fgvc.yaml
    "food101": ((10, 10), 1.17, 20),
    "imagenet": ((7, 3), 1.17, 20),
    "oxford_flowers": ((50, 50), 10, 20),
    "oxford_pets": ((7, 3), 1.17, 20),
    "stanford_cars": ((20, 10), 3, 20),
    "sun397": ((12, 10), 1.17, 20),
    "ucf101": ((7, 3), 3, 20),
}


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """oxford_pets' layout with random-noise images (so two crops of an image differ)."""
    root = tmp_path_factory.mktemp("tip") / "data"
    make_json_dataset(root, "oxford_pets")
    make_json_dataset(root, "eurosat")
    rng = np.random.default_rng(0)
    for path in sorted(root.rglob("*.jpg")):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, "PNG")  # lossless, whatever the suffix says
    torch.manual_seed(0)
    return root, promptalign.load_backbone("pa-tiny-vit")


def _cfg(root: Path, *extra: str) -> RunConfig:
    return apply_overrides(
        RunConfig(),
        [
            "method.name=tip_adapter_f",
            "data.dataset=oxford_pets",
            f"data.root={root}",
            "data.shots=2",
            "run.device=cpu",
            "run.progress=false",
            "backbone.arch=pa-tiny-vit",
            "optim.eval_batch_size=4",
            "method.options.augment_views=3",
            *extra,
        ],
    )


def test_cache_views_are_seeded_per_view_and_sample_whatever_the_worker_count(textured):
    root, bb = textured
    device = torch.device("cpu")
    keys = {}
    for workers in (0, 2):
        r = build_run(_cfg(root, f"data.workers={workers}"), device, backbone=bb)
        keys[workers] = r.method.keys.detach().clone()
    assert keys[0].shape == (2 * 5, bb.embed_dim)
    assert torch.equal(keys[0], keys[2])

    # the views: each a (0.5, 1) crop + flip drawn from the seed (run seed, view, sample)
    batches = record_batches(r.cfg, r.data, r.data.train, r.method, device, augment=True)
    views = [torch.cat([x for x, _ in batches(v, (0.5, 1.0))]) for v in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(views[a], views[b])  # the views differ ...
    again = torch.cat([x for x, _ in batches(1, (0.5, 1.0))])
    assert torch.equal(again, views[1])  # ... and each is the same on every pass
    tf = build_transform(bb.preprocess, train=True, crop_scale=(0.5, 1.0))
    with Image.open(r.data.image_root / r.data.train[3].path) as im:
        rgb = im.convert("RGB")
    torch.manual_seed(mix_seed(_VIEW_STREAM, r.cfg.run.seed, 2, 3))
    assert torch.equal(views[2][3], tf(rgb))
    wide = torch.cat([x for x, _ in batches(2, (0.08, 1.0))])
    assert not torch.equal(wide, views[2])  # the crop range is the one asked for


def test_cache_uses_the_methods_declared_crop(textured):
    """The cache keys are the mean of the views the method asks for: its cache_crop_scale."""
    root, bb = textured
    device = torch.device("cpu")
    r = build_run(_cfg(root, "data.workers=0"), device, backbone=bb)
    assert r.cfg.method.options["cache_crop_scale"] == (0.5, 1.0)
    batches = record_batches(r.cfg, r.data, r.data.train, r.method, device, augment=True)
    with torch.no_grad():
        feats = [
            torch.cat([bb.encode_image(x).float() for x, _ in batches(v, (0.5, 1.0))])
            for v in range(3)
        ]
    expected = torch.nn.functional.normalize(sum(feats) / 3, dim=-1)
    torch.testing.assert_close(r.method.keys.detach(), expected, rtol=0, atol=1e-6)
    other = build_run(
        _cfg(root, "data.workers=0", "method.options.cache_crop_scale=[0.08, 1]"),
        device,
        backbone=bb,
    )
    assert not torch.allclose(other.method.keys, r.method.keys)


def test_per_dataset_settings_are_the_released_configs():
    for dataset, (scale, alpha, epochs) in RELEASED_CONFIGS.items():
        spec = resolve_method(MethodSpec(name="tip_adapter_f"), "x {}", dataset)
        cfg = spec.build()
        assert (cfg.search_scale, cfg.init_alpha, cfg.optim.epochs) == (scale, alpha, epochs)
        assert (cfg.init_beta, cfg.augment_views, cfg.search_step) == (1.0, 10, (200, 20))
        assert cfg.optim.lr == 0.001 and cfg.optim.adam_eps == 1e-4
        assert cfg.cache_crop_scale == (0.5, 1.0)
    imagenet = resolve_method(MethodSpec(name="tip_adapter_f"), "a photo of a {}.", "imagenet")
    assert imagenet.build().templates == IMAGENET_SELECT_TEMPLATES
    # the released dataset templates; a run's own options win over them
    dtd = resolve_method(MethodSpec(name="tip_adapter_f", options={"init_alpha": 4.0}), None, "dtd")
    assert dtd.build().template == "{} texture." and dtd.build().init_alpha == 4.0
    # a dataset the release has no config for gets the ImageNet values and its own template
    other = resolve_method(MethodSpec(name="tip_adapter_f"), "a {} shape.", "synthetic_shapes")
    assert other.build().search_scale == (7.0, 3.0) and other.build().template == "a {} shape."
    assert "eurosat" not in TipAdapterFConfig.PRESETS  # per-dataset values are not presets


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shipped_run_presets_leave_the_per_dataset_epochs_to_the_release(protocol):
    preset = load_preset(f"tip_adapter_f-{protocol}")
    assert preset.optim.epochs is None
    for dataset in ("eurosat", "dtd"):
        cfg = apply_overrides(preset, {"data.dataset": dataset})
        spec = resolve_method(cfg.method, None, dataset)
        optim = resolve_optim(cfg.optim, spec.build().optim, cfg.data.shots)
        assert optim.epochs == RELEASED_CONFIGS[dataset][2]


def test_adamw_eps_reaches_the_optimiser(textured):
    root, bb = textured
    r = build_run(_cfg(root, "data.workers=0"), torch.device("cpu"), backbone=bb)
    assert isinstance(r.optimizer, torch.optim.AdamW)
    assert r.optimizer.param_groups[0]["eps"] == 1e-4 and r.cfg.optim.adam_eps == 1e-4
    r = build_run(
        _cfg(root, "data.workers=0", "optim.adam_eps=1e-6"), torch.device("cpu"), backbone=bb
    )
    assert r.optimizer.param_groups[0]["eps"] == 1e-6
    # another AdamW method keeps torch's default
    lora = build_run(
        _cfg(root, "data.workers=0", "method.name=clip_lora", "method.options={}"),
        torch.device("cpu"),
        backbone=bb,
    )
    assert lora.optimizer.param_groups[0]["eps"] == 1e-8 and lora.cfg.optim.adam_eps == 1e-8
    with pytest.raises(ConfigError, match="adam_eps: 0.0 must be > 0"):
        OptimConfig(adam_eps=0.0)


def test_search_finding_nothing_falls_back_to_zero_shot(tiny, caplog):
    """As released: a grid point must beat 0 % to be chosen; when none does, (beta, alpha) =
    (0, 0), which is zero-shot CLIP, and a warning says the search found nothing."""
    tip = create_method("tip_adapter_f", tiny, CLASSES, augment_views=1, search_step=(6, 4))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, *tiny.preprocess.image_size, generator=g)
    # the cache holds classes 0-3 only, so the cache term never raises class 4's score
    tip.fit_before_training(lambda view=0, crop_scale=None: iter([(x[:8], torch.arange(8) % 4)]))
    tip.eval()
    with torch.no_grad():
        zero_shot = create_method("zeroshot", tiny, CLASSES).eval().logits(x)
    # validation images zero-shot CLIP does not call class 4, labelled 4: no grid point can
    # get one right (adding the cache term only raises the other classes)
    val = x[zero_shot.argmax(-1) != 4]
    assert len(val) >= 4
    labels = torch.full((len(val),), 4)
    with caplog.at_level(logging.WARNING, logger="promptalign.methods.tip_adapter"):
        chosen = tip.select_on_validation(lambda: iter([(val, labels)]))
    assert chosen == {"val_accuracy": 0.0, "beta": 0.0, "alpha": 0.0}
    assert float(tip.alpha) == 0.0 and float(tip.beta) == 0.0
    assert "zero-shot CLIP" in caplog.text
    with torch.no_grad():
        assert torch.equal(tip.logits(x), zero_shot)


def test_resolved_run_records_the_released_values(textured):
    root, bb = textured
    r = build_run(_cfg(root, "data.workers=0", "data.dataset=eurosat"), torch.device("cpu"), bb)
    assert r.cfg.optim.epochs == 100 and r.cfg.method.options["search_scale"] == (12.0, 10.0)
    assert resolve_config(r.cfg) == r.cfg  # resolving again changes nothing


def test_adam_eps_enters_a_benchmark_fingerprint_only_where_it_changes_the_run():
    """Earlier jobs ran with torch's eps: at that value the new setting leaves their fingerprints
    (and so their results) as they were; Tip-Adapter-F's 1e-4 makes its jobs new."""
    from promptalign.benchmark import Job, config_fingerprint, job_config

    def fingerprint(method, *overrides):
        job = Job("base2new", "synthetic_colour_shapes", method, 16, 1)
        return config_fingerprint(job_config(job, ["data.workers=0", *overrides], "data"))

    for method in ("coop", "clip_lora", "npt"):
        assert fingerprint(method) == fingerprint(method, "optim.adam_eps=1e-8")
        assert fingerprint(method) != fingerprint(method, "optim.adam_eps=1e-4")
    assert fingerprint("tip_adapter_f") != fingerprint("tip_adapter_f", "optim.adam_eps=1e-8")


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
