"""The `promptalign` command line: turns arguments into a config and calls library functions."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class UsageError(Exception):
    """A bad command-line input found before any work starts: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``promptalign CMD: error: MESSAGE (see ... --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- input checks
def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: {what}")
        return value

    return parse


_positive = _int_at_least(1, "must be >= 1")
_workers = _int_at_least(0, "must be >= 0 (0 loads images in the main process)")


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
_UNSAFE_ADVICE = re.compile(
    r"This file can still be loaded.*?(checkpoint\.|$)"
    r"|[^.;()]*weights_only\s*=\s*False[^.;()]*[.;]?",
    re.IGNORECASE,
)


def _one_line(message: str) -> str:
    """An error message as one line, without terminal escapes or unsafe-loading advice."""
    text = _UNSAFE_ADVICE.sub("", _ANSI.sub("", message))
    text = re.sub(r"\s*\n\s*", " ", text)
    text = re.sub(r"\(\s*([^()]*?)\s*\)", lambda m: f"({m.group(1)})", text)
    return re.sub(r"\s{2,}", " ", text).strip()


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

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml; drop --config")
        _check_out(args.out)
        given = [f"{k}={'null' if v is None else v}" for k, v in _flag_overrides(args).items()]
        res = train(None, args.out, resume=True, overrides=given + list(args.overrides))
    else:
        cfg = _train_config(args)
        _check_method_preset(cfg)
        _check_device(cfg.run.device, "--device" if args.device else "run.device")
        _check_out(args.out, _dataset_dir(cfg))
        res = train(cfg, args.out)
    m = res.metrics
    print(
        f"run {res.run_dir}: {res.epochs} epochs, {res.steps} steps; "
        f"test accuracy {m['accuracy']:.2f}% "
        f"macro-F1 {m['macro_f1']:.2f}% on {m['n']} images"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from promptalign.engine import evaluate_run, harmonic_mean

    _check_device(args.device)
    kw = dict(dataset=args.dataset, root=args.data_root, device=args.device)
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
                    m["subsample"],
                    str(m["num_classes"]),
                    str(m["n"]),
                    f"{m['accuracy']:.2f}",
                    f"{m['macro_f1']:.2f}",
                    str(m["skipped"]),
                ]
            ],
            ["dataset", "classes", "#classes", "images", "accuracy", "macro-F1", "skipped"],
        )
        if m.get("diagnostics"):  # e.g. OT plan entropies, 1.0 = uniform plans
            print(
                "mean over images: "
                + ", ".join(f"{k} {v:.4f}" for k, v in m["diagnostics"].items())
            )
    return 0


def _image_paths(items: list[str]) -> list[str]:
    """Image files from files, folders (recursively) and .txt lists; an empty result is an error."""
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
            listed = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not listed:
                raise UsageError(f"{p}: list file names no images")
            paths += listed
        else:
            paths.append(p)
    return paths


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as an image (None if it can)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except (OSError, ValueError) as e:
        return _one_line(str(e)) or type(e).__name__
    return None


def _cmd_predict(args: argparse.Namespace) -> int:
    from promptalign.engine import predict

    _check_device(args.device)
    paths = _image_paths(args.images)
    errors = {p: why for p in paths if (why := _unreadable(p)) is not None}
    good = [p for p in paths if p not in errors]
    classes = None
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    res = (
        predict(args.run, good, classnames=classes, topk=args.topk, device=args.device)
        if good
        else []
    )
    by_path = {r["image"]: r for r in res}
    rows = [
        by_path.get(str(p)) or {"image": str(p), "error": f"unreadable image: {errors[p]}"}
        for p in paths
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        k = max((len(r["top"]) for r in res), default=args.topk)
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
            f"promptalign predict: {note}: {len(errors)} of {len(paths)} image(s) unreadable, "
            f"reported in their rows (first: {next(iter(errors))})",
            file=sys.stderr,
        )
    return 0 if good else 2


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from promptalign.benchmark import run_benchmark

    _check_device(args.device)
    _check_out(args.out)
    overrides = list(args.overrides)
    for key, value in (
        ("backbone.arch", args.arch),
        ("backbone.weights", args.weights),
        ("run.device", args.device),
    ):
        if value is not None:
            overrides.insert(0, f"{key}={value}")
    if _ships_own_weights(args):
        overrides.insert(1, "backbone.weights=null")
    from promptalign.benchmark import default_datasets

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
    )
    for md in s.tables.values():
        print(md)
    print(
        f"{len(s.ran)} job(s) run, {len(s.skipped)} already finished, {len(s.failed)} failed"
        + (f", {len(s.busy)} running elsewhere" if s.busy else "")
        + f"; tables in {s.out_dir}"
    )
    for key, err in s.failed.items():
        print(f"  FAILED {key}: {err} (details in its error.txt)")
    for key, holder in s.busy.items():
        print(f"  BUSY {key}: being run by {holder}; re-run this command once it ends")
    return 1 if s.failed else 0


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
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else []
        res = explain(
            args.run,
            args.images,
            classes=classes,
            topk=args.topk,
            panels=args.panels,
            modes=args.modes,
            device=args.device,
        )
    except ExplainError as e:
        print(f"promptalign explain: error: {e}", file=sys.stderr)
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
        if args.modes:  # one map per visual prompt set and the prompt plan
            stem += "-modes"
            png = viz.draw_modes(im, out / f"{stem}.png", method=res.method)
        else:
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
            print(line + (f"\n    modes: {viz.modes_caption(im, c)}" if args.modes else ""))
        print(f"  wrote {png} and {out / (stem + '.json')}")
    for level, value in res.summary().items():
        print(f"mean {level.replace('_', ' ')}: {value:.3f} (1.0 = uniform plan)")
    return 0


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
    pt.add_argument("--seed", type=int)
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
    pt.set_defaults(func=_cmd_train)

    pe = sub.add_parser(
        "eval", help="evaluate a run folder (its classes, other classes or datasets)"
    )
    pe.add_argument("run", help="run folder written by `promptalign train`")
    pe.add_argument(
        "--subsample", choices=["all", "base", "new"], help="class subset (default: the run's)"
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
    pe.set_defaults(func=_cmd_eval)

    pp = sub.add_parser("predict", help="top-k labels for images with a trained run")
    pp.add_argument("run", help="run folder")
    pp.add_argument("images", nargs="+", help="image files, folders, or .txt lists of paths")
    pp.add_argument("--classes", help="comma-separated class names (default: the run's classes)")
    pp.add_argument("--topk", type=_positive, default=5, help="labels per image (>= 1, default 5)")
    pp.add_argument("--device", default="auto")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=_cmd_predict)

    pb = sub.add_parser(
        "benchmark",
        help="run a whole protocol (base2new, fewshot, cross_dataset, domain_generalisation)",
        description="Run every (dataset, method, shots, seed) job of a protocol; finished jobs "
        "are skipped on re-runs, an interrupted one resumes. KEY=VALUE overrides apply "
        "to every job; METHOD:KEY=VALUE only to that method's jobs.",
    )
    pb.add_argument(
        "protocol", choices=["base2new", "fewshot", "cross_dataset", "domain_generalisation"]
    )
    pb.add_argument("--methods", nargs="+", required=True)
    pb.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="datasets (source dataset for cross/DG: imagenet)",
    )
    pb.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    pb.add_argument(
        "--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="few-shot protocol only"
    )
    pb.add_argument(
        "--targets", nargs="+", default=None, help="target datasets (cross-dataset / DG)"
    )
    pb.add_argument("--data-root", default=".")
    pb.add_argument("--out", default="benchmark")
    pb.add_argument("--arch")
    pb.add_argument("--weights")
    pb.add_argument("--device")
    pb.add_argument("overrides", nargs="*", metavar="[METHOD:]KEY=VALUE")
    pb.set_defaults(func=_cmd_benchmark)

    pd = sub.add_parser(
        "demo",
        help="zero-shot vs prompt learning on the built-in synthetic world (offline, ~2 min CPU)",
    )
    pd.add_argument(
        "--out", default="promptalign-demo", help="output folder (default: promptalign-demo)"
    )
    pd.add_argument("--seed", type=int, default=None)
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
        "--topk", type=int, default=2, help="top classes explained per image (default 2)"
    )
    px.add_argument(
        "--panels",
        choices=["auto", "ot", "cosine"],
        default="auto",
        help="ot: transport plans (OT methods only); cosine: patch cosine maps; "
        "auto: ot when available",
    )
    px.add_argument(
        "--modes",
        action="store_true",
        help="one patch map per visual prompt set side by side and the prompt plan, captioned "
        "with the plan's entropy (methods with several prompt sets: ALIGN, PLOT)",
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
        "--max-images", type=int, default=400, help="images for --embeddings (default 400)"
    )
    px.add_argument("--projection", choices=["auto", "tsne", "pca"], default="auto")
    px.add_argument("--device", default="auto")
    px.set_defaults(func=_cmd_explain)

    ps = sub.add_parser(
        "selfcheck", help="offline check of the installation on a tiny random model"
    )
    ps.add_argument("--arch", default="pa-tiny-vit")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--json", action="store_true", help="print one JSON line")
    ps.set_defaults(func=_cmd_selfcheck)
    return p


def _launched_rank() -> int:
    """This process's rank under torchrun (RANK in the environment), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from promptalign.backbone import WeightsError
    from promptalign.config import ConfigError
    from promptalign.data import DatasetError
    from promptalign.engine import CheckpointError, NonFiniteError

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
        WeightsError,
    ) as e:
        return fail(str(e))
    except (FileExistsError, FileNotFoundError) as e:
        return fail(str(e) if not e.strerror else _os_error_line(e))
    except KeyError as e:
        return fail(str(e.args[0]) if e.args else repr(e))
    except OSError as e:  # read-only folder, disk full, ...
        return fail(_os_error_line(e))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
