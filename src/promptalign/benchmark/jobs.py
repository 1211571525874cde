"""The jobs of a benchmark grid: which (dataset, method, shots, seed) trainings a protocol has,
each one's run config and folder, and running one job.

Every job has its own folder ``<grid>/jobs/<dataset>/<method>/shots<K>-seed<S>-<fingerprint>/``,
where the fingerprint is a hash of the job's resolved run config
(:func:`~promptalign.resolve.resolve_config`: what the job trains and records; loader workers and
the progress bar left out, since they do not change results). Defaults come from each method's
published preset for the protocol (``presets/``); ``overrides`` (``key=value``) apply to every
job, and ``method:key=value`` only to that method's jobs. Every job's config is built and
checked before any job runs, so a typo in an override, a method or a dataset name fails once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, apply_overrides, to_dict
from ..engine import TrainResult, evaluate_run, harmonic_mean, train
from ..engine.checkpoint import RESUME_STATE, RUN_INFO
from ..presets import make_preset
from ..resolve import resolve_config

log = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "fewshot", "cross_dataset", "domain_generalisation")
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
CROSS_TARGETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)


def default_datasets(protocol: str) -> tuple[str, ...]:
    """The datasets the papers report for ``protocol`` (ImageNet + 10 others, or ImageNet as
    source)."""
    return (
        ("imagenet",)
        if protocol in ("cross_dataset", "domain_generalisation")
        else ("imagenet", *CROSS_TARGETS)
    )


@dataclass(frozen=True)
class Job:
    protocol: str
    dataset: str
    method: str
    shots: int
    seed: int
    targets: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/shots{self.shots}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Job:
        return cls(
            str(d["protocol"]),
            str(d["dataset"]),
            str(d["method"]),
            int(d["shots"]),
            int(d["seed"]),
            tuple(d.get("targets", ())),
        )


def make_jobs(
    protocol: str,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    targets: Sequence[str] | None = None,
) -> list[Job]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} unknown; use one of {PROTOCOLS}")
    jobs = []
    if protocol == "fewshot":
        for d in datasets:
            for m in methods:
                for k in shots:
                    for s in seeds:
                        jobs.append(Job(protocol, d, m, k, s))
        return jobs
    default = {"cross_dataset": CROSS_TARGETS, "domain_generalisation": DG_TARGETS}.get(
        protocol, ()
    )
    for d in datasets:
        for m in methods:
            for s in seeds:
                jobs.append(
                    Job(protocol, d, m, 16, s, tuple(targets if targets is not None else default))
                )
    return jobs


def split_recipe(method: str) -> tuple[str, str | None]:
    """``"plot@two_stage"`` -> ("plot", "two_stage"): a method run as one of its multi-run
    recipes (its config class's ``RECIPES``); ``"plot"`` -> ("plot", None)."""
    name, _, recipe = method.partition("@")
    return name, recipe or None


def recipe_stages(method: str) -> tuple[Mapping[str, Any], ...]:
    """The per-run config changes of ``method``'s recipe, in order; ``({},)`` without a recipe."""
    from ..methods import list_methods
    from ..registry import METHODS

    name, recipe = split_recipe(method)
    if recipe is None:
        return ({},)
    list_methods()
    recipes = getattr(METHODS.get(name).config_class, "RECIPES", {})
    if recipe not in recipes:
        raise ValueError(
            f"method {name!r} has no recipe {recipe!r}; recipes: {sorted(recipes) or 'none'} "
            f"(use {name!r} alone for one run)"
        )
    return tuple(recipes[recipe])


def job_config(job: Job, base_overrides: Sequence[str], data_root: str) -> RunConfig:
    preset_protocol = {"domain_generalisation": "cross_dataset"}.get(job.protocol, job.protocol)
    name, _ = split_recipe(job.method)
    cfg = make_preset(name, preset_protocol)
    generic = [o for o in base_overrides if ":" not in o.split("=", 1)[0]]
    specific = [
        o.split(":", 1)[1]
        for o in base_overrides
        if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] in (name, job.method)
    ]
    cfg = apply_overrides(
        cfg,
        {
            "data.dataset": job.dataset,
            "data.root": data_root,
            "data.shots": job.shots,
            "run.seed": job.seed,
            "run.progress": False,
        },
    )
    return apply_overrides(cfg, generic + specific)


# settings that never change a job's result (the data order and augmentation do not depend on them)
_NOT_IN_FINGERPRINT = {("data", "workers"), ("run", "progress")}
# settings added after jobs were recorded, with the values every earlier job ran with (set or
# unset): left out of the fingerprint while they hold one of those, so adding a setting re-runs
# only the jobs it changes; optimiser keys wherever an optim section appears (the run's and the
# method's)
_ADDED_SETTINGS = {
    ("data", "max_image_pixels"): (None,),
    ("optim", "adam_eps"): (None, 1e-8),
    ("run", "eval_split"): ("test",),
}


def _drop_added(d: Any) -> None:
    if isinstance(d, dict):
        for (section, key), earlier in _ADDED_SETTINGS.items():
            part = d.get(section)
            if isinstance(part, dict) and key in part and part[key] in earlier:
                del part[key]
        for v in d.values():
            _drop_added(v)


def config_fingerprint(cfg: RunConfig) -> str:
    """A short hash of the resolved config (:func:`~promptalign.resolve.resolve_config`, what
    the job trains and records) that identifies a job's result."""
    d = to_dict(resolve_config(cfg))
    for section, key in _NOT_IN_FINGERPRINT:
        d[section].pop(key, None)
    _drop_added(d)
    d["data"]["root"] = str(Path(d["data"]["root"]).expanduser().resolve())
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def job_dir(out_dir: Path, job: Job, fingerprint: str) -> Path:
    return out_dir / "jobs" / f"{job.key}-{fingerprint}"


def _check_names(
    protocol: str,
    methods: Sequence[str],
    datasets: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int],
    targets: Sequence[str] | None,
    overrides: Sequence[str],
) -> None:
    from ..data import list_datasets
    from ..methods import list_methods

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} unknown; use one of {', '.join(PROTOCOLS)}")
    known_methods, known_data = list_methods(), list_datasets()
    for m in methods:
        if split_recipe(m)[0] not in known_methods:
            raise ConfigError(
                f"unknown method {m!r} (--methods); choose from {', '.join(known_methods)}"
            )
        try:
            recipe_stages(m)
        except ValueError as e:
            raise ConfigError(f"--methods {m}: {e}") from None
    for d in [*datasets, *(targets or ())]:
        if d not in known_data and not Path(d).expanduser().exists():
            raise ConfigError(
                f"unknown dataset {d!r}: neither a registered dataset "
                "(promptalign list datasets) nor an existing folder / CSV path"
            )
    if protocol == "fewshot":
        bad = [k for k in shots if k < 1]
        if bad or not shots:
            raise ConfigError(
                f"--shots {bad[0] if bad else '(none)'}: shots per class must be >= 1"
            )
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    for o in overrides:
        head = o.split("=", 1)[0]
        if ":" in head and split_recipe(head.split(":", 1)[0])[0] not in known_methods:
            raise ConfigError(
                f"override {o!r} is for method {head.split(':', 1)[0]!r}, which does not "
                f"exist; methods: {', '.join(known_methods)}"
            )


def plan_jobs(
    protocol: str,
    *,
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    data_root: str,
    out_dir: Path,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    targets: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
) -> list[tuple[Job, RunConfig, Path]]:
    """Every job with its resolved config (what it trains and records) and folder, all checked
    before anything runs (ConfigError)."""
    _check_names(protocol, methods, datasets, shots, seeds, targets, overrides)
    plan = []
    for job in make_jobs(protocol, methods, datasets, seeds, shots, targets):
        cfg = resolve_config(job_config(job, overrides, data_root))
        plan.append((job, cfg, job_dir(out_dir, job, config_fingerprint(cfg))))
    return plan


def prepare_data(plan: Sequence[tuple[Job, RunConfig, Path]]) -> None:
    """Render the generated datasets (the synthetic world) the plan reads, once, before workers
    start: two workers rendering the same folder at once would replace it under each other."""
    from ..data import list_datasets
    from ..data.base import get_reader

    known = set(list_datasets())
    seen = set()
    for job, cfg, _ in plan:
        for name in (job.dataset, *job.targets):
            root = Path(cfg.data.root).expanduser()
            if name in known and (name, root) not in seen:
                seen.add((name, root))
                reader = get_reader(name)
                if getattr(reader, "generates", False):
                    reader.check_root(root)


def run_job(job: Job, cfg: RunConfig, job_dir: Path, backbone=None) -> dict[str, Any]:
    """Train (or resume) one job and evaluate it as its protocol requires."""
    stages = recipe_stages(job.method)
    run_dir = job_dir / "run"
    for i, changes in enumerate(stages):
        if len(stages) > 1:  # recipe: run i starts from run i-1's prompts
            prev, run_dir = run_dir, job_dir / f"run-stage{i + 1}"
            if run_finished(run_dir):
                continue
            stage_cfg = apply_overrides(cfg, {f"method.options.{k}": v for k, v in changes.items()})
            if i:
                stage_cfg = apply_overrides(stage_cfg, {"method.init_from": str(prev)})
        else:
            stage_cfg = cfg
        train_or_resume(stage_cfg, run_dir, backbone)
    dev = cfg.run.device
    if job.protocol == "base2new":
        base = evaluate_run(run_dir, subsample="base", device=dev, backbone=backbone)["accuracy"]
        new = evaluate_run(run_dir, subsample="new", device=dev, backbone=backbone)["accuracy"]
        return {"base": base, "new": new, "H": harmonic_mean(base, new)}
    own = evaluate_run(run_dir, subsample="all", device=dev, backbone=backbone)["accuracy"]
    out = {"accuracy": own}
    for t in job.targets:
        out[t] = evaluate_run(run_dir, dataset=t, subsample="all", device=dev, backbone=backbone)[
            "accuracy"
        ]
    return out


def train_or_resume(cfg: RunConfig, run_dir: Path, backbone=None, **kwargs: Any) -> TrainResult:
    """Train ``cfg`` in ``run_dir``, or resume the run there from its last epoch; a folder
    interrupted before its first checkpoint starts over. ``kwargs`` go to
    :func:`~promptalign.engine.train` (e.g. ``epoch_callbacks``)."""
    if run_dir.exists():
        if (run_dir / RESUME_STATE).exists():
            return train(None, run_dir, resume=True, backbone=backbone, **kwargs)
        shutil.rmtree(run_dir)  # interrupted before its first checkpoint: start over
    return train(cfg, run_dir, backbone=backbone, **kwargs)


def run_finished(run_dir: Path) -> bool:
    """A run whose final evaluation was written (its run.json holds metrics)."""
    try:
        return bool(json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("metrics"))
    except (OSError, ValueError):
        return False
