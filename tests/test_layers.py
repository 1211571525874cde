"""The package's layers (docs/architecture.md): a module imports from its own layer or the ones
below, never from above (lazy imports inside functions included); backbone/ and ot/ import
nothing else from promptalign; the library never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "promptalign"

# bottom to top; a module is the first entry its dotted path starts with (longest match)
LAYERS = (
    ("io", "registry", "accel", "claim", "backbone", "ot"),
    ("config", "data", "selfcheck"),
    ("methods",),
    ("resolve", "__init__"),
    ("engine", "presets"),
    ("benchmark", "explain", "demo"),
    ("viz", "tune"),
    ("cli",),
)
SELF_CONTAINED = ("backbone", "ot")  # import nothing else from promptalign


def _layer(module: str) -> int:
    top = module.split(".")[0] or "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"promptalign.{module} is in no layer of LAYERS; add it")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module under promptalign) of every promptalign import in ``path``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                names = [".".join([*parts, a.name]) for a in node.names] if not node.module else []
                out += [(node.lineno, n) for n in names] or [(node.lineno, ".".join(parts))]
            elif node.module and node.module.split(".")[0] == "promptalign":
                out.append((node.lineno, node.module.partition(".")[2]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "promptalign":
                    out.append((node.lineno, a.name.partition(".")[2]))
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module(path)
        for line, target in _imports(path):
            if _layer(target) > _layer(here):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports promptalign.{target}")
    assert not upward, "\n".join(upward)


def test_backbone_and_ot_import_nothing_else_from_the_package():
    outside = []
    for top in SELF_CONTAINED:
        for path in sorted((PACKAGE / top).rglob("*.py")):
            for line, target in _imports(path):
                if target.split(".")[0] != top:
                    outside.append(
                        f"{path.relative_to(PACKAGE)}:{line} imports promptalign.{target}"
                    )
    assert not outside, "\n".join(outside)


def test_the_layers_name_every_module():
    for path in PACKAGE.rglob("*.py"):
        _layer(_module(path))  # raises for a module in no layer
