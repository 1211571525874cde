"""Generated parts of the documentation site, so they follow the code as it changes.

Used as a MkDocs hook (``hooks:`` in mkdocs.yml): a page holding a marker comment
``<!-- generated: NAME -->`` gets that part in its place when the site is built:

* ``cli``: the command-line reference, from the argparse parser (``promptalign.cli.build_parser``);
* ``errors``: every error message the command line can print, read from the source: each
  ``raise`` of an error the CLI reports as one line (the exception types ``promptalign.cli``
  catches, the package's own error classes derived from them, argparse's argument errors, and a
  method's own option checks, which the engine re-raises as a config error);
* ``methods``: one note per registered method, from its module docstring (paper, what it learns,
  deviations from the released code, how it was checked), its config class (published defaults)
  and its table of released settings (``MethodConfig.RELEASED``).

``python scripts/docs_gen.py NAME`` prints a part (what the site shows, as Markdown).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "promptalign"
MARKER = re.compile(r"<!--\s*generated:\s*([a-z_-]+)\s*-->")


def _import_package() -> None:
    """Document this checkout's sources, whatever promptalign is installed elsewhere."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


# --------------------------------------------------------------------------- CLI reference
def _flags(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            return f"`{names}`"
        metavar = action.metavar or action.dest.upper()
        if action.nargs in ("+", "*"):
            metavar = f"{metavar} ..."
        return f"`{names} {metavar}`"
    return f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("+", "*") else "")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _action_row(action: argparse.Action) -> str:
    help_text = action.help or ""
    extra = []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.required and action.option_strings:
        extra.append("required")
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default not in (None, argparse.SUPPRESS)
        and "default" not in help_text
    ):
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        extra.append(f"default `{shown}`")
    text = "; ".join([help_text] * bool(help_text) + extra)
    return f"| {_flags(action)} | {_cell(text)} |"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return []


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # the same line breaks on every machine
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _parser_section(parser: argparse.ArgumentParser, level: str) -> list[str]:
    rows = [
        _action_row(a)
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    out = ["```text", _usage(parser), "```", ""]
    if parser.description:
        out += [_cell(parser.description), ""]
    if rows:
        out += ["| argument | meaning |", "|---|---|", *rows, ""]
    return out


def cli_reference() -> str:
    """The command-line reference as Markdown: usage, description and arguments of every
    command, from the parser the ``promptalign`` command uses."""
    _import_package()
    from promptalign.cli import build_parser

    parser = build_parser()
    out = _parser_section(parser, "##")
    commands = _subcommands(parser)
    out += ["| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#promptalign-{name}) | {_cell(h)} |" for name, h, _ in commands]
    out.append("")
    for name, help_text, sub in commands:
        out += [f"## promptalign {name}", ""]
        if help_text and not sub.description:
            out += [_cell(help_text[:1].upper() + help_text[1:]) + ".", ""]
        out += _parser_section(sub, "###")
        nested = _subcommands(sub)
        for sub_name, sub_help, subsub in nested:
            out += [f"### promptalign {name} {sub_name}", "", _cell(sub_help), ""]
            out += _parser_section(subsub, "####")
    return "\n".join(out)


# --------------------------------------------------------------------------- error messages
# builtin exceptions the CLI reports in one line when it catches them (besides the package's own)
_BUILTIN_REPORTED = {"FileExistsError", "FileNotFoundError", "KeyError", "OSError"}
# too general to mean "a message for the user" where it is caught (a last-resort handler)
_GENERIC = {"Exception", "BaseException", "ValueError", "RuntimeError", "KeyboardInterrupt"}
# folders whose ValueErrors reach the user as one line: engine/build.py re-raises a method's own
# checks of its options as a ConfigError
_VALUE_ERRORS_REPORTED = ("methods",)
AREAS = {
    "cli": "Command line",
    "config.py": "Configuration",
    "presets.py": "Configuration",
    "methods": "Method options",
    "data": "Data",
    "backbone": "Backbones and weights",
    "engine": "Training, evaluation and run folders",
    "benchmark.py": "Benchmarks",
    "explain.py": "Explain",
    "registry.py": "Configuration",
}


@dataclass(frozen=True)
class ErrorMessage:
    """One message the CLI can print: its text (an f-string's fields as ``{expression}``), the
    exception that carries it and where it is raised."""

    text: str
    exception: str
    path: str  # relative to src/promptalign
    line: int
    function: str

    @property
    def area(self) -> str:
        return AREAS.get(self.path.split("/")[0], "Other")


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _exception_classes() -> dict[str, set[str]]:
    """``{class name: base names}`` of every class defined in the package."""
    out: dict[str, set[str]] = {}
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, set()).update(_name(b) for b in node.bases)
    return out


def reported_exceptions() -> set[str]:
    """Exception names whose messages the CLI prints: those ``promptalign/cli/`` catches by
    name (minus catch-all types), and every package class derived from one of them."""
    caught: set[str] = set()
    trees = [
        ast.parse(p.read_text(encoding="utf-8")) for p in sorted((PACKAGE / "cli").glob("*.py"))
    ]
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            caught.update(_name(t) for t in types)
    classes = _exception_classes()
    reported = {c for c in caught if c in classes or c in _BUILTIN_REPORTED} - _GENERIC
    changed = True
    while changed:  # subclasses of reported classes, to any depth
        new = {c for c, bases in classes.items() if bases & reported} - reported
        reported |= new
        changed = bool(new)
    return reported | {"ArgumentTypeError"}


def _message_text(node: ast.expr | None, assigned: dict[str, ast.expr]) -> str:
    """The message an exception's first argument builds, f-string fields as ``{...}``."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif isinstance(v, ast.FormattedValue):
                parts.append("{" + ast.unparse(v.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message_text(node.left, assigned) + _message_text(node.right, assigned)
    if isinstance(node, ast.Name) and node.id in assigned:
        return _message_text(assigned.pop(node.id), assigned)
    return "{" + ast.unparse(node) + "}"


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node


def _raises(path: Path, reported: set[str]) -> Iterator[ErrorMessage]:
    rel = path.relative_to(PACKAGE).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    value_errors = rel.split("/")[0] in _VALUE_ERRORS_REPORTED
    owner: dict[int, str] = {}
    for name, fn in _functions(tree):
        for node in ast.walk(fn):
            owner[id(node)] = name  # innermost function wins (walked after its parent)
    assigned_in: dict[str, dict[str, ast.expr]] = {}
    for name, fn in _functions(tree):
        assigned_in[name] = {
            t.id: n.value
            for n in ast.walk(fn)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
            continue
        exc = _name(node.exc.func)
        if exc not in reported and not (value_errors and exc == "ValueError"):
            continue
        fn = owner.get(id(node), "<module>")
        arg = node.exc.args[0] if node.exc.args else None
        text = _message_text(arg, dict(assigned_in.get(fn, {})))
        yield ErrorMessage(" ".join(text.split()), exc, rel, node.lineno, fn)
    # argparse one-line errors the CLI prints itself: parser.error(...) and print(..., stderr)
    if rel.split("/")[0] == "cli":
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = owner.get(id(node), "<module>")
            if _name(node.func) == "error" and node.args:
                text = _message_text(node.args[0], dict(assigned_in.get(fn, {})))
                yield ErrorMessage(" ".join(text.split()), "usage", rel, node.lineno, fn)
            elif (
                _name(node.func) == "print"
                and any(
                    k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords
                )
                and node.args
            ):
                text = _message_text(node.args[0], dict(assigned_in.get(fn, {})))
                yield ErrorMessage(" ".join(text.split()), "stderr", rel, node.lineno, fn)


def error_messages() -> list[ErrorMessage]:
    """Every message the CLI can print as an error, in source order per file."""
    reported = reported_exceptions()
    out = []
    for path in _package_files():
        out.extend(sorted(_raises(path, reported), key=lambda m: m.line))
    return out


def _code(text: str) -> str:
    """``text`` as one inline code span (backticks inside it allowed)."""
    ticks = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{_cell(text)}{pad}{ticks}"


def _message_cell(text: str) -> str:
    if re.fullmatch(r"\{[^{}]*\}", text):  # passes another error's message on
        return "*the message of the error it re-raises*"
    return _code(text)


def _error_table(area: str, msgs: list[ErrorMessage]) -> list[str]:
    out = [f"### {area}", "", "| message | raised as | where |", "|---|---|---|"]
    for m in msgs:
        where = f"`{m.path}:{m.line}` `{m.function}`"
        out.append(f"| {_message_cell(m.text)} | `{m.exception}` | {where} |")
    return out + [""]


def errors_reference() -> str:
    """The error list as Markdown, grouped by area, each with the exception and the place."""
    by_area: dict[str, list[ErrorMessage]] = {}
    for m in error_messages():
        by_area.setdefault(m.area, []).append(m)
    order = [*dict.fromkeys(AREAS.values()), *by_area]  # an area not listed still shows, last
    out = []
    for area in dict.fromkeys(order):
        if by_area.get(area):
            out += _error_table(area, by_area[area])
    return "\n".join(out)


# --------------------------------------------------------------------------- method notes
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


_CODE_SPAN = re.compile(r"(``.+?``|`[^`]+`)")


def _escape(text: str) -> str:
    """Markdown-escape ``[``, ``]``, ``<`` and ``*`` outside code spans (docstrings write
    "[SOS] c1 c2 [EOT]" and "<T, C>", which Markdown would take as links and HTML)."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = re.sub(r"([\[\]<*_])", r"\\\1", parts[i])
    return "".join(parts)


def docstring_markdown(text: str) -> str:
    """A reST-flavoured docstring as Markdown: roles become code spans, brackets and angle brackets
    are escaped, and a list gets the blank line before it that Markdown needs."""
    text = _ROLE.sub(lambda m: f"`{m.group(1).strip()}`", text)
    lines = []
    for line in text.splitlines():
        bullet = re.match(r"^(\s*[*-] )(.*)$", line)
        lines.append(bullet.group(1) + _escape(bullet.group(2)) if bullet else _escape(line))
    text = "\n".join(lines)
    lines = text.splitlines()
    out: list[str] = []
    for line in lines:
        is_item = line.lstrip().startswith(("* ", "- "))
        if is_item and out and out[-1].strip() and not out[-1].lstrip().startswith(("* ", "- ")):
            prev_is_item_text = out[-1].startswith("  ")  # continuation of a list item
            if not prev_is_item_text:
                out.append("")
        out.append(line)
    return "\n".join(out)


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from a config class's "Attributes:" section (an entry starts at
    the indentation of the first one; deeper lines continue it)."""
    doc = cls.__doc__ or ""
    if "Attributes:" not in doc:
        return {}
    body = [line for line in doc.split("Attributes:", 1)[1].splitlines() if line.strip()]
    if not body:
        return {}
    indent = len(body[0]) - len(body[0].lstrip())
    out: dict[str, str] = {}
    current: list[str] = []
    for raw in body:
        line = raw.strip()
        m = re.match(r"^([a-z_][a-z0-9_, ]*):\s*(.*)$", line)
        if m and len(raw) - len(raw.lstrip()) <= indent:
            current = [m.group(2)]
            for name in m.group(1).split(","):
                out[name.strip()] = current  # shared list: continuation lines added below
        elif current:
            current.append(line)
    return {k: " ".join(v) for k, v in out.items()}


def _value(v) -> str:
    if isinstance(v, str):
        return f'`"{v}"`' if v else '`""`'
    if isinstance(v, tuple) and v and all(isinstance(x, str) for x in v):
        return ", ".join(f'`"{x}"`' for x in v)
    return f"`{v}`"


def _defaults_table(config_cls: type) -> list[str]:
    _import_package()
    from promptalign.methods.base import MethodConfig

    common = {f.name for f in dataclasses.fields(MethodConfig)}
    docs = _attribute_docs(config_cls)
    cfg = config_cls()
    rows = []
    for f in dataclasses.fields(config_cls):
        if f.name in common:
            continue
        meaning = _cell(docstring_markdown(docs.get(f.name, "")))
        rows.append(f"| `{f.name}` | {_value(getattr(cfg, f.name))} | {meaning} |")
    optim = {
        k: v for k, v in dataclasses.asdict(cfg.optim).items() if v is not None
    }  # the published optimisation settings
    out = []
    if rows:
        out += ["| option | default | meaning |", "|---|---|---|", *rows, ""]
    if optim:
        shown = ", ".join(f"{k} `{v}`" for k, v in optim.items())
        out += [f"Published optimisation settings (`optim`): {shown}.", ""]
    if config_cls.PRESETS:
        names = ", ".join(f"`{p}`" for p in sorted(config_cls.PRESETS))
        out += [f"Presets (`--preset`, `method.preset`): {names}.", ""]
    return out


def _released_table(config_cls: type) -> list[str]:
    rel = config_cls.RELEASED
    if not rel.settings:
        return []
    out = [
        f"Released settings ({rel.code}), each checked against the code by "
        "`tests/test_released_defaults.py`:",
        "",
        "| setting | value | dataset | preset | where the release sets it |",
        "|---|---|---|---|---|",
    ]
    for s in rel.settings:
        value = _value(s.value)
        if len(value) > 160:
            value = value[:157] + "...`"
        out.append(
            f"| `{s.key}` | {_cell(value)} | {s.dataset or 'every'} | {s.preset or '-'} "
            f"| {_cell(s.source)} |"
        )
    return out + [""]


def method_notes() -> str:
    """One section per registered method: its docstring, defaults and released settings."""
    _import_package()
    import importlib

    from promptalign.methods import list_methods
    from promptalign.registry import METHODS

    out = []
    for name in list_methods():
        cls = METHODS.get(name)
        module = importlib.import_module(cls.__module__)
        doc = (module.__doc__ or "").strip()
        title, _, body = doc.partition("\n")
        out += [f"### {name}", "", f"**{title.strip()}**", ""]
        out += [docstring_markdown(body.strip()), ""]
        out += _defaults_table(cls.config_class)
        out += _released_table(cls.config_class)
        out.append(
            f"Source: `src/promptalign/{cls.__module__.split('.', 1)[1].replace('.', '/')}.py`"
        )
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- MkDocs hook
PARTS = {"cli": cli_reference, "errors": errors_reference, "methods": method_notes}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs hook: replace each ``<!-- generated: NAME -->`` marker with its part."""

    def expand(m: re.Match) -> str:
        name = m.group(1)
        if name not in PARTS:
            raise ValueError(f"{page.file.src_path}: unknown generated part {name!r}")
        return PARTS[name]()

    return MARKER.sub(expand, markdown)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print a generated part of the docs.")
    parser.add_argument("part", choices=sorted(PARTS))
    print(PARTS[parser.parse_args().part]())
