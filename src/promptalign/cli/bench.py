"""``promptalign benchmark PROTOCOL``, ``benchmark status`` and ``benchmark cancel``: grids of
trainings, run here, in worker processes or on Slurm."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import check_device, check_out, print_table, rerun_interrupted
from .flags import add_flags, config_overrides, int_at_least, positive

PROTOCOL_HELP = {
    "base2new": "base-to-new generalisation (train on base classes, test on base and new)",
    "fewshot": "few-shot classification at several shot counts",
    "cross_dataset": "train on the source dataset (ImageNet), test on 10 others",
    "domain_generalisation": "train on ImageNet, test on its shifted versions",
}
# the run-config flags of `benchmark PROTOCOL` (before the KEY=VALUE overrides, which win)
CONFIG_FLAGS = ("--arch", "--weights", "--device")

# (flag, option of the slurm launcher, type, help): the --slurm-* flags, declared once
SLURM_FLAGS = (
    ("--slurm-partition", "partition", str, "partition to submit to"),
    ("--slurm-time", "time", str, "time limit per job: minutes, H:MM:SS or D-HH:MM:SS"),
    ("--slurm-gpus-per-job", "gpus_per_job", int_at_least(0, "must be >= 0"), "GPUs per job"),
    ("--slurm-cpus-per-job", "cpus_per_job", positive, "CPU cores per job"),
    ("--slurm-mem", "mem", str, "memory per job, e.g. 32G"),
    ("--slurm-array-parallelism", "array_parallelism", positive, "jobs running at once"),
    ("--slurm-account", "account", str, "account to charge"),
    ("--slurm-qos", "qos", str, "quality of service"),
    ("--slurm-constraint", "constraint", str, "node features, e.g. a100"),
)


class ListOption(argparse.Action):
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


def add_benchmark(sub) -> None:
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
        p.set_defaults(func=cmd_benchmark, list_overrides=[], interrupted=rerun_interrupted)
    ps = psub.add_parser(
        "status", help="progress of a grid: done, running, failed, pending, time left"
    )
    ps.add_argument("out", metavar="OUT", help="the --out of the benchmark command")
    ps.add_argument(
        "--tables",
        action="store_true",
        help="also write and print the tables from the jobs finished so far",
    )
    ps.set_defaults(func=cmd_status)
    pc = psub.add_parser("cancel", help="cancel a grid's running and queued jobs")
    pc.add_argument("out", metavar="OUT", help="the --out of the benchmark command")
    pc.set_defaults(func=cmd_cancel)


def _protocol_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", required=True, action=ListOption)
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        action=ListOption,
        help="datasets (source dataset for cross/DG: imagenet)",
    )
    p.add_argument("--seeds", nargs="+", default=[1, 2, 3], action=ListOption, convert=int)
    p.add_argument(
        "--shots",
        nargs="+",
        default=[1, 2, 4, 8, 16],
        action=ListOption,
        convert=int,
        help="few-shot protocol only",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        default=None,
        action=ListOption,
        help="target datasets (cross-dataset / DG)",
    )
    add_flags(
        p,
        ("--data-root", "--out", *CONFIG_FLAGS),
        data_root={"default": "."},
        out={"default": "benchmark", "help": "grid folder (default: benchmark)"},
    )
    p.add_argument(
        "--tuned",
        action="append",
        metavar="STUDY",
        help="run the study's method with the settings `promptalign tune` chose in the study "
        "folder STUDY (repeat for studies of other methods); KEY=VALUE overrides still win",
    )
    add_launcher_options(p.add_argument_group("where the jobs run (docs/cluster.md)"))
    p.add_argument("overrides", nargs="*", metavar="[METHOD:]KEY=VALUE")


def add_launcher_options(g, what: str = "jobs") -> None:
    """The options that say where ``what`` run (benchmark jobs, a study's workers)."""
    one = what[:-1]
    g.add_argument(
        "--launcher",
        help=f"inline (default: one {one} after another here), local (worker processes, one "
        "GPU each), slurm (a job array through submitit), or module:name of your own",
    )
    g.add_argument(
        "--launcher-config",
        metavar="FILE",
        help="YAML file with the launcher's options (and `launcher: NAME`); flags override it",
    )
    slurm_tasks = "; with --launcher slurm: the array's tasks" if what == "workers" else ""
    g.add_argument(
        "--parallel",
        type=positive,
        help="local launcher: worker processes (default: one per visible GPU); implies "
        "--launcher local" + slurm_tasks,
    )
    g.add_argument(
        "--retries",
        type=int_at_least(0, "must be >= 0"),
        default=0,
        help=f"times a failed {one} is tried again before it counts as failed (default 0)",
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
        help=f"slurm launcher: a shell line run before each {one} (repeat for more), e.g. "
        "'module load cuda' or 'source ~/venv/bin/activate'",
    )
    g.add_argument(
        "--no-wait",
        action="store_true",
        help=f"slurm launcher: submit and return instead of following the {what}",
    )


def benchmark_overrides(args: argparse.Namespace) -> list[str]:
    """The ``KEY=VALUE`` overrides of a parsed ``benchmark PROTOCOL`` command: its flags that set
    config keys first, then the settings of the ``--tuned`` studies, then the overrides as given
    (before or after the list options)."""
    from promptalign.tune import tuned_overrides

    flags = config_overrides(args, CONFIG_FLAGS)
    given = [f"{k}={'null' if v is None else v}" for k, v in flags.items()]
    tuned = [o for study in getattr(args, "tuned", None) or () for o in tuned_overrides(study)]
    return [*given, *tuned, *args.overrides, *args.list_overrides]


def launcher_from_args(args: argparse.Namespace) -> tuple[str, dict, str]:
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


def cmd_benchmark(args: argparse.Namespace) -> int:
    from promptalign.benchmark import StillRunning, default_datasets, get_launcher, run_benchmark

    check_device(args.device)
    check_out(args.out)
    overrides = benchmark_overrides(args)
    name, settings, source = launcher_from_args(args)
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


def cmd_status(args: argparse.Namespace) -> int:
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
        states = ("finished", "running", "failed", "pending")
        rows = [
            [
                g.method,
                g.dataset,
                *(str(g.counts[s]) for s in states),
                format_seconds(g.seconds),
                format_seconds(g.eta) if g.counts["running"] or g.counts["pending"] else "-",
            ]
            for g in st.groups()
        ]
        print_table(
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


def cmd_cancel(args: argparse.Namespace) -> int:
    from promptalign.benchmark import cancel_grid

    lines = cancel_grid(args.out)
    if not lines:
        print(f"nothing to cancel: no run of {args.out} is active")
    for line in lines:
        print(line)
    return 0
