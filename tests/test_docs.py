"""Every Python and shell block of README.md and docs/ runs here, so the documentation cannot rot.

Blocks run in document order, one page at a time, in a fresh working folder (also ``$HOME``, so
``~/data`` is inside it): the Python blocks of a page share one namespace, and ``promptalign ...``
commands run in this process (``promptalign.cli.main``), so the package is imported once. Other
shell commands run in ``bash``; ``python scripts/X.py`` / ``python benchmarks/X.py`` run the
repository's script. A code block with a title (```` ```csv title="labels.csv" ````) is a file
the page shows: it is written to the working folder before the blocks after it run.

An HTML comment right before a block, ``<!-- docs-test: MARKERS -->``, says how to run it:

* ``gpu`` / ``network``: the block needs a GPU or downloaded weights; it runs as a stand-in on
  the shipped tiny model on the CPU: ``--arch X`` becomes ``--arch tiny-shapes-v3``, ``--weights``
  goes, ``--device cuda`` becomes ``--device cpu``, ``train`` and ``benchmark`` get one epoch
  (``optim.epochs=1``) and a benchmark one seed; in Python, ``load_backbone("X", weights="Y")``
  becomes ``load_backbone("tiny-shapes-v3")``. The rewrite must change something.
* ``fixture=KIND:PATH,...``: data to create first: ``synthetic:PATH`` (the synthetic world,
  rendered once per session), ``imagefolder:PATH`` (train/val/test folders of three classes),
  ``photos:PATH`` (a folder of loose images), ``coop:PATH`` (every benchmark dataset in CoOp's
  layout, tiny, from tests/data_fixtures.py).
* ``exit=N``: the block's last command must exit with status N (an error shown on purpose).
* ``slow``: runs only with ``-m slow`` (each such block in its own folder).
* ``dry``: benchmark commands that take hours: their arguments are parsed and every job's config
  is resolved and checked (``promptalign.benchmark.plan_jobs``), nothing is trained.
* ``install`` / ``ci``: the install command must be one of the two set-up commands of the README
  (the package under test is already installed: the rest of the block runs, ``slow`` if marked);
  ``ci``: the README's test command, which ``.ci/run`` must contain verbatim (it is what CI runs).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from promptalign.registry import DATASETS, METHODS, REGULARIZERS

from data_fixtures import image, make_all

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = {"python", "bash"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*(.*)$")
INSTALL = "python3 -m pip install -c constraints.txt ."
TEST_COMMAND = 'python3 -m pip install -c constraints.txt -e ".[test]" && python3 -m pytest'
TINY = "tiny-shapes-v3"


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    source: str
    markers: set[str] = field(default_factory=set)
    options: dict[str, str] = field(default_factory=dict)
    title: str | None = None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, info = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        body = "\n".join(line[len(indent) :] for line in lines[i + 1 : j]) + "\n"
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        markers, options = set(), {}
        if mm := MARKER.search(prev):
            for word in mm.group(1).split():
                key, eq, value = word.partition("=")
                if eq:
                    options[key] = value
                else:
                    markers.add(key)
        title = re.search(r'title="([^"]+)"', info)
        blocks.append(
            Block(page, i + 1, lang, body, markers, options, title.group(1) if title else None)
        )
        i = j + 1
    return blocks


# --------------------------------------------------------------------------- stand-in rewrites
def stand_in_shell(command: str) -> str:
    """A GPU / network command as a run on the shipped tiny model on the CPU."""
    out = re.sub(r"--arch\s+\S+", f"--arch {TINY}", command)
    out = re.sub(r"\s--weights\s+\S+", "", out)
    out = re.sub(r"--device\s+cuda(:\d+)?", "--device cpu", out)
    words = shlex.split(out, comments=True)
    if words[:2] in (["promptalign", "train"], ["promptalign", "benchmark"]):
        if "--arch" not in words:
            out += f" --arch {TINY}"
        if "--device" not in words:
            out += " --device cpu"
        if not any(w.startswith("optim.epochs=") for w in words):
            out += " optim.epochs=1"
    if words[:2] == ["promptalign", "benchmark"] and "--seeds" not in words:
        out += " --seeds 1"
    return out


def stand_in_python(source: str) -> str:
    out = re.sub(
        r'load_backbone\(\s*"[^"]+"\s*,\s*weights="[^"]+"\s*\)', f'load_backbone("{TINY}")', source
    )
    return re.sub(r'device="cuda(:\d+)?"', 'device="cpu"', out)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The synthetic world rendered once for every page that uses it."""
    from promptalign.data import load_dataset

    root = tmp_path_factory.mktemp("synthetic")
    load_dataset("synthetic_colour_shapes", root, cache_dir=root / ".cache")
    return root


def make_imagefolder(path: Path) -> None:
    n = 0
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for cls in ("cat", "dog", "fox"):
            for i in range(count):
                image(path / split / cls / f"{i:02d}.jpg", n)
                n += 1


def make_fixture(spec: str, cwd: Path, synthetic: Path) -> None:
    for item in spec.split(","):
        kind, _, where = item.partition(":")
        path = Path(where.replace("~", str(cwd), 1)) if where.startswith("~") else cwd / where
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "synthetic":
            path.symlink_to(synthetic, target_is_directory=True)
        elif kind == "imagefolder":
            make_imagefolder(path)
        elif kind == "photos":
            for i, name in enumerate(("cat", "dog", "fox")):
                image(path / f"{name}.jpg", 100 + i)
        elif kind == "coop":
            make_all(path)
        else:
            raise ValueError(f"unknown docs-test fixture {kind!r}")


# --------------------------------------------------------------------------- running blocks
def commands(source: str) -> list[str]:
    """The commands of a shell block: continued lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", source)
    out = []
    for line in joined.splitlines():
        if line.strip() and shlex.split(line, comments=True):
            out.append(line.strip())
    return out


def run_cli(argv: list[str]) -> tuple[int, str]:
    from promptalign.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main(argv)
    return code, buf.getvalue()


def plan_benchmark(argv: list[str]) -> tuple[int, str]:
    """Parse a benchmark command and resolve every job's config without training (``dry``)."""
    from promptalign.benchmark import default_datasets, plan_jobs
    from promptalign.cli import build_parser
    from promptalign.cli.bench import benchmark_overrides

    args, extra = build_parser().parse_known_args(argv)
    assert args.command == "benchmark" and args.protocol not in ("status", "cancel"), argv
    plan = plan_jobs(
        args.protocol,
        methods=args.methods,
        datasets=args.datasets or default_datasets(args.protocol),
        seeds=args.seeds,
        data_root=args.data_root,
        out_dir=Path(args.out) / args.protocol,
        shots=args.shots,
        targets=args.targets,
        overrides=[*benchmark_overrides(args), *extra],
    )
    return 0, f"{len(plan)} jobs planned"


def run_shell(block: Block, command: str, cwd: Path) -> tuple[int, str]:
    if "gpu" in block.markers or "network" in block.markers:
        command = stand_in_shell(command)
    words = shlex.split(command, comments=True)
    if words[0] == "promptalign" and not re.search(r"[|;<>&]", command):
        if "dry" in block.markers and words[1] == "benchmark":
            return plan_benchmark(words[1:])
        return run_cli(words[1:])
    if words[0] in ("python", "python3") and (ROOT / words[1]).is_file():
        words = [sys.executable, str(ROOT / words[1]), *words[2:]]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        res = subprocess.run(words, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
        return res.returncode, res.stdout + res.stderr
    res = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def run_block(block: Block, cwd: Path, namespace: dict, synthetic: Path | None) -> None:
    if "fixture" in block.options:
        make_fixture(block.options["fixture"], cwd, synthetic)
    if block.title is not None and block.lang not in RUN:
        (cwd / block.title).write_text(block.source, encoding="utf-8")
        return
    if block.lang == "python":
        source = block.source
        if "gpu" in block.markers or "network" in block.markers:
            source = stand_in_python(source)
            assert source != block.source, f"{block}: marked gpu/network, but nothing to replace"
        exec(compile(source, str(block), "exec"), namespace)
        return
    cmds = commands(block.source)
    if "install" in block.markers:
        first, _, rest = cmds[0].partition(" && ")
        assert first == INSTALL or first == TEST_COMMAND.split(" && ")[0], block
        cmds = [rest, *cmds[1:]] if rest else cmds[1:]
    if "gpu" in block.markers or "network" in block.markers:
        assert any(stand_in_shell(c) != c for c in cmds), f"{block}: nothing to replace"
    expected = int(block.options.get("exit", 0))
    for i, command in enumerate(cmds):
        code, output = run_shell(block, command, cwd)
        want = expected if i == len(cmds) - 1 else 0
        assert code == want, f"{block}: `{command}` exited {code} (expected {want}):\n{output}"


def _unmarked_gpu(block: Block) -> bool:
    needs = re.search(r"--device\s+cuda|--weights\s+openai|weights=\"(?!None)", block.source)
    return bool(needs) and not ({"gpu", "network"} & block.markers)


@pytest.fixture
def clean_registries():
    """A page may register a method or a dataset; later tests must not see it."""
    from promptalign.benchmark.launchers import LAUNCHERS

    registries = (METHODS, REGULARIZERS, DATASETS, LAUNCHERS)
    for r in registries:
        r.names()  # load every registered module first: the snapshot is the full registry
    saved = {r: dict(r._items) for r in registries}
    yield
    for r, items in saved.items():
        r._items.clear()
        r._items.update(items)


@pytest.fixture
def docs_module(monkeypatch):
    """The module a page's Python blocks run in (dataclasses look their module up by name)."""
    module = types.ModuleType("docs_page")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_blocks_run(page, tmp_path, monkeypatch, request, clean_registries, docs_module):
    blocks = [b for b in parse_blocks(page) if b.lang in RUN or (b.title and b.lang not in RUN)]
    blocks = [b for b in blocks if "slow" not in b.markers and "ci" not in b.markers]
    if not any(b.lang in RUN for b in blocks):
        pytest.skip("no runnable block outside slow / ci ones")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    synthetic = (
        request.getfixturevalue("synthetic_root")
        if any("synthetic:" in b.options.get("fixture", "") for b in blocks)
        else None
    )
    for block in blocks:
        run_block(block, tmp_path, docs_module.__dict__, synthetic)


SLOW_BLOCKS = [b for p in PAGES for b in parse_blocks(p) if "slow" in b.markers]


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW_BLOCKS, ids=str)
def test_slow_block_runs(block, tmp_path, monkeypatch, request, clean_registries, docs_module):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    synthetic = request.getfixturevalue("synthetic_root")
    run_block(block, tmp_path, docs_module.__dict__, synthetic)


def test_every_block_is_run_or_marked():
    """Python and shell blocks only; each runs by default, or says why not with a marker, and a
    block that needs a GPU or weights from the network carries the marker that swaps them."""
    known = {"gpu", "network", "slow", "dry", "install", "ci"}
    for page in PAGES:
        for b in parse_blocks(page):
            assert b.lang in RUN | {"text", "csv", "json", "yaml"}, f"{b}: language {b.lang!r}"
            assert b.markers <= known, f"{b}: unknown marker(s) {b.markers - known}"
            assert not _unmarked_gpu(b), f"{b}: needs a GPU or weights: mark it gpu or network"


def test_readme_test_command_is_what_ci_runs():
    readme = ROOT / "README.md"
    ci = [b for b in parse_blocks(readme) if "ci" in b.markers]
    assert [b.source.strip() for b in ci] == [TEST_COMMAND]
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    install = [b for b in parse_blocks(readme) if "install" in b.markers]
    assert [b.source.strip() for b in install] == [f"{INSTALL} && promptalign demo"]


def test_stand_in_rewrite():
    cmd = "promptalign train --method align --dataset d --arch ViT-B-16 --weights openai"
    cmd += " --device cuda"
    assert stand_in_shell(cmd) == (
        f"promptalign train --method align --dataset d --arch {TINY} --device cpu optim.epochs=1"
    )
    assert stand_in_shell("promptalign eval runs/x --device cuda:1") == (
        "promptalign eval runs/x --device cpu"
    )
    src = 'bb = promptalign.load_backbone("ViT-L-14", weights="openai")'
    assert stand_in_python(src) == f'bb = promptalign.load_backbone("{TINY}")'


# --------------------------------------------------------------------------- generated parts
def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _methods_table(page: Path) -> dict[str, list[str]]:
    lines = page.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | paper |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_methods_tables_match_the_code():
    """README's and docs/methods.md's methods tables: one row per registered method, trainable
    parameters as counted on a random ViT-B/16 (scripts/trainable_params.py), published H as in
    promptalign/published.yaml. Builds ViT-B/16 once (about 10 s on two cores)."""
    import yaml

    from promptalign.methods import list_methods

    readme, docs = _methods_table(ROOT / "README.md"), _methods_table(ROOT / "docs" / "methods.md")
    assert readme == docs
    assert sorted(readme) == list_methods()
    counts = _load_script("trainable_params").count()
    published = yaml.safe_load((ROOT / "src" / "promptalign" / "published.yaml").read_text())
    for name, cells in readme.items():
        shown = int(re.match(r"[\d,]+", cells[3]).group(0).replace(",", ""))
        assert shown == counts[name], f"{name}: table says {shown}, the code has {counts[name]}"
        h = published["base2new"].get(name)
        assert cells[4] == (f"{h[2]:.2f}" if h else "–"), f"{name}: published H {cells[4]}"


def test_cli_reference_lists_every_command_and_option():
    from promptalign.cli import build_parser

    text = _load_script("docs_gen").cli_reference()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert f"## promptalign {name}" in text
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in text or f", {flag}" in text, f"{name} {flag}"


def test_error_list_holds_every_raise_the_cli_reports():
    """The Troubleshooting page's list comes from the source; every `raise` of an error type the
    CLI reports (and every ValueError of a method's option checks) must be found in it."""
    gen = _load_script("docs_gen")
    messages = gen.error_messages()
    reported = gen.reported_exceptions()
    assert {"UsageError", "ConfigError", "DatasetError", "WeightsError"} <= reported
    pattern = re.compile(r"raise\s+(?:\w+\.)?(\w+)\(")
    expected = 0
    for path in sorted((ROOT / "src" / "promptalign").rglob("*.py")):
        top = path.relative_to(ROOT / "src" / "promptalign").parts[0]
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            expected += name in reported or (name == "ValueError" and top == "methods")
    raised = [m for m in messages if m.exception not in ("usage", "stderr")]
    assert len(raised) == expected
    texts = [m.text for m in messages]
    assert any("no CUDA GPU is available to PyTorch" in t for t in texts)
    assert any("lists no images" in t for t in texts)
    assert "<!-- generated: errors -->" in (ROOT / "docs" / "troubleshooting.md").read_text()
