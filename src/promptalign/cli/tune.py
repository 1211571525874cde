"""``promptalign tune``: choose hyper-parameters on the validation split, then test once."""

from __future__ import annotations

import argparse
import sys

from .bench import ListOption, add_launcher_options, launcher_from_args
from .common import check_device
from .flags import add_flags, config_overrides, positive, seed

# the run-config flags of `tune` (before the KEY=VALUE items, which win)
CONFIG_FLAGS = ("--arch", "--weights", "--device")


def add_tune(sub) -> None:
    """Add ``tune`` to the subcommands ``sub``."""
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
    add_flags(
        p,
        ("--method", "--dataset"),
        method={"required": True},
        dataset={
            "required": True,
            "help": "dataset name or a folder / CSV path (with a validation split)",
        },
    )
    p.add_argument("--trials", required=True, type=positive, help="the study's budget (>= 1)")
    add_flags(
        p,
        ("--out", "--shots", "--data-root", *CONFIG_FLAGS),
        out={"required": True, "help": "the study folder (the same one resumes it)"},
        shots={"default": 16, "help": "labelled images per class (default 16)"},
        data_root={"default": "."},
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        default=[1, 2, 3],
        action=ListOption,
        convert=seed,
        help="seeds of the final runs (default 1 2 3); the trials use the first",
    )
    p.add_argument("--space", metavar="FILE", help="a YAML search space (docs/tuning.md)")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    p.add_argument(
        "--pruner",
        choices=["median", "halving", "none"],
        default="median",
        help="stop trials whose validation score lags behind earlier trials at the same point of "
        "their schedules, never in its first quarter (default median)",
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
    add_launcher_options(p.add_argument_group("where the trials run (docs/cluster.md)"), "workers")
    p.add_argument("overrides", nargs="*", metavar="KEY=LOW..HIGH | KEY=A,B,C | KEY=VALUE")
    p.set_defaults(func=cmd_tune, list_overrides=[], interrupted=_interrupted)


def _interrupted(args: argparse.Namespace) -> str:
    return "; the study resumes where it stopped: run the same command again"


def _quiet_optuna(verbose: bool) -> None:
    """Optuna logs every trial at INFO on its own handler; the command prints the table instead
    (``-v`` keeps Optuna's lines)."""
    try:
        import optuna
    except ImportError:  # run_tune says how to install it
        return
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def cmd_tune(args: argparse.Namespace) -> int:
    from promptalign.benchmark import StillRunning, get_launcher
    from promptalign.benchmark.launchers import read_launcher_file
    from promptalign.tune import run_tune

    check_device(args.device)
    _quiet_optuna(args.verbose)
    flags = config_overrides(args, CONFIG_FLAGS)
    items = [f"{k}={'null' if v is None else v}" for k, v in flags.items()]
    items += [*args.overrides, *args.list_overrides]
    # --parallel: worker processes (local) or the array's tasks (slurm) sharing the study
    named = args.launcher or (
        read_launcher_file(args.launcher_config)[0] if args.launcher_config else None
    )
    workers = args.parallel
    if named == "slurm":
        args.parallel = None
    name, settings, source = launcher_from_args(args)
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
    for seed_, err in s.test_failed.items():
        print(f"  FAILED final run of seed {seed_}: {err}")
    return 1 if s.test_failed or not s.test else 0
