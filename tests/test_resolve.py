"""The one resolver of a run's config: what a benchmark job records is what its run trained, it
needs no model and no image, resolving twice changes nothing, and old run folders still load."""

from __future__ import annotations

import json

import pytest
import yaml

import promptalign
from promptalign.benchmark import run_benchmark
from promptalign.config import RunConfig, apply_overrides, from_dict, load_yaml, migrate
from promptalign.engine import evaluate_run, load_run, train
from promptalign.methods import list_methods
from promptalign.resolve import resolve_config

from data_fixtures import make_json_dataset

ARCH = "tiny-shapes"  # 3 text and 4 vision layers: published prompt depths are fitted to them


@pytest.fixture(scope="module")
def bb():
    return promptalign.load_backbone(ARCH)


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_json_dataset(root, "oxford_pets")  # 5 classes, 6 training images each
    return root


def _run_config(root, method, *overrides):
    return apply_overrides(
        RunConfig(),
        [
            f"method.name={method}",
            "data.dataset=oxford_pets",
            f"data.root={root}",
            "data.shots=1",
            f"backbone.arch={ARCH}",
            "backbone.weights=null",
            "run.device=cpu",
            "run.progress=false",
            "data.workers=0",
            *overrides,
        ],
    )


def test_every_method_trains_the_config_its_benchmark_job_records(tmp_path, pets, bb):
    """For every registered method the config a job stores (job.json) is the run folder's
    config.yaml: the method's template, release rows, fitted prompt depths, published optimiser
    settings (a wrapped method's included) and epochs from an iteration budget."""
    methods = list_methods()
    budget = "clip_lora:method.options.iterations_per_shot=2"  # epochs from the budget, kept tiny
    fixed = [f"{m}:optim.epochs=1" for m in methods if m != "clip_lora"]
    s = run_benchmark(
        "fewshot",
        methods=methods,
        datasets=["oxford_pets"],
        seeds=[1],
        shots=[1],
        data_root=str(pets),
        out=tmp_path / "bench",
        overrides=[
            f"backbone.arch={ARCH}",
            "backbone.weights=null",
            "run.device=cpu",
            "data.workers=0",
            "optim.eval_batch_size=64",
            budget,
            *fixed,
        ],
        backbone=bb,
    )
    assert not s.failed and len(s.ran) == len(methods)
    jobs = sorted((tmp_path / "bench" / "fewshot" / "jobs").rglob("job.json"))
    assert len(jobs) == len(methods)
    for path in jobs:
        stored = from_dict(RunConfig, json.loads(path.read_text())["config"])
        trained = load_yaml(path.parent / "run" / "config.yaml")
        assert stored == trained, stored.method.name
        if stored.method.name == "clip_lora":  # 2 steps a shot, 5 images a step of 32: 2 epochs
            assert stored.optim.epochs == 2
        if stored.method.name == "maple":  # the published depth 9 on the 3-layer text tower
            assert stored.method.options["depth"] == 3


def test_resolving_needs_no_model_and_no_image(pets, monkeypatch):
    from PIL import Image

    def refuse(*args, **kwargs):
        raise AssertionError("the resolver built a model or opened an image")

    monkeypatch.setattr(promptalign.backbone.loading, "load_backbone", refuse)
    monkeypatch.setattr(promptalign.backbone.loading, "load_weights_file", refuse)
    monkeypatch.setattr(Image, "open", refuse)
    cfg = resolve_config(_run_config(pets, "npt", "method.options.base=clip_lora"))
    inner = cfg.method.options["base_options"]
    assert inner["iterations_per_shot"] == 500 and cfg.optim.lr == 2e-4  # the wrapped method's
    assert cfg.optim.epochs == 500  # 500 steps of 1 shot x 5 classes, one step an epoch
    assert cfg.data.crop_scale == (0.08, 1.0)
    assert resolve_config(cfg) == cfg  # resolving a resolved config changes nothing
    align = resolve_config(_run_config(pets, "align"))
    assert align.method.options["depth"] == 3 and align.optim.epochs == 30  # 1 shot


def test_a_config_without_a_dataset_resolves_to_the_defaults():
    cfg = resolve_config(apply_overrides(RunConfig(), ["method.name=coop"]))
    assert cfg.data.crop_scale == (0.08, 1.0) and cfg.optim.epochs == 200  # 16 shots


def _old_layout(config_yaml):
    """A CLIP-LoRA config.yaml as versions before the iteration budget became a method field
    wrote it: the budget and the class count inside the method's optim section."""
    data = yaml.safe_load(config_yaml.read_text())
    options = data["method"]["options"]
    options["optim"] = {
        **options["optim"],
        "iterations_per_shot": options.pop("iterations_per_shot"),
    }
    options["optim"]["num_classes"] = 0
    config_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def test_an_old_clip_lora_run_folder_still_loads(tmp_path, pets, bb):
    out = tmp_path / "run"
    train(_run_config(pets, "clip_lora", "optim.epochs=1"), out, backbone=bb)
    before = load_yaml(out / "config.yaml")
    metrics = evaluate_run(out, device="cpu", backbone=bb)
    old = _old_layout(out / "config.yaml")
    assert "iterations_per_shot" in old["method"]["options"]["optim"]
    assert load_yaml(out / "config.yaml") == before
    _, cfg, _ = load_run(out, device="cpu", backbone=bb)
    assert cfg == before and cfg.method.options["iterations_per_shot"] == 500
    assert evaluate_run(out, device="cpu", backbone=bb)["accuracy"] == metrics["accuracy"]


def test_the_migration_reaches_a_wrapped_method_and_leaves_current_configs_alone():
    old = {
        "method": {
            "name": "npt",
            "options": {
                "base": "clip_lora",
                "base_options": {"optim": {"lr": 1e-3, "iterations_per_shot": 7, "num_classes": 3}},
            },
        }
    }
    new = migrate(old)
    assert new["method"]["options"]["base_options"] == {
        "optim": {"lr": 1e-3},
        "iterations_per_shot": 7,
    }
    assert old["method"]["options"]["base_options"]["optim"]["num_classes"] == 3  # a copy
    current = {"method": {"name": "clip_lora", "options": {"iterations_per_shot": 5}}}
    assert migrate(current) == current
