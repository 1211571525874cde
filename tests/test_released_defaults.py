"""Every method's table of released defaults (``MethodConfig.RELEASED``) against the code: the
config defaults, presets, per-dataset settings and the shipped run presets must hold exactly the
values the table states (so documentation rendered from the table cannot disagree with the code),
and the tables that restate a release's per-dataset templates."""

from __future__ import annotations

import json
import math

import pytest
import torch

import promptalign
from promptalign.config import (
    DEFAULT_OPTIM,
    MethodSpec,
    RunConfig,
    apply_overrides,
    load_yaml,
    resolve_optim,
    to_dict,
)
from promptalign.data import list_datasets
from promptalign.data.base import get_reader
from promptalign.engine import load_run, train
from promptalign.methods import list_methods
from promptalign.methods.base import Released
from promptalign.presets import PROTOCOLS, load_preset
from promptalign.registry import METHODS
from promptalign.resolve import resolve_method

from data_fixtures import make_json_dataset


def config_value(config, key: str):
    """The value of a dotted ``key`` ("optim.lr") of a config."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


# methods whose release this project restates (a table each); any other method with a table is
# checked the same way
TABLED = ["clip_lora", "kgcoop", "plot", "promptsrc", "tip_adapter_f"]
WITH_TABLE = sorted(n for n in list_methods() if METHODS.get(n).config_class.RELEASED.settings)


def _released(name: str) -> Released:
    return METHODS.get(name).config_class.RELEASED


def _value(config, key: str):
    """A config's value of ``key``; an unset optimisation field is the library default."""
    v = config_value(config, key)
    if v is None and key.startswith("optim."):
        v = getattr(DEFAULT_OPTIM, key.split(".", 1)[1])
    return v


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _check(config, expected: dict, where: str) -> None:
    bad = {
        k: (v, _value(config, k)) for k, v in expected.items() if not _same(_value(config, k), v)
    }
    assert not bad, f"{where}: table value vs code: {bad}"


def test_the_methods_that_restate_a_release_have_a_table():
    assert set(TABLED) <= set(WITH_TABLE), WITH_TABLE
    for name in WITH_TABLE:
        rel = _released(name)
        assert rel.code.startswith("https://github.com/"), name
        assert all(s.source for s in rel.settings), name
        unknown = sorted(set(rel.datasets()) - set(list_datasets()))
        assert not unknown, f"{name}: rows for unregistered datasets {unknown}"
        presets = {s.preset for s in rel.settings if s.preset}
        cls = METHODS.get(name).config_class
        assert presets <= set(cls.PRESETS), f"{name}: rows for unknown presets {presets}"
        # plain data: renders as JSON (the method pages are generated from it)
        assert json.loads(json.dumps(to_dict(rel)))["settings"][0]["key"] == rel.settings[0].key


@pytest.mark.parametrize("name", WITH_TABLE)
def test_config_defaults_and_presets_equal_the_table(name):
    cls = METHODS.get(name).config_class
    rel = _released(name)
    _check(cls(), rel.expected(), f"{name} defaults")
    for preset in sorted({s.preset for s in rel.settings if s.preset}):
        _check(cls.from_preset(preset), rel.expected(preset=preset), f"{name} preset {preset}")


@pytest.mark.parametrize("name", WITH_TABLE)
def test_runs_on_each_dataset_resolve_to_the_table(name):
    """Through the shipped run presets, as the engine resolves a run on the dataset (the
    dataset's own template passed in, as training does)."""
    rel = _released(name)
    for protocol in PROTOCOLS:
        preset = load_preset(f"{name}-{protocol}")
        for dataset in [*rel.datasets(), "synthetic_shapes"]:
            cfg = apply_overrides(preset, {"data.dataset": dataset})
            template = get_reader(dataset).template
            spec = resolve_method(cfg.method, template, dataset)
            method_cfg = spec.build()
            expected = rel.expected(dataset, cfg.method.preset)
            where = f"{name}-{protocol} on {dataset}"
            _check(method_cfg, {k: v for k, v in expected.items() if k != "optim.epochs"}, where)
            # the run preset does not override what the method (and so the table) says
            run = resolve_optim(cfg.optim, method_cfg.optim, cfg.data.shots)
            published = DEFAULT_OPTIM.merged(method_cfg.optim)
            for f in ("optimizer", "lr", "adam_eps", "batch_size", "warmup_epochs", "scheduler"):
                assert getattr(run, f) == getattr(published, f), (where, f)
            assert run.epochs == method_cfg.optim.epochs_for(cfg.data.shots), where
            if "optim.epochs" in expected and not method_cfg.optim.epochs_by_shots:
                assert run.epochs == expected["optim.epochs"], where
            if "template" in {f for f in method_cfg.to_dict()} and not any(
                s.key == "template" and s.dataset == dataset for s in rel.settings
            ):
                assert method_cfg.template == template, where  # the dataset's own


def test_kgcoop_uses_the_released_texture_template_on_dtd(tmp_path):
    """The release's CUSTOM_TEMPLATES: DTD's hand-crafted target is "a photo of a {}, a type of
    texture." (not DTD's zero-shot "{} texture."); the run folder records it and the frozen
    target features are those of that prompt."""
    make_json_dataset(tmp_path / "data", "dtd")
    torch.manual_seed(0)
    bb = promptalign.load_backbone("pa-tiny-vit")
    cfg = apply_overrides(
        RunConfig(),
        [
            "method.name=kgcoop",
            "data.dataset=dtd",
            f"data.root={tmp_path / 'data'}",
            "data.shots=1",
            "data.workers=0",
            "run.device=cpu",
            "run.progress=false",
            "backbone.arch=pa-tiny-vit",
            "optim.epochs=0",
        ],
    )
    assert get_reader("dtd").template == "{} texture."
    res = train(cfg, tmp_path / "run", backbone=bb)
    stored = load_yaml(tmp_path / "run" / "config.yaml")
    assert stored.method.options["template"] == "a photo of a {}, a type of texture."
    method, _, _ = load_run(tmp_path / "run", device="cpu", backbone=bb)
    names = method.classnames
    with torch.no_grad():
        target = torch.nn.functional.normalize(
            bb.encode_text(bb.tokenize([f"a photo of a {c}, a type of texture." for c in names])),
            dim=-1,
        )
    assert torch.equal(method.clip_text, target)
    assert res.epochs == 0
    # a run's own template wins over the release's table
    own = resolve_method(
        MethodSpec(name="kgcoop", options={"template": "a {}."}), "{} texture.", "dtd"
    )
    assert own.build().template == "a {}."


def test_plot_starts_from_the_released_phrases_of_its_dataset(tiny):
    """PLOT++'s released template_dict: on DTD the four sets start from "a photo of a texture",
    ... with five context tokens each and the class prompt "{class}." after them."""
    from promptalign.methods import create_method
    from promptalign.methods.plot import _PHRASES

    spec = resolve_method(MethodSpec(name="plot"), get_reader("dtd").template, "dtd")
    cfg = spec.build()
    assert cfg.ctx_init == _PHRASES["dtd"][1] and cfg.n_ctx == 5 and cfg.template == "{}."
    m = create_method("plot", tiny, ["banded", "blotchy"], config=cfg)
    assert m.class_template == "{}." and m.ctx.shape[:2] == (4, 5)
    start = tiny.text_start
    for i, phrase in enumerate(cfg.ctx_init):
        words = tiny.embed_tokens(tiny.tokenize([phrase]))[0, start : start + 5].float()
        assert torch.equal(m.ctx.detach()[i], words)
    # a dataset outside the released table keeps the template-derived phrases
    other = resolve_method(MethodSpec(name="plot"), "a photo of a {} shape.", "synthetic_shapes")
    assert other.build().template == "a photo of a {} shape." and other.build().n_ctx == 4


def test_npt_passes_the_dataset_to_the_wrapped_method():
    spec = resolve_method(MethodSpec(name="npt", options={"base": "kgcoop"}), "{} texture.", "dtd")
    assert spec.build().base_options["template"] == "a photo of a {}, a type of texture."
