"""The method contract, held for every method file and every registered method: configs check
their fields in ``check()`` (never their own ``__post_init__``), methods never override
``training_step``, the engine owns the iteration budget, and explain holds no OT code."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import torch

import promptalign
from promptalign.config import FieldError, OptimConfig, RunConfig, apply_overrides, budget_epochs
from promptalign.methods import MethodConfig, PromptMethod
from promptalign.registry import METHODS

from conftest import ALL_METHODS as ALL

PACKAGE = Path(promptalign.__file__).parent
METHOD_FILES = sorted(p for p in (PACKAGE / "methods").glob("*.py") if p.name != "base.py")


def _defined_methods(source: str) -> list[tuple[str, str, int]]:
    """(class, method, line) of every function defined in a class body of ``source``."""
    tree = ast.parse(source)
    return [
        (cls.name, fn.name, fn.lineno)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_no_method_file_overrides_training_step_or_post_init(path):
    bad = [
        f"{path.name}:{line} {cls}.{name}"
        for cls, name, line in _defined_methods(path.read_text())
        if name in ("training_step", "__post_init__")
    ]
    assert not bad, f"override loss_terms / check() instead: {bad}"


def test_the_contract_test_sees_an_override():
    """The scan above finds what it looks for (a test that cannot fail is none)."""
    src = "class C(MethodConfig):\n    def __post_init__(self):\n        pass\n"
    assert _defined_methods(src) == [("C", "__post_init__", 2)]


@pytest.mark.parametrize("name", ALL)
def test_registered_methods_keep_the_base_training_step_and_post_init(name):
    cls = METHODS.get(name)
    assert cls.training_step is PromptMethod.training_step
    assert cls.config_class.__post_init__ is MethodConfig.__post_init__


@pytest.mark.parametrize("name", ALL)
def test_every_config_runs_the_base_checks(name):
    """check() of every config extends the base's: regulariser names and Literal choices are
    checked whatever the method, and the error names the field."""
    cls = METHODS.get(name).config_class
    with pytest.raises(FieldError, match=r"^regularizers: unknown regularizer\(s\) \['nope'\]"):
        cls(regularizers=("nope",))
    hints = typing.get_type_hints(cls)
    choices = [
        f.name
        for f in dataclasses.fields(cls)
        if typing.Literal
        in (
            typing.get_origin(hints[f.name]),
            *map(typing.get_origin, typing.get_args(hints[f.name])),
        )
    ]
    for field in choices:
        with pytest.raises(FieldError, match=rf"^{field}: 'nope' is not allowed"):
            cls(**{field: "nope"})


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("clip_lora", "rank", 0),
        ("clip_lora", "targets", ("x",)),
        ("clip_lora", "iterations_per_shot", -1),
        ("proda", "prompts_per_step", 99),
        ("proda", "position_mix", (0.0, 0.0, 0.0)),
        ("promptsrc", "gpa_std", 0.0),
        ("promptsrc", "teacher_templates", ("no slot",)),
        ("tip_adapter_f", "augment_views", 0),
        ("align", "tau_token", 0.0),
        ("align", "eps_token", -0.1),
        ("plot", "tau", -1.0),
        ("plot", "max_iter", 0),
    ],
)
def test_own_checks_name_the_field(name, field, value):
    cls = METHODS.get(name).config_class
    with pytest.raises(FieldError, match=rf"^{field}\b"):
        cls(**{field: value})


def test_a_bad_option_is_one_config_error_line_naming_the_key():
    from promptalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"^method\.options\.tau_token: 0\.0 must be > 0"):
        apply_overrides(RunConfig(), ["method.name=align", "method.options.tau_token=0"])


# --------------------------------------------------------------------------- iteration budget
def test_budget_epochs_cover_the_budget():
    assert budget_epochs(8000, 80, 32) == 2667  # ceil(80 / 32) = 3 steps per epoch
    assert budget_epochs(500, 5, 32) == 500
    assert budget_epochs(1, 1000, 1) == 1


def test_the_engine_turns_a_budget_into_epochs_from_the_method_field(tiny, tmp_path):
    """CLIP-LoRA's ``iterations_per_shot`` (a method config field, not an optimiser-settings
    subclass) decides the epochs of a run that does not set them; 0 falls back to the
    published epochs, and a run's own epochs win."""
    from promptalign.engine import build_run

    from data_fixtures import make_json_dataset

    make_json_dataset(tmp_path, "oxford_pets")

    def epochs(*overrides):
        cfg = apply_overrides(
            RunConfig(),
            [
                "method.name=clip_lora",
                "data.dataset=oxford_pets",
                f"data.root={tmp_path}",
                "data.shots=2",
                "run.device=cpu",
                *overrides,
            ],
        )
        run = build_run(cfg, torch.device("cpu"), backbone=tiny)
        return run.cfg.optim.epochs, run.data.num_classes

    got, classes = epochs()
    assert got == budget_epochs(500 * 2, 2 * classes, 32)
    assert epochs("method.options.iterations_per_shot=100")[0] == budget_epochs(
        200, 2 * classes, 32
    )
    assert epochs("method.options.iterations_per_shot=0")[0] == 10  # the published epochs
    assert epochs("optim.epochs=3")[0] == 3
    assert not any(
        dataclasses.is_dataclass(f.default) and type(f.default) is not OptimConfig
        for f in dataclasses.fields(METHODS.get("clip_lora").config_class)
        if f.name == "optim"
    )


# --------------------------------------------------------------------------- one owner for OT
def test_explain_and_the_method_files_hold_no_ot_solver_code():
    """Sinkhorn runs inside promptalign.ot only: explain asks the method's head, the methods
    build their heads from options."""

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names |= {a.name for a in node.names}
        return names

    solvers = {"sinkhorn", "sinkhorn_unbalanced", "hierarchical_ot", "auto_domain"}
    for path in [PACKAGE / "explain.py", *METHOD_FILES]:
        assert not imported(path) & solvers, path.name
    assert "HierarchicalOT" not in imported(PACKAGE / "explain.py")
