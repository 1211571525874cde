"""``promptalign list``, ``demo``, ``explain`` and ``selfcheck``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import UsageError, check_out, class_list, one_line
from .flags import add_flags, int_at_least, positive


# --------------------------------------------------------------------------- list
def add_list(sub) -> None:
    p = sub.add_parser("list", help="list methods, datasets, presets or backbones")
    p.add_argument("what", choices=["methods", "datasets", "presets", "backbones"])
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="zero-shot vs prompt learning on the built-in synthetic world (offline, ~2 min CPU)",
    )
    add_flags(
        p,
        ("--out", "--seed", "--no-progress", "--workers"),
        out={"default": "promptalign-demo", "help": "output folder (default: promptalign-demo)"},
        no_progress={"help": "no progress bar (results do not depend on it)"},
        workers={
            "default": 0,
            "help": "data-loading workers (default 0; results do not depend on it)",
        },
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from promptalign.demo import run_demo

    check_out(args.out)
    t = time.perf_counter()
    res = run_demo(args.out, seed=args.seed, progress=not args.no_progress, workers=args.workers)
    print(res.table())
    print(
        f"\nwrote {res.out_dir}/results.md, results.json, results.png and one run folder "
        f"per method ({time.perf_counter() - t:.0f} s)"
    )
    return 0


# --------------------------------------------------------------------------- explain
def add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="transport plans, patch heat maps and score decompositions of a run",
        description="Explain a run's scores for images: prompt-level plans, token-level "
        "plans as heat maps over the image per text token, word mass and the "
        "score decomposition (OT methods), or patch-cosine maps (other methods). "
        "Writes one PNG and one JSON per image. With --embeddings: a 2-D map "
        "(t-SNE with scikit-learn, else PCA) of a dataset's image embeddings "
        "per visual prompt set (PNG + CSV).",
    )
    p.add_argument("run", help="run folder written by `promptalign train`")
    p.add_argument("images", nargs="*", help="image files")
    add_flags(
        p,
        ("--classes", "--topk"),
        classes={"help": "comma-separated class names to explain besides the top ones"},
        topk={
            "type": int_at_least(0, "must be >= 1 (0 only with --classes: just those classes)"),
            "default": 2,
            "help": "top classes explained per image (default 2; 0 with --classes: only those)",
        },
    )
    p.add_argument(
        "--panels",
        choices=["auto", "ot", "cosine"],
        default="auto",
        help="ot: transport plans (OT methods only); cosine: patch cosine maps; "
        "auto: ot when available",
    )
    p.add_argument(
        "--modes",
        action="store_true",
        help="one patch map per visual prompt set side by side and the prompt plan, captioned "
        "with the plan's entropy (methods with several prompt sets: ALIGN, PLOT)",
    )
    add_flags(p, ("--out",), out={"help": "output folder (default: RUN/explain)"})
    p.add_argument(
        "--embeddings", action="store_true", help="embedding map of a dataset instead of images"
    )
    add_flags(
        p,
        ("--dataset", "--data-root", "--subsample"),
        dataset={"help": "dataset for --embeddings (default: the run's)"},
        data_root={"help": "data root for --embeddings (default: the run's)"},
        subsample={"help": "class subset for --embeddings"},
    )
    p.add_argument(
        "--max-images",
        type=positive,
        default=400,
        help="images for --embeddings (>= 1, default 400)",
    )
    p.add_argument("--projection", choices=["auto", "tsne", "pca"], default="auto")
    add_flags(p, ("--device",), device={"default": "auto"})
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
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
            atomic_write_text(out / "embeddings.csv", emb.csv_text())
            print(f"{emb.describe()}: wrote {png} and {out / 'embeddings.csv'}")
            return 0
        if not args.images:
            raise ExplainError("no images given; pass image files, or --embeddings --dataset NAME")
        classes = class_list(args.classes) or []
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
            modes=args.modes,
            device=args.device,
        )
    except ExplainError as e:
        print(f"promptalign explain: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(res.header())
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
        print("\n".join(im.lines(modes=args.modes)))
        print(f"  wrote {png} and {out / (stem + '.json')}")
    for line in res.summary_lines():
        print(line)
    return 0


# --------------------------------------------------------------------------- selfcheck
def add_selfcheck(sub) -> None:
    p = sub.add_parser("selfcheck", help="offline check of the installation on a tiny random model")
    add_flags(
        p,
        ("--arch", "--seed", "--json"),
        arch={"default": "pa-tiny-vit", "help": "architecture of the random model"},
        seed={"default": 0},
        json={"help": "print one JSON line"},
    )
    p.set_defaults(func=cmd_selfcheck)


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from promptalign.selfcheck import run_selfcheck

    res = run_selfcheck(arch=args.arch, seed=args.seed)
    if args.json:
        print(json.dumps({**res.__dict__, "ok": res.ok}))
        return 0 if res.ok else 1
    print(f"promptalign self-check on {res.arch} (random weights, torch {res.torch_version})")
    for name, ok in res.checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    for name, d in res.max_abs_diff.items():
        print(f"  max |diff| {name}: {d:.3g}")
    print(f"  zero-shot logits shape {list(res.logits_shape)}; {res.seconds:.1f} s")
    return 0 if res.ok else 1
