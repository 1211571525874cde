"""``promptalign train``, ``eval`` and ``predict``: a run folder made, evaluated, used."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .common import UsageError, check_device, check_out, class_list, one_line, print_table
from .flags import FLAGS, add_flags, config_overrides, positive

# the run-config flags of `train`, in the order they are applied (backbone.arch before weights)
TRAIN_FLAGS = (
    "--method",
    "--preset",
    "--dataset",
    "--data-root",
    "--shots",
    "--subsample",
    "--seed",
    "--arch",
    "--weights",
    "--device",
    "--workers",
    "--split-file",
    "--init-from",
    "--no-progress",
)


# --------------------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a method (writes a run folder)",
        description="Train a method. Unset optimisation settings come from the "
        "method's published preset. Extra KEY=VALUE arguments override any "
        "config key, e.g. optim.lr=0.002 method.options.n_ctx=8.",
    )
    FLAGS["--out"].add(p, required=True, help="run folder to create (or continue with --resume)")
    p.add_argument(
        "--config", help="a YAML run config, or a shipped preset name (promptalign list presets)"
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    add_flags(p, TRAIN_FLAGS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_train, interrupted=_train_interrupted)


def train_config(args: argparse.Namespace):
    """The run config of a parsed ``train`` command: ``--config`` (a file or a shipped preset),
    then the flags' keys, then the ``KEY=VALUE`` overrides."""
    from promptalign.config import RunConfig, apply_overrides, load_yaml
    from promptalign.presets import list_presets, load_preset

    if args.config:
        cfg = load_preset(args.config) if args.config in list_presets() else load_yaml(args.config)
    else:
        cfg = RunConfig()
    cfg = apply_overrides(cfg, config_overrides(args, TRAIN_FLAGS))
    return apply_overrides(cfg, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from promptalign.config import ConfigError
    from promptalign.engine import train

    def note_step(record: dict) -> None:  # where a Ctrl-C interrupted it (see _train_interrupted)
        args.progress = (record["epoch"], record["step"])

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml; drop --config")
        check_out(args.out)
        _check_resumable(args)
        flags = config_overrides(args, TRAIN_FLAGS)
        given = [f"{k}={'null' if v is None else v}" for k, v in flags.items()]
        res = train(
            None,
            args.out,
            resume=True,
            overrides=given + list(args.overrides),
            callbacks=[note_step],
        )
    else:
        cfg = train_config(args)
        _check_method_preset(cfg)
        check_device(cfg.run.device, "--device" if args.device else "run.device")
        check_out(args.out, _dataset_dir(cfg))
        res = train(cfg, args.out, callbacks=[note_step])
    m = res.metrics
    split = "validation" if res.split == "val" else "test"
    print(
        f"run {res.run_dir}: {res.epochs} epochs, {res.steps} steps; "
        f"{split} accuracy {m['accuracy']:.2f}% "
        f"macro-F1 {m['macro_f1']:.2f}% on {m['n']} images"
    )
    return 0


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


# --------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a run folder (its classes, other classes or datasets)"
    )
    p.add_argument("run", help="run folder written by `promptalign train`")
    add_flags(
        p,
        ("--subsample", "--dataset", "--data-root", "--device", "--json"),
        subsample={
            "help": "class subset (default: the run's on its own dataset, all on another --dataset)"
        },
        dataset={"help": "evaluate on another dataset (cross-dataset, domain generalisation)"},
        data_root={"help": "data root of --dataset (default: the run's)"},
        device={"default": "auto"},
    )
    p.add_argument(
        "--base-new", action="store_true", help="evaluate base and new classes and their H"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="how unreadable images are handled: data.skip_corrupt=true (skip and count them), "
        "data.max_image_pixels=N",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from promptalign.engine import evaluate_run, harmonic_mean

    check_device(args.device)
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
            row = [f"{out['base']:.2f}", f"{out['new']:.2f}", f"{out['H']:.2f}"]
            print_table([row], ["base", "new", "H"])
        return 0
    m = evaluate_run(args.run, subsample=args.subsample, **kw)
    if args.json:
        print(json.dumps(m))
        return 0
    row = [m["dataset"], str(m["num_classes"]), str(m["n"]), f"{m['accuracy']:.2f}"]
    print_table(
        [[*row, f"{m['macro_f1']:.2f}", str(m["skipped"])]],
        # the header names the subset evaluated: "all classes", "base classes", ...
        ["dataset", f"{m['subsample']} classes", "images", "accuracy", "macro-F1", "skipped"],
    )
    if m.get("diagnostics"):  # e.g. OT plan entropies, 1.0 = uniform plans
        print("mean over images: " + ", ".join(f"{k} {v:.4f}" for k, v in m["diagnostics"].items()))
    return 0


# --------------------------------------------------------------------------- predict
def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels for images with a trained run")
    p.add_argument("run", help="run folder")
    p.add_argument("images", nargs="+", help="image files, folders, or .txt lists of paths")
    add_flags(
        p,
        ("--classes", "--topk"),
        topk={"default": 5, "help": "labels per image (>= 1, default 5)"},
    )
    p.add_argument(
        "--max-image-pixels",
        type=positive,
        help="largest image read, in pixels (default: the run's data.max_image_pixels)",
    )
    add_flags(p, ("--device", "--json"), device={"default": "auto"})
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from promptalign.engine import predict

    check_device(args.device)
    classes = class_list(args.classes)
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

        def labels(r: dict) -> str:
            return ", ".join(f"{t['label']} ({t['prob']:.2f})" for t in r["top"])

        table = [[r["image"], labels(r) if "top" in r else r["error"]] for r in rows]
        print_table(table, ["image", f"top-{k}"])
    if errors:
        note = "error: no image could be read" if not good else "warning"
        print(
            one_line(
                f"promptalign predict: {note}: {len(errors)} of {len(paths)} image(s) "
                f"unreadable, reported in their rows (first: {errors[0]})"
            ),
            file=sys.stderr,
        )
    return 0 if good else 2


def _image_paths(items: list[str]) -> list[str]:
    """Image files from files, folders (recursively) and .txt lists; an empty result is an error."""
    from promptalign.data.base import IMAGE_SUFFIXES
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
