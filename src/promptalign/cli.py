"""The `promptalign` command line: turns arguments into a config and calls library functions."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class UsageError(Exception):
    """A bad command-line input found before any work starts: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``promptalign CMD: error: MESSAGE (see ... --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- input checks
def _int_at_least(low: int, what: str, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_one_line(repr(text))} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{_one_line(str(value))} is not allowed: {what}")
        return value

    return parse


_positive = _int_at_least(1, "must be >= 1")
_workers = _int_at_least(0, "must be >= 0 (0 loads images in the main process)")
_seed = _int_at_least(-(2**40) + 1, "a seed lies between -2**40 and 2**40", high=2**40 - 1)


def _check_device(device: str | None, flag: str = "--device") -> None:
    """``cuda`` without a usable GPU is a usage error, not a traceback from deep inside torch."""
    if not device or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"{flag} {device}: no CUDA GPU is available to PyTorch on this machine; "
            "use --device cpu (or auto)"
        )
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UsageError(
            f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) visible; "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )


def _dataset_dir(cfg) -> tuple[Path, bool] | None:
    """The folder a run's dataset lives in (custom path or registered layout), if known, and
    whether run folders inside it are refused too (image trees: a run folder there would look like
    data); a CSV's folder only may not be the run folder itself."""
    from promptalign.data import list_datasets
    from promptalign.data.base import get_reader

    d = cfg.data.dataset
    if not d:
        return None
    if d in list_datasets():
        return get_reader(d).dataset_dir(Path(cfg.data.root).expanduser()), True
    p = Path(d).expanduser()
    return (p.parent, False) if p.suffix.lower() == ".csv" else (p, True)


def _check_out(out: str, data_dir: tuple[Path, bool] | None = None) -> None:
    """``--out`` must be a writable folder path outside the dataset."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder; choose a new folder path")
    target = path.resolve()
    if data_dir is not None:
        data, nested = data_dir[0].resolve(), data_dir[1]
        if target == data or (nested and data in target.parents):
            where = "is" if target == data else "is inside"
            raise UsageError(
                f"--out {out}: {where} the dataset folder {data_dir[0]}; run files must "
                "not be written into the data, choose a folder elsewhere"
            )
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out}: cannot write into {existing} (permission denied); "
            "choose a writable folder"
        )


def _check_method_preset(cfg) -> None:
    """An unknown method or preset name is a one-line error before any model is built."""
    from promptalign.methods import list_methods
    from promptalign.registry import METHODS

    name, preset = cfg.method.name, cfg.method.preset
    if not name:
        return
    if name not in list_methods():
        raise UsageError(
            f"--method {name}: unknown method; choose from {', '.join(list_methods())}"
        )
    presets = sorted(METHODS.get(name).config_class.PRESETS)
    if preset is not None and preset not in presets:
        raise UsageError(
            f"--preset {preset}: method {name!r} has no such preset; "
            f"presets: {', '.join(presets) or 'none'}"
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# PyTorch's advice to load untrusted files unsafely must never be repeated to users
_UNSAFE_LOAD = re.compile(r"This file can still be loaded.*?(checkpoint\.|$)", re.IGNORECASE)
_UNSAFE_FLAG = re.compile(r"weights_only\s*=\s*False", re.IGNORECASE)
# the longest error line printed; what a message quotes beyond it is cut (and the work with it)
MAX_MESSAGE = 2000


def _one_line(message: str) -> str:
    """An error message as one line of at most :data:`MAX_MESSAGE` characters, without terminal
    escapes or unsafe-loading advice; linear in the length of ``message``."""
    text = message[: 4 * MAX_MESSAGE]
    text = _ANSI.sub("", text)
    if "still be loaded" in text.lower():
        text = _UNSAFE_LOAD.sub("", text)
    if _UNSAFE_FLAG.search(text):  # drop each sentence part that advises weights_only=False
        parts = re.split(r"([.;()])", text)  # pieces at even, delimiters at odd positions
        keep, i = [], 0
        while i < len(parts):
            if i % 2 == 0 and _UNSAFE_FLAG.search(parts[i]):
                i += 2 if i + 1 < len(parts) and parts[i + 1] in ".;" else 1
                continue
            keep.append(parts[i])
            i += 1
        text = "".join(keep)
    text = " ".join(text.split())
    text = text.replace("( ", "(").replace(" )", ")")
    if len(message) > MAX_MESSAGE or len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE].rstrip()}... (message cut at {MAX_MESSAGE} characters)"
    return text


def _os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    hint = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EACCES: "choose a writable folder",
        errno.EPERM: "choose a writable folder",
        errno.EROFS: "the file system is read-only; choose another --out",
        errno.EEXIST: "choose another path",
        errno.ENOTDIR: "a parent of the path is a file",
    }
    reason = e.strerror or str(e)
    extra = hint.get(e.errno or -1)
    return f"{where}{reason}" + (f"; {extra}" if extra else "")


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _cmd_list(args: argparse.Namespace) -> int:
    import promptalign
    from promptalign.data import list_datasets
    from promptalign.presets import list_presets

    listing = {
        "backbones": promptalign.list_backbones,
        "methods": promptalign.list_methods,
        "datasets": list_datasets,
        "presets": list_presets,
    }
    for name in listing[args.what]():
        print(name)
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from promptalign.selfcheck import run_selfcheck

    res = run_selfcheck(arch=args.arch, seed=args.seed)
    if args.json:
        print(json.dumps({**res.__dict__, "ok": res.ok}))
    else:
        print(f"promptalign self-check on {res.arch} (random weights, torch {res.torch_version})")
        for name, ok in res.checks.items():
            print(f"  [{'ok' if ok else 'FAILED'}] {name}")
        for name, d in res.max_abs_diff.items():
            print(f"  max |diff| {name}: {d:.3g}")
        print(f"  zero-shot logits shape {list(res.logits_shape)}; {res.seconds:.1f} s")
    return 0 if res.ok else 1


def _train_config(args: argparse.Namespace):
    from promptalign.config import RunConfig, apply_overrides, load_yaml
    from promptalign.presets import list_presets, load_preset

    if args.config:
        cfg = load_preset(args.config) if args.config in list_presets() else load_yaml(args.config)
    else:
        cfg = RunConfig()
    cfg = apply_overrides(cfg, _flag_overrides(args))
    return apply_overrides(cfg, args.overrides)


def _flag_overrides(args: argparse.Namespace) -> dict:
    """The config keys the train options set (only those given)."""
    flags = {
        "method.name": args.method,
        "method.preset": args.preset,
        "data.dataset": args.dataset,
        "data.root": args.data_root,
        "data.shots": args.shots,
        "data.subsample": args.subsample,
        "data.workers": args.workers,
        "data.split_file": args.split_file,
        "run.seed": args.seed,
        "run.device": args.device,
        "backbone.arch": args.arch,
        "backbone.weights": args.weights,
        "method.init_from": args.init_from,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if _ships_own_weights(args):
        overrides["backbone.weights"] = None
    if args.no_progress:
        overrides["run.progress"] = False
    return overrides


def _ships_own_weights(args: argparse.Namespace) -> bool:
    """``--arch tiny-shapes`` without ``--weights`` means the model's own shipped weights, not the
    config default ('openai', which only open_clip architectures have)."""
    from promptalign.backbone.loading import SHIPPED_PRETRAINED

    return args.arch in SHIPPED_PRETRAINED and args.weights is None


def _cmd_train(args: argparse.Namespace) -> int:
    from promptalign.config import ConfigError
    from promptalign.engine import train

    def note_step(record: dict) -> None:  # where a Ctrl-C interrupted it (see _train_interrupted)
        args.progress = (record["epoch"], record["step"])

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml; drop --config")
        _check_out(args.out)
        _check_resumable(args)
        given = [f"{k}={'null' if v is None else v}" for k, v in _flag_overrides(args).items()]
        res = train(
            None,
            args.out,
            resume=True,
            overrides=given + list(args.overrides),
            callbacks=[note_step],
        )
    else:
        cfg = _train_config(args)
        _check_method_preset(cfg)
        _check_device(cfg.run.device, "--device" if args.device else "run.device")
        _check_out(args.out, _dataset_dir(cfg))
        res = train(cfg, args.out, callbacks=[note_step])
    m = res.metrics
    split = "validation" if res.split == "val" else "test"
    print(
        f"run {res.run_dir}: {res.epochs} epochs, {res.steps} steps; "
        f"{split} accuracy {m['accuracy']:.2f}% "
        f"macro-F1 {m['macro_f1']:.2f}% on {m['n']} images"
    )
    return 0


def _check_resumable(args: argparse.Namespace) -> None:
    """``--resume`` on a folder whose run never started (no config.yaml) says so, with the
    command that starts it."""
    from promptalign.engine.checkpoint import CONFIG

    out = Path(args.out).expanduser()
    if not (out / CONFIG).is_file():
        start = [a for a in args.argv if a != "--resume"]
        needed = [
            f"{flag} {value}"
            for flag, value in (("--method", "METHOD"), ("--dataset", "DATA"))
            if flag not in start
        ]
        state = "does not exist" if not out.exists() else f"has no {CONFIG}"
        raise UsageError(
            f"--out {args.out} {state}: that run never started, so there is nothing to resume; "
            f"start it without --resume, with its method and data options: "
            + " ".join([shlex.join(["promptalign", *start]), *needed, "..."])
        )


def _train_interrupted(args: argparse.Namespace) -> str:
    """Where ``train`` stopped and how to go on (the Ctrl-C line)."""
    from promptalign.engine.checkpoint import CONFIG, RESUME_STATE

    out = Path(args.out).expanduser()
    where = ""
    if getattr(args, "progress", None) is not None:
        epoch, step = args.progress
        where = f" at epoch {epoch + 1} step {step}"
    if (out / RESUME_STATE).is_file() or (args.resume and (out / CONFIG).is_file()):
        return (
            f"{where}; resume with: "
            f"{shlex.join(['promptalign', 'train', '--resume', '--out', args.out])}"
        )
    return f"{where} before its first epoch was saved (nothing to resume); run the command again"


def _rerun_interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C line of a command that continues where it stopped when run again."""
    return f"; finished work is kept, re-run to go on: {shlex.join(['promptalign', *args.argv])}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from promptalign.engine import evaluate_run, harmonic_mean

    _check_device(args.device)
    kw = dict(
        dataset=args.dataset, root=args.data_root, device=args.device, overrides=args.overrides
    )
    if args.base_new:
        base = evaluate_run(args.run, subsample="base", **kw)
        new = evaluate_run(args.run, subsample="new", **kw)
        out = {
            "base": base["accuracy"],
            "new": new["accuracy"],
            "H": harmonic_mean(base["accuracy"], new["accuracy"]),
        }
        if args.json:
            print(json.dumps(out))
        else:
            _print_table(
                [[f"{out['base']:.2f}", f"{out['new']:.2f}", f"{out['H']:.2f}"]],
                ["base", "new", "H"],
            )
        return 0
    m = evaluate_run(args.run, subsample=args.subsample, **kw)
    if args.json:
        print(json.dumps(m))
    else:
        _print_table(
            [
                [
                    m["dataset"],
                    str(m["num_classes"]),
                    str(m["n"]),
                    f"{m['accuracy']:.2f}",
                    f"{m['macro_f1']:.2f}",
                    str(m["skipped"]),
                ]
            ],
            # the header names the subset evaluated: "all classes", "base classes", ...
            ["dataset", f"{m['subsample']} classes", "images", "accuracy", "macro-F1", "skipped"],
        )
        if m.get("diagnostics"):  # e.g. OT plan entropies, 1.0 = uniform plans
            print(
                "mean over images: "
                + ", ".join(f"{k} {v:.4f}" for k, v in m["diagnostics"].items())
            )
    return 0


def _image_paths(items: list[str]) -> list[str]:
    """Image files from files, folders (recursively) and .txt lists; an empty result is an error."""
    from promptalign.io import EncodingError, read_text

    paths: list[str] = []
    for p in items:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                str(f)
                for f in path.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise UsageError(
                    f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            paths += found
        elif path.suffix.lower() == ".txt" and path.is_file():
            try:
                text = read_text(path)
            except EncodingError as e:
                raise UsageError(str(e)) from None
            listed = [line.strip() for line in text.splitlines() if line.strip()]
            if not listed:
                raise UsageError(f"{p}: list file names no images")
            paths += listed
        else:
            paths.append(p)
    return paths


def _class_list(text: str | None, flag: str = "--classes") -> list[str] | None:
    """Comma-separated class names: None when not given; no name at all, or a repeated one, is
    an error naming ``flag``."""
    from promptalign.engine.inference import check_classnames

    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise UsageError(f"{flag} {text!r}: names no class; give comma-separated class names")
    return check_classnames(names, flag)


def _cmd_predict(args: argparse.Namespace) -> int:
    from promptalign.engine import predict

    _check_device(args.device)
    classes = _class_list(args.classes)
    paths = _image_paths(args.images)
    rows = predict(
        args.run,
        paths,
        classnames=classes,
        topk=args.topk,
        device=args.device,
        skip_unreadable=True,
        max_image_pixels=args.max_image_pixels,
    )
    errors = [r["image"] for r in rows if "error" in r]
    good = len(rows) - len(errors)
    if args.json:
        print(json.dumps(rows))
    else:
        k = max((len(r["top"]) for r in rows if "top" in r), default=args.topk)
        _print_table(
            [
                [
                    r["image"],
                    ", ".join(f"{t['label']} ({t['prob']:.2f})" for t in r["top"])
                    if "top" in r
                    else r["error"],
                ]
                for r in rows
            ],
            ["image", f"top-{k}"],
        )
    if errors:
        note = "error: no image could be read" if not good else "warning"
        print(
            _one_line(
                f"promptalign predict: {note}: {len(errors)} of {len(paths)} image(s) "
                f"unreadable, reported in their rows (first: {errors[0]})"
            ),
            file=sys.stderr,
        )
    return 0 if good else 2


# --------------------------------------------------------------------------- benchmark
PROTOCOL_HELP = {
    "base2new": "base-to-new generalisation (train on base classes, test on base and new)",
    "fewshot": "few-shot classification at several shot counts",
    "cross_dataset": "train on the source dataset (ImageNet), test on 10 others",
    "domain_generalisation": "train on ImageNet, test on its shifted versions",
}

# (flag, option of the slurm launcher, type, help): the --slurm-* flags, declared once
SLURM_FLAGS = (
    ("--slurm-partition", "partition", str, "partition to submit to"),
    ("--slurm-time", "time", str, "time limit per job: minutes, H:MM:SS or D-HH:MM:SS"),
    ("--slurm-gpus-per-job", "gpus_per_job", _int_at_least(0, "must be >= 0"), "GPUs per job"),
    ("--slurm-cpus-per-job", "cpus_per_job", _positive, "CPU cores per job"),
    ("--slurm-mem", "mem", str, "memory per job, e.g. 32G"),
    ("--slurm-array-parallelism", "array_parallelism", _positive, "jobs running at once"),
    ("--slurm-account", "account", str, "account to charge"),
    ("--slurm-qos", "qos", str, "quality of service"),
    ("--slurm-constraint", "constraint", str, "node features, e.g. a100"),
)


class _ListOption(argparse.Action):
    """A list option (``--seeds 1 2 3``) that leaves ``KEY=VALUE`` items after it to the
    overrides, so ``--seeds 1 optim.epochs=1`` means seed 1 and one override."""

    def __init__(self, *args, convert=str, **kwargs):
        self.convert = convert
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items, overrides = [], []
        for v in values:
            is_override = "=" in v and not Path(v).expanduser().exists()
            (overrides if is_override else items).append(v)
        if not items:
            parser.error(f"{option_string}: give at least one value before the KEY=VALUE overrides")
        converted = []
        for v in items:
            try:
                converted.append(self.convert(v))
            except (ValueError, argparse.ArgumentTypeError) as e:
                detail = str(e) if isinstance(e, argparse.ArgumentTypeError) else "not an integer"
                parser.error(f"{option_string} {v}: {detail}")
        setattr(namespace, self.dest, converted)
        namespace.list_overrides = [*(getattr(namespace, "list_overrides", None) or []), *overrides]


def _launcher(args: argparse.Namespace) -> tuple[str, dict, str]:
    """(launcher name, its settings, where they came from) from the flags and the YAML file."""
    from promptalign.benchmark import LauncherError
    from promptalign.benchmark.launchers import read_launcher_file

    name, settings, source = None, {}, ""
    if args.launcher_config:
        name, settings = read_launcher_file(args.launcher_config)
        source = f"--launcher-config {args.launcher_config}"
    name = args.launcher or name or ("local" if args.parallel is not None else "inline")
    if args.parallel is not None:
        if name != "local":
            raise LauncherError(f"--parallel is for --launcher local, not {name}")
        settings["parallel"] = args.parallel
    slurm = {opt: getattr(args, flag[2:].replace("-", "_")) for flag, opt, _, _ in SLURM_FLAGS}
    slurm = {k: v for k, v in slurm.items() if v is not None}
    if args.slurm_setup:
        slurm["setup"] = list(args.slurm_setup)
    if args.no_wait:
        slurm["wait"] = False
    if slurm:
        if name != "slurm":
            flag = "--no-wait" if "wait" in slurm else "--slurm-" + next(iter(slurm))
            raise LauncherError(f"{flag.replace('_', '-')} is for --launcher slurm, not {name}")
        settings.update(slurm)
    return name, settings, source


def benchmark_overrides(args: argparse.Namespace) -> list[str]:
    """The ``KEY=VALUE`` overrides of a parsed ``benchmark PROTOCOL`` command: its flags that set
    config keys first, then the settings of the ``--tuned`` studies, then the overrides as given
    (before or after the list options)."""
    from promptalign.tune import tuned_overrides

    tuned = [o for study in getattr(args, "tuned", None) or () for o in tuned_overrides(study)]
    overrides = [*tuned, *args.overrides, *args.list_overrides]
    for key, value in (
        ("backbone.arch", args.arch),
        ("backbone.weights", args.weights),
        ("run.device", args.device),
    ):
        if value is not None:
            overrides.insert(0, f"{key}={value}")
    if _ships_own_weights(args):
        overrides.insert(1, "backbone.weights=null")
    return overrides


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from promptalign.benchmark import StillRunning, default_datasets, get_launcher, run_benchmark

    _check_device(args.device)
    _check_out(args.out)
    overrides = benchmark_overrides(args)
    name, settings, source = _launcher(args)
    launcher = get_launcher(name, settings, source)
    try:
        s = run_benchmark(
            args.protocol,
            methods=args.methods,
            datasets=args.datasets or default_datasets(args.protocol),
            seeds=args.seeds,
            data_root=args.data_root,
            out=args.out,
            shots=args.shots,
            targets=args.targets,
            overrides=overrides,
            launcher=launcher,
            retries=args.retries,
            new_settings=args.new_settings,
        )
    except StillRunning as e:
        print(f"promptalign benchmark: {e}", file=sys.stderr)
        return 130
    for md in s.tables.values():
        print(md)
    print(
        f"{len(s.ran)} job(s) run, {len(s.skipped)} already finished, {len(s.failed)} failed"
        + (f", {len(s.busy)} running elsewhere" if s.busy else "")
        + (f", {len(s.submitted)} submitted" if s.submitted else "")
        + f"; tables in {s.out_dir}"
    )
    for key, err in s.failed.items():
        print(f"  FAILED {key}: {err} (details in its error.txt)")
    for key, holder in s.busy.items():
        print(f"  BUSY {key}: being run by {holder}; re-run this command once it ends")
    if s.submitted:
        ids = sorted({i.split("_")[0] for i in s.submitted.values()})
        print(
            f"  submitted as Slurm job array {', '.join(ids)}; follow with `promptalign benchmark "
            f"status {args.out}`, cancel with `promptalign benchmark cancel {args.out}`, and "
            "re-run this command (or status --tables) for the tables once they end"
        )
    return 1 if s.failed else 3 if s.busy else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from promptalign.benchmark import format_seconds, grid_status, write_grid_tables

    for st in grid_status(args.out):
        c = st.counts()
        eta = st.eta()
        left = (
            "done"
            if not c["running"] and not c["pending"]
            else f"about {format_seconds(eta)} left at {st.parallel} job(s) at once"
            if eta is not None
            else "time left unknown until a job finishes"
        )
        print(
            f"{st.folder} ({st.protocol}): {len(st.jobs)} jobs: {c['finished']} finished, "
            f"{c['running']} running, {c['failed']} failed, {c['pending']} pending; "
            f"elapsed {format_seconds(st.elapsed())}, {left}"
        )
        rows = [
            [
                g.method,
                g.dataset,
                str(g.counts["finished"]),
                str(g.counts["running"]),
                str(g.counts["failed"]),
                str(g.counts["pending"]),
                format_seconds(g.seconds),
                format_seconds(g.eta) if g.counts["running"] or g.counts["pending"] else "-",
            ]
            for g in st.groups()
        ]
        _print_table(
            rows, ["method", "dataset", "done", "running", "failed", "pending", "job time", "left"]
        )
        for j in st.jobs:
            if j.state == "running" and j.holder is not None:
                where = f", epoch {j.progress[1]}/{j.progress[2]}" if j.progress else ""
                stage = f" (stage {j.progress[0]})" if j.progress and j.progress[0] > 1 else ""
                print(f"  RUNNING {j.job.key}: {j.holder.describe()}{where}{stage}")
            elif j.state == "failed":
                print(f"  FAILED {j.job.key}: {j.error} (details in {j.folder / 'error.txt'})")
        print()
    if args.tables:
        for md in write_grid_tables(args.out).values():
            print(md)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from promptalign.benchmark import cancel_grid

    lines = cancel_grid(args.out)
    if not lines:
        print(f"nothing to cancel: no run of {args.out} is active")
    for line in lines:
        print(line)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from promptalign.demo import run_demo

    _check_out(args.out)
    t = time.perf_counter()
    res = run_demo(args.out, seed=args.seed, progress=not args.no_progress, workers=args.workers)
    print(res.table())
    print(
        f"\nwrote {res.out_dir}/results.md, results.json, results.png and one run folder "
        f"per method ({time.perf_counter() - t:.0f} s)"
    )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    import csv
    import io

    from promptalign import viz
    from promptalign.explain import ExplainError, embed_dataset, explain
    from promptalign.io import atomic_write_text

    out = Path(args.out) if args.out else Path(args.run) / "explain"
    try:
        if args.embeddings:
            emb = embed_dataset(
                args.run,
                dataset=args.dataset,
                root=args.data_root,
                subsample=args.subsample,
                max_images=args.max_images,
                projection=args.projection,
                device=args.device,
            )
            png = viz.draw_embeddings(emb, out / "embeddings.png", method=Path(args.run).name)
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(emb.csv_rows())
            atomic_write_text(out / "embeddings.csv", buf.getvalue())
            print(
                f"{emb.projection.upper()} of {emb.coords.shape[1]} images x "
                f"{emb.coords.shape[0]} visual prompt set(s): wrote {png} and "
                f"{out / 'embeddings.csv'}"
            )
            return 0
        if not args.images:
            raise ExplainError("no images given; pass image files, or --embeddings --dataset NAME")
        classes = _class_list(args.classes) or []
        if args.topk == 0 and not classes:
            raise UsageError(
                "--topk 0 explains no class without --classes; give --topk 1 or more, or "
                "--classes NAME,..."
            )
        res = explain(
            args.run,
            args.images,
            classes=classes,
            topk=args.topk,
            panels=args.panels,
            device=args.device,
        )
    except ExplainError as e:
        print(f"promptalign explain: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    opts = ", ".join(f"{k} {v}" for k, v in res.options.items())
    print(f"{res.method} ({res.scorer}{': ' + opts if opts else ''}); {res.panels} panels")
    data = res.to_json()
    stems: set[str] = set()
    for i, (im, d) in enumerate(zip(res.images, data["images"])):
        stem = Path(im.path).stem
        stem = stem if stem not in stems else f"{i:03d}-{stem}"
        stems.add(stem)
        png = viz.draw_image(im, out / f"{stem}.png", method=res.method)
        atomic_write_text(
            out / f"{stem}.json",
            json.dumps({**{k: v for k, v in data.items() if k != "images"}, "image": d}, indent=1),
        )
        print(f"{im.path}: top " + ", ".join(f"{n} ({p:.2f})" for n, p in im.top))
        for c in im.classes:
            line = f"  {c.name}: logit {c.logit:.2f}"
            if c.prompt_plan is not None:
                line += (
                    f" = global {c.logit_global.sum():.2f} + token {c.logit_token.sum():.2f}"
                    + (f" + other {c.logit_extra:.2f}" if c.logit_extra else "")
                )
                line += f"; prompt plan entropy {c.entropy['prompt']:.3f} of uniform"
                line += f" (floor {c.entropy['prompt_floor_ratio']:.3f})"
            if "token" in c.entropy:
                m, n = c.dominant_pairs(1)[0]
                cos = c.word_cosine[n][m]
                words = sorted(zip(c.tokens[n].words, cos), key=lambda t: -t[1])[:3]
                line += (
                    f"; token plans {c.entropy['token'].mean():.3f} of uniform; best-matched words "
                    f"(pair v{m}-t{n}, cosine) " + ", ".join(f"{w} {x:.2f}" for w, x in words)
                )
            print(line)
        print(f"  wrote {png} and {out / (stem + '.json')}")
    for level, value in res.summary().items():
        print(f"mean {level.replace('_', ' ')}: {value:.3f} (1.0 = uniform plan)")
    return 0


def _add_benchmark_parser(sub) -> None:
    """Add ``benchmark`` (its protocols, ``status`` and ``cancel``) to the subcommands ``sub``."""
    pb = sub.add_parser(
        "benchmark",
        help="run a whole protocol (base2new, fewshot, cross_dataset, domain_generalisation), "
        "follow it (status) or cancel it",
        description="Run every (dataset, method, shots, seed) job of a protocol in this process, "
        "in worker processes (--launcher local --parallel N) or on Slurm (--launcher slurm); "
        "finished jobs are skipped on re-runs, an interrupted one resumes. `benchmark status "
        "OUT` shows a grid's progress, `benchmark cancel OUT` cancels its jobs. Exit status: "
        "0 when every job has finished (or was submitted with --no-wait), 1 when some failed, "
        "3 when some are left to other processes that run them.",
    )
    psub = pb.add_subparsers(dest="protocol", metavar="PROTOCOL|status|cancel")
    for name, text in PROTOCOL_HELP.items():
        p = psub.add_parser(
            name,
            help=text,
            description=f"{text}. KEY=VALUE overrides apply to every job; METHOD:KEY=VALUE "
            "only to that method's jobs (before or after the options).",
        )
        _protocol_options(p)
        p.set_defaults(func=_cmd_benchmark, list_overrides=[], interrupted=_rerun_interrupted)
    ps = psub.add_parser(
        "status", help="progress of a grid: done, running, failed, pending, time left"
    )
    ps.add_argument("out", metavar="OUT", help="the --out of the benchmark command")
    ps.add_argument(
        "--tables",
        action="store_true",
        help="also write and print the tables from the jobs finished so far",
    )
    ps.set_defaults(func=_cmd_status)
    pc = psub.add_parser("cancel", help="cancel a grid's running and queued jobs")
    pc.add_argument("out", metavar="OUT", help="the --out of the benchmark command")
    pc.set_defaults(func=_cmd_cancel)


def _protocol_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", required=True, action=_ListOption)
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        action=_ListOption,
        help="datasets (source dataset for cross/DG: imagenet)",
    )
    p.add_argument("--seeds", nargs="+", default=[1, 2, 3], action=_ListOption, convert=int)
    p.add_argument(
        "--shots",
        nargs="+",
        default=[1, 2, 4, 8, 16],
        action=_ListOption,
        convert=int,
        help="few-shot protocol only",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        action=_ListOption,
        help="target datasets (cross-dataset / DG)",
    )
    p.add_argument("--data-root", default=".")
    p.add_argument("--out", default="benchmark")
    p.add_argument("--arch")
    p.add_argument("--weights")
    p.add_argument("--device")
    p.add_argument(
        "--tuned",
        action="append",
        metavar="STUDY",
        help="run the study's method with the settings `promptalign tune` chose in the study "
        "folder STUDY (repeat for studies of other methods); KEY=VALUE overrides still win",
    )
    _add_launcher_options(p.add_argument_group("where the jobs run (docs/cluster.md)"))
    p.add_argument("overrides", nargs="*", metavar="[METHOD:]KEY=VALUE")


def _add_launcher_options(g, what: str = "jobs") -> None:
    """The options that say where ``what`` run (benchmark jobs, a study's workers)."""
    g.add_argument(
        "--launcher",
        help=f"inline (default: one {what[:-1]} after another here), local (worker processes, "
        "one GPU each), slurm (a job array through submitit), or module:name of your own",
    )
    g.add_argument(
        "--launcher-config",
        metavar="FILE",
        help="YAML file with the launcher's options (and `launcher: NAME`); flags override it",
    )
    g.add_argument(
        "--parallel",
        type=_positive,
        help="local launcher: worker processes (default: one per visible GPU); implies "
        "--launcher local"
        + ("; with --launcher slurm: the array's tasks" if what == "workers" else ""),
    )
    g.add_argument(
        "--retries",
        type=_int_at_least(0, "must be >= 0"),
        default=0,
        help=f"times a failed {what[:-1]} is tried again before it counts as failed (default 0)",
    )
    if what == "jobs":
        g.add_argument(
            "--new-settings",
            action="store_true",
            help="run jobs the grid folder already holds with other settings (new folders; the "
            "old results are kept)",
        )
    for flag, _, kind, text in SLURM_FLAGS:
        g.add_argument(flag, type=kind, help=f"slurm launcher: {text}")
    g.add_argument(
        "--slurm-setup",
        action="append",
        metavar="LINE",
        help="slurm launcher: a shell line run before each job (repeat for more), e.g. "
        "'module load cuda' or 'source ~/venv/bin/activate'",
    )
    g.add_argument(
        "--no-wait",
        action="store_true",
        help=f"slurm launcher: submit and return instead of following the {what}",
    )


# --------------------------------------------------------------------------- tune
def _add_tune_parser(sub) -> None:
    """Add ``tune`` (choose hyper-parameters on the validation split) to the subcommands."""
    p = sub.add_parser(
        "tune",
        help="choose hyper-parameters on the validation split, then test the chosen setting once",
        description="Search config keys of one method on one dataset with Optuna, each trial "
        "an ordinary run scored on the few-shot validation split (the test split is never "
        "read), then re-train the best trial's setting once per seed and report its test "
        "accuracy once. KEY=LOW..HIGH[:log] and KEY=A,B,C are searched (any config key, "
        "method options included); any other KEY=VALUE is set for every run. The same command "
        "resumes an interrupted study. Exit status: 0 once the test score is reported (or the "
        "setting chosen, with --search-only), 1 when no trial or final run finished, 3 while "
        "trials run elsewhere. See docs/tuning.md.",
    )
    p.add_argument("--method", required=True, help="method name (promptalign list methods)")
    p.add_argument(
        "--dataset", required=True, help="dataset name or a folder / CSV path (with a val split)"
    )
    p.add_argument("--trials", required=True, type=_positive, help="the study's budget (>= 1)")
    p.add_argument("--out", required=True, help="the study folder (the same one resumes it)")
    p.add_argument("--shots", type=_positive, default=16, help="labelled images per class")
    p.add_argument(
        "--seeds",
        nargs="+",
        default=[1, 2, 3],
        action=_ListOption,
        convert=_seed,
        help="seeds of the final runs (default 1 2 3); the trials use the first",
    )
    p.add_argument("--data-root", default=".", help="folder holding the datasets")
    p.add_argument("--arch", help="backbone architecture (default ViT-B-16)")
    p.add_argument("--weights", help="open_clip pretrained tag or local weights file")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--space", metavar="FILE", help="a YAML search space (docs/tuning.md)")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    p.add_argument(
        "--pruner",
        choices=["median", "halving", "none"],
        default="median",
        help="stop trials whose validation score lags at the same epoch (default median)",
    )
    p.add_argument("--metric", choices=["accuracy", "macro_f1"], default="accuracy")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage, any SQLAlchemy URL (default: study.db in the study folder); "
        "a database server lets workers on several hosts share the study",
    )
    p.add_argument(
        "--search-only",
        action="store_true",
        help="stop once the setting is chosen: no final runs, the test split is not read",
    )
    g = p.add_argument_group("where the trials run (docs/cluster.md)")
    _add_launcher_options(g, "workers")
    p.add_argument("overrides", nargs="*", metavar="KEY=LOW..HIGH | KEY=A,B,C | KEY=VALUE")
    p.set_defaults(func=_cmd_tune, list_overrides=[], interrupted=_tune_interrupted)


def _tune_interrupted(args: argparse.Namespace) -> str:
    return "; the study resumes where it stopped: run the same command again"


def _cmd_tune(args: argparse.Namespace) -> int:
    from promptalign.benchmark import StillRunning, get_launcher
    from promptalign.benchmark.launchers import read_launcher_file
    from promptalign.tune import run_tune

    _check_device(args.device)
    flags = [("backbone.arch", args.arch), ("backbone.weights", args.weights)]
    flags.append(("run.device", args.device))
    items = [f"{k}={v}" for k, v in flags if v is not None]
    if _ships_own_weights(args):
        items.append("backbone.weights=null")
    items += [*args.overrides, *args.list_overrides]
    # --parallel: worker processes (local) or array tasks (slurm) sharing the study
    named = args.launcher or (
        read_launcher_file(args.launcher_config)[0] if args.launcher_config else None
    )
    workers = args.parallel
    if named == "slurm":
        args.parallel = None
    name, settings, source = _launcher(args)
    try:
        s = run_tune(
            args.method,
            args.dataset,
            out=args.out,
            trials=args.trials,
            space=items,
            space_file=args.space,
            shots=args.shots,
            seeds=args.seeds,
            data_root=args.data_root,
            sampler=args.sampler,
            pruner=args.pruner,
            metric=args.metric,
            storage=args.storage,
            launcher=get_launcher(name, settings, source),
            workers=workers,
            retries=args.retries,
            final=not args.search_only,
        )
    except StillRunning as e:
        print(f"promptalign tune: {e}", file=sys.stderr)
        return 130
    if s.submitted:
        ids = sorted({i.split("_")[0] for i in s.submitted.values()})
        print(
            f"{len(s.submitted)} worker(s) submitted as Slurm job array {', '.join(ids)}; run "
            "this command again once they end for the report"
        )
        return 0
    print(s.table)
    states = ", ".join(f"{n} {k}" for k, n in sorted(s.states.items()))
    print(f"{s.searched} of {s.budget} trials ended ({states or 'none yet'}); in {s.study_dir}")
    for note in s.notes:
        print(f"  {note}")
    for key, err in s.failed_workers.items():
        print(f"  FAILED {key}: {err}")
    if s.running_elsewhere:
        print(f"  {s.running_elsewhere} trial(s) run in other processes; run again once they end")
        return 3
    if s.chosen is None:
        print("  no trial finished: nothing to choose (see the errors in trials.md)")
        return 1
    print(
        f"chosen: trial {s.chosen['trial']}, validation {s.chosen['metric']} "
        f"{s.chosen['value']:.2f}: {' '.join(s.chosen['overrides'])} (chosen.yaml)"
    )
    if args.search_only:
        return 0
    if s.report:
        print(s.report.strip().splitlines()[-1])
    for seed, err in s.test_failed.items():
        print(f"  FAILED final run of seed {seed}: {err}")
    return 1 if s.test_failed or not s.test else 0


def build_parser() -> argparse.ArgumentParser:
    from promptalign import __version__

    p = _Parser(
        prog="promptalign",
        description="Prompt learning for frozen CLIP-style models (ALIGN, CoOp, MaPLe, ...).",
    )
    p.add_argument("--version", action="version", version=f"promptalign {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pl = sub.add_parser("list", help="list methods, datasets, presets or backbones")
    pl.add_argument("what", choices=["methods", "datasets", "presets", "backbones"])
    pl.set_defaults(func=_cmd_list)

    pt = sub.add_parser(
        "train",
        help="train a method (writes a run folder)",
        description="Train a method. Unset optimisation settings come from the "
        "method's published preset. Extra KEY=VALUE arguments override any "
        "config key, e.g. optim.lr=0.002 method.options.n_ctx=8.",
    )
    pt.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    pt.add_argument("--method", help="method name (promptalign list methods)")
    pt.add_argument(
        "--preset", help="named preset of the method's config (e.g. align's 'reference')"
    )
    pt.add_argument(
        "--config", help="a YAML run config, or a shipped preset name (promptalign list presets)"
    )
    pt.add_argument(
        "--dataset", help="dataset name (promptalign list datasets) or a folder / CSV path"
    )
    pt.add_argument("--data-root", help="folder holding the datasets (CoOp layout)")
    pt.add_argument("--shots", type=_positive, help="labelled images per class (>= 1)")
    pt.add_argument("--subsample", choices=["all", "base", "new"])
    pt.add_argument("--seed", type=_seed)
    pt.add_argument("--arch", help="backbone architecture (default ViT-B-16)")
    pt.add_argument("--weights", help="open_clip pretrained tag or local weights file")
    pt.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    pt.add_argument(
        "--workers", type=_workers, help="data-loading workers (>= 0; results do not depend on it)"
    )
    pt.add_argument(
        "--split-file",
        help="split JSON (train/val/test lists) for a custom ImageFolder / CSV "
        "dataset (= data.split_file)",
    )
    pt.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    pt.add_argument(
        "--init-from",
        metavar="RUN",
        help="start from the prompts of a finished run of the same method (PLOT++ stage 2)",
    )
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pt.set_defaults(func=_cmd_train, interrupted=_train_interrupted)

    pe = sub.add_parser(
        "eval", help="evaluate a run folder (its classes, other classes or datasets)"
    )
    pe.add_argument("run", help="run folder written by `promptalign train`")
    pe.add_argument(
        "--subsample",
        choices=["all", "base", "new"],
        help="class subset (default: the run's on its own dataset, all on another --dataset)",
    )
    pe.add_argument(
        "--base-new", action="store_true", help="evaluate base and new classes and their H"
    )
    pe.add_argument(
        "--dataset", help="evaluate on another dataset (cross-dataset, domain generalisation)"
    )
    pe.add_argument("--data-root")
    pe.add_argument("--device", default="auto")
    pe.add_argument("--json", action="store_true")
    pe.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="how unreadable images are handled: data.skip_corrupt=true (skip and count them), "
        "data.max_image_pixels=N",
    )
    pe.set_defaults(func=_cmd_eval)

    pp = sub.add_parser("predict", help="top-k labels for images with a trained run")
    pp.add_argument("run", help="run folder")
    pp.add_argument("images", nargs="+", help="image files, folders, or .txt lists of paths")
    pp.add_argument("--classes", help="comma-separated class names (default: the run's classes)")
    pp.add_argument("--topk", type=_positive, default=5, help="labels per image (>= 1, default 5)")
    pp.add_argument(
        "--max-image-pixels",
        type=_positive,
        help="largest image read, in pixels (default: the run's data.max_image_pixels)",
    )
    pp.add_argument("--device", default="auto")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=_cmd_predict)

    _add_benchmark_parser(sub)
    _add_tune_parser(sub)

    pd = sub.add_parser(
        "demo",
        help="zero-shot vs prompt learning on the built-in synthetic world (offline, ~2 min CPU)",
    )
    pd.add_argument(
        "--out", default="promptalign-demo", help="output folder (default: promptalign-demo)"
    )
    pd.add_argument("--seed", type=_seed, default=None)
    pd.add_argument(
        "--no-progress", action="store_true", help="no progress bar (results do not depend on it)"
    )
    pd.add_argument(
        "--workers",
        type=_workers,
        default=0,
        help="data-loading workers (default 0; results do not depend on it)",
    )
    pd.set_defaults(func=_cmd_demo)

    px = sub.add_parser(
        "explain",
        help="transport plans, patch heat maps and score decompositions of a run",
        description="Explain a run's scores for images: prompt-level plans, token-level "
        "plans as heat maps over the image per text token, word mass and the "
        "score decomposition (OT methods), or patch-cosine maps (other methods). "
        "Writes one PNG and one JSON per image. With --embeddings: a 2-D map "
        "(t-SNE with scikit-learn, else PCA) of a dataset's image embeddings "
        "per visual prompt set (PNG + CSV).",
    )
    px.add_argument("run", help="run folder written by `promptalign train`")
    px.add_argument("images", nargs="*", help="image files")
    px.add_argument("--classes", help="comma-separated class names to explain besides the top ones")
    px.add_argument(
        "--topk",
        type=_int_at_least(0, "must be >= 1 (0 only with --classes: just those classes)"),
        default=2,
        help="top classes explained per image (default 2; 0 with --classes: only those)",
    )
    px.add_argument(
        "--panels",
        choices=["auto", "ot", "cosine"],
        default="auto",
        help="ot: transport plans (OT methods only); cosine: patch cosine maps; "
        "auto: ot when available",
    )
    px.add_argument("--out", help="output folder (default: RUN/explain)")
    px.add_argument(
        "--embeddings", action="store_true", help="embedding map of a dataset instead of images"
    )
    px.add_argument("--dataset", help="dataset for --embeddings (default: the run's)")
    px.add_argument("--data-root", help="data root for --embeddings (default: the run's)")
    px.add_argument(
        "--subsample", choices=["all", "base", "new"], help="class subset for --embeddings"
    )
    px.add_argument(
        "--max-images",
        type=_positive,
        default=400,
        help="images for --embeddings (>= 1, default 400)",
    )
    px.add_argument("--projection", choices=["auto", "tsne", "pca"], default="auto")
    px.add_argument("--device", default="auto")
    px.set_defaults(func=_cmd_explain)

    ps = sub.add_parser(
        "selfcheck", help="offline check of the installation on a tiny random model"
    )
    ps.add_argument("--arch", default="pa-tiny-vit")
    ps.add_argument("--seed", type=_seed, default=0)
    ps.add_argument("--json", action="store_true", help="print one JSON line")
    ps.set_defaults(func=_cmd_selfcheck)
    return p


def _launched_rank() -> int:
    """This process's rank under torchrun (RANK in the environment), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _CtrlC:
    """Ctrl-C for every command: the first SIGINT raises KeyboardInterrupt, so the command
    unwinds (files closed, temporaries removed, a run folder left resumable) and :func:`main`
    prints one line and returns 130; a second SIGINT while it unwinds exits at once (130).

    Active only in the main thread, and only where SIGINT still has Python's default handler;
    the previous handler is restored on exit."""

    def __init__(self, line: Callable[[], str]):
        self.line = line  # the one line to print (the command's own hint included)
        self.count = 0
        self.previous = None

    def __enter__(self) -> _CtrlC:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt
        try:  # the second Ctrl-C: no more unwinding
            line = self.line()
        except Exception:  # noqa: BLE001 - the hint is best effort here
            line = "promptalign: interrupted"
        os.write(2, (line + "\n").encode(errors="replace"))
        os._exit(130)


def _interrupted_line(args: argparse.Namespace) -> str:
    """``promptalign CMD: interrupted`` and the command's own hint (``args.interrupted``)."""
    hint = getattr(args, "interrupted", None)
    tail = ""
    if hint is not None:
        try:
            tail = hint(args)
        except Exception:  # noqa: BLE001 - a hint that fails must not hide the interruption
            tail = ""
    name = f"promptalign {args.command}" if args.command else "promptalign"
    return _one_line(f"{name}: interrupted{tail}")


def main(argv: list[str] | None = None) -> int:
    state = argparse.Namespace(command=None)
    with _CtrlC(lambda: _interrupted_line(state)) as ctrl_c:
        try:
            return _main(argv, state)
        except KeyboardInterrupt:
            ctrl_c.count = max(ctrl_c.count, 1)  # a second Ctrl-C from now on exits at once
            if _launched_rank() == 0:  # under torchrun every rank gets it; one line is enough
                print(_interrupted_line(state), file=sys.stderr)
            return 130


def _main(argv: list[str] | None, state: argparse.Namespace) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    bad = next((a for a in argv if "\x00" in a), None)
    if bad is not None:  # a shell cannot pass one; a program calling main() can
        print(
            f"promptalign: error: argument {_one_line(repr(bad))} holds a NUL character",
            file=sys.stderr,
        )
        return 2
    try:  # a usage error (or --help) ends parsing with its exit code, returned like any other
        args, extra = parser.parse_known_args(argv)
        if extra:
            # argparse binds a trailing nargs="*" positional right after a leading positional
            # (benchmark PROTOCOL); KEY=VALUE overrides given after the options arrive here
            if getattr(args, "overrides", None) is None or not all("=" in e for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = list(args.overrides) + extra
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    state.__dict__.update(vars(args))
    args = state  # one namespace: what a command records (e.g. its progress) reaches the hint
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from promptalign.backbone import BackboneError
    from promptalign.backbone.towers import UnsupportedTower
    from promptalign.config import ConfigError
    from promptalign.data import DatasetError
    from promptalign.engine import CheckpointError, NonFiniteError
    from promptalign.io import EncodingError

    def fail(message: str) -> int:
        print(f"promptalign {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2

    try:
        if _launched_rank() > 0:  # under torchrun only rank 0 reports: one result, not one per rank
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return args.func(args)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `promptalign list backbones | head`: the reader left; stop quietly
        _silence_stdout()
        return 0
    except (
        UsageError,
        ConfigError,
        DatasetError,
        CheckpointError,
        NonFiniteError,
        BackboneError,
        UnsupportedTower,
        EncodingError,
    ) as e:
        return fail(str(e))
    except (FileExistsError, FileNotFoundError) as e:
        return fail(str(e) if not e.strerror else _os_error_line(e))
    except KeyError as e:
        return fail(str(e.args[0]) if e.args else repr(e))
    except OSError as e:  # read-only folder, disk full, ...
        return fail(_os_error_line(e))
    except Exception as e:  # noqa: BLE001 - a bug: one line by default, the traceback with -v
        if args.verbose:
            raise
        print(
            f"promptalign {args.command}: internal error: "
            f"{_one_line(f'{type(e).__name__}: {e}')}; this is a bug in promptalign, please "
            "report it with the command (run it again with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
