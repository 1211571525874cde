"""The `promptalign` command line: turns arguments into library calls and prints results."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    import promptalign

    from promptalign.data import list_datasets

    listing = {"backbones": promptalign.list_backbones, "methods": promptalign.list_methods,
               "datasets": list_datasets}
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


def build_parser() -> argparse.ArgumentParser:
    from promptalign import __version__

    p = argparse.ArgumentParser(
        prog="promptalign",
        description="Prompt learning for frozen CLIP-style models (ALIGN, CoOp, MaPLe, ...).",
    )
    p.add_argument("--version", action="version", version=f"promptalign {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pl = sub.add_parser("list", help="list registered things")
    pl.add_argument("what", choices=["backbones", "methods", "datasets"], help="what to list")
    pl.set_defaults(func=_cmd_list)

    ps = sub.add_parser(
        "selfcheck",
        help="offline check of the installation on a tiny random model (invariants, not accuracy)",
    )
    ps.add_argument("--arch", default="pa-tiny-vit", help="architecture to check (default: pa-tiny-vit)")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--json", action="store_true", help="print one JSON line")
    ps.set_defaults(func=_cmd_selfcheck)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
