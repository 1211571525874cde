"""The typed run config: every value converted by its field's type (YAML, preset, KEY=VALUE),
method options checked by the method's own config class, ranges checked in the classes, one
optimiser-settings type, and one-line CLI errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import promptalign
from promptalign.cli import main
from promptalign.config import (
    DEFAULT_OPTIM,
    ConfigError,
    OptimConfig,
    RunConfig,
    apply_overrides,
    default_workers,
    load_yaml,
    resolve_optim,
)
from promptalign.methods import create_method
from promptalign.presets import load_preset

from conftest import CLASSES


def coop(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), ["method.name=coop", *overrides])


def test_tuple_option_from_one_word_is_one_item(tmp_path):
    assert coop("method.options.regularizers=npt").method.options["regularizers"] == ("npt",)
    assert coop("method.options.regularizers=[npt]").method.options["regularizers"] == ("npt",)
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: coop, options: {regularizers: npt, n_ctx: 8}}\n")
    assert load_yaml(path).method.options == {"regularizers": ("npt",), "n_ctx": 8}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "method.options.n_ctxx=3",
            r"unknown key\(s\) \['method.options.n_ctxx'\]; allowed: \[.*'method.options.n_ctx'",
        ),
        ("method.options.n_ctx=many", "method.options.n_ctx: expected an integer, got 'many'"),
        (
            "method.options.regularizers=n",
            r"method.options.regularizers: unknown regularizer\(s\) \['n'\]",
        ),
        (
            "method.options.class_token_position=mid",
            r"method.options.class_token_position: 'mid' is not allowed; "
            r"choose one of \['end', 'middle', 'front'\]",
        ),
        (
            "method.options.optim={optimizer: adam}",
            r"method.options.optim.optimizer: 'adam' is not allowed; "
            r"choose one of \['sgd', 'adamw'\]",
        ),
        ("method.preset=nope", "method.preset: coop has no preset 'nope'"),
        ("optim.epochs=-5", "optim.epochs: -5 must be >= 0"),
        ("optim.lr=-1", "optim.lr: -1.0 must be > 0"),
        ("optim.batch_size=0", "optim.batch_size: 0 must be >= 1"),
        ("optim=3", r"optim: expected a mapping of optim.\* keys"),
        (
            "optim.amp=fp8",
            r"optim.amp: 'fp8' is not allowed; choose one of \['auto', 'none', 'bf16', 'fp16'\]",
        ),
        ("data.workers=-1", "data.workers: -1 must be >= 0"),
        ("data.shots=0", "data.shots: 0 must be >= 1"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        coop(override)


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ConfigError, match="method.name: unknown method 'nope'; registered: .*coop"):
        apply_overrides(RunConfig(), ["method.name=nope"])


def test_none_stays_a_string_where_the_field_allows_it():
    cfg = coop("optim.amp=none", "data.shots=none", "optim.optimizer=none", "backbone.weights=null")
    assert cfg.optim.amp == "none" and cfg.data.shots is None and cfg.optim.optimizer is None
    assert cfg.backbone.weights is None


def test_method_optim_changes_merge_into_the_published_settings(tiny):
    cfg = coop("method.options.optim={lr: 0.01}")
    m = create_method("coop", tiny, CLASSES, **cfg.method.options)
    assert m.optim_preset.lr == 0.01 and m.optim_preset.epochs_for(16) == 200  # rest kept


def test_npt_optim_field_is_used(tiny):
    npt = create_method("npt", tiny, CLASSES, base_options={"depth": 2}, optim={"lr": 0.1})
    inner = npt.inner.optim_preset
    assert npt.optim_preset.lr == 0.1 and npt.optim_preset.batch_size == inner.batch_size


def test_one_optimiser_type_layers_defaults_method_and_run():
    method = OptimConfig(lr=0.0035, batch_size=4, epochs=5, epochs_by_shots=((1, 2),))
    o = resolve_optim(OptimConfig(batch_size=8), method, shots=16)
    assert (o.lr, o.batch_size, o.epochs, o.momentum) == (0.0035, 8, 5, DEFAULT_OPTIM.momentum)
    assert resolve_optim(OptimConfig(), method, shots=1).epochs == 2
    assert resolve_optim(OptimConfig(epochs=3), method, shots=1).epochs == 3
    assert promptalign.OptimConfig is OptimConfig and not hasattr(promptalign, "OptimPreset")


def test_shipped_model_in_yaml_gets_its_shipped_weights(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: {arch: tiny-shapes}\n")
    assert load_yaml(path).backbone.weights is None
    assert apply_overrides(RunConfig(), ["backbone.arch=tiny-shapes"]).backbone.weights is None
    assert RunConfig().backbone.weights == "openai"
    assert load_preset("coop-base2new").backbone.weights == "openai"


def test_default_workers_fit_the_machine(monkeypatch):
    for cores, expected in ((1, 0), (2, 0), (3, 2), (16, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_workers() == expected


def test_method_registry_loads_on_first_use():
    code = (
        "from promptalign.registry import METHODS; "
        "print(METHODS.get('coop').__name__, 'coop' in METHODS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["CoOp", "True"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["method.options.n_ctxx=3"], "n_ctxx"),
        (["method.options.regularizers=n"], "unknown regularizer"),
        (["optim.epochs=-5"], "optim.epochs"),
        (["optim=3"], "optim: expected a mapping"),
        (["--workers", "-1"], "--workers"),
        (["--preset", "nope"], "method.preset"),
    ],
)
def test_cli_config_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--method", "coop", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_method_refusing_its_options_is_a_config_error(tiny):
    from promptalign.engine.build import build_method

    cfg = apply_overrides(RunConfig(), ["method.name=zeroshot", "method.options.template=no slot"])
    with pytest.raises(ConfigError, match=r"method.options \(zeroshot\): .*no '\{\}' placeholder"):
        build_method(cfg, CLASSES, "cpu", backbone=tiny)
