"""Every read and write of a run folder: config, checkpoints, resume state, metrics log.

Layout of a run folder::

    config.yaml           the fully resolved RunConfig (re-creates the run on its own)
    sample.json           the images the run trained and validated on: its few-shot sample
                          (relative paths, labels, class names) and the sample's hash
    prompts.safetensors   the method's own state (never CLIP weights)
    run.json              method, class names, data sampling info, the sample's hash, epoch,
                          metrics
    resume.safetensors    prompts + optimiser state at the end of the last epoch, with the
                          epoch, step count, optimiser scalars and AMP scaler state in its
                          metadata (one file, so a resume never mixes two epochs)
    metrics.jsonl         one line per optimiser step / evaluation
    .lock                 while a process trains in the folder: who (``promptalign.claim``)

Every file except the log is written to a temporary name and renamed (``promptalign.io``), so an
interrupted write never replaces a good checkpoint; temporaries a killed write left behind are
removed when the run folder is opened again. Loading checks everything and names the file.

The sample record lets a later ``eval`` or ``--resume`` tell whether the dataset on disk still
gives the run's sample (:func:`check_sample`): a few-shot sample is a function of the data, its
split files, the shot count and the seed, and any of them may change after training. For a run on
the full training split (no ``shots``) only the hash and sizes are stored, not the list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..claim import LOCK, Claim, ClaimBusy
from ..config import RunConfig, dump_yaml, load_yaml
from ..io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

PROMPTS = "prompts.safetensors"
RUN_INFO = "run.json"
CONFIG = "config.yaml"
RESUME_STATE = "resume.safetensors"
METRICS = "metrics.jsonl"
SAMPLE = "sample.json"
RUN_FILES = (CONFIG, SAMPLE, PROMPTS, RUN_INFO, RESUME_STATE, METRICS)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit; the message names the file."""


# --------------------------------------------------------------------------- files
def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or not safetensors ({e})") from e


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold an object")
    return data


# --------------------------------------------------------------------------- the run folder
def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` has a checkpoint (a folder with only a config is a failed start)."""
    return any((run_dir / f).exists() for f in (PROMPTS, RUN_INFO, RESUME_STATE))


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporaries of run files that a killed write left behind."""
    removed = []
    if run_dir.is_dir():
        for name in RUN_FILES:
            for tmp in run_dir.glob(f".{name}.*"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def claim_run_dir(run_dir: Path) -> Claim:
    """Claim ``run_dir`` for this process (created if needed), so no second process trains in
    it at the same time, on this host or another one sharing the folder; a claim left by a
    process that is gone is taken over. Raises :class:`~promptalign.claim.ClaimBusy` naming the
    holder. Release it with ``.release()``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} is a file; choose a folder for the run")
    claim = Claim(run_dir / LOCK, what="train")
    try:
        claim.acquire()
    except ClaimBusy as e:
        raise ClaimBusy(
            f"--out {run_dir} is in use by {e.who}; wait for it to end, or choose another --out",
            e.holder,
            e.who,
        ) from None
    return claim


def open_run_dir(run_dir: Path, *, resume: bool) -> bool:
    """Check ``run_dir`` for a new run (or a resumed one) and clean it; True if it was created."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} is a file; choose a folder for the run")
    if resume:
        if not (run_dir / RESUME_STATE).is_file() and not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir} holds no run to resume; train without --resume")
    elif holds_run(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True (--resume) to continue it or choose "
            "another --out"
        )
    clean_temporaries(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return created


def remove_failed_start(run_dir: Path, created: bool) -> None:
    """After a run failed before its first checkpoint: remove what it wrote (and the folder if
    it made it), so a retry with the same --out starts cleanly."""
    if holds_run(run_dir):
        return
    for name in (CONFIG, SAMPLE, METRICS):
        (run_dir / name).unlink(missing_ok=True)
    clean_temporaries(run_dir)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_text(run_dir / CONFIG, dump_yaml(cfg))


def read_config(run_dir: Path) -> RunConfig:
    """The run's config; a folder without one, or with an empty one, is a CheckpointError."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} holds no run: it has no {CONFIG} (a run stopped before it started "
            "writes none); give a run folder written by promptalign train"
        )
    cfg = load_yaml(path)
    if not cfg.method.name or not cfg.data.dataset:
        raise CheckpointError(
            f"{path} is empty or damaged (it names no method or no dataset); this run folder "
            f"cannot be used: train the run again, or restore its {CONFIG}"
        )
    return cfg


# --------------------------------------------------------------------------- the few-shot sample
SampleCheck = Literal["same", "changed", "unrecorded"]


def _records(recs) -> list[list]:
    return [[r.path, r.label, r.classname] for r in recs]


def sample_hash(data) -> str:
    """sha256 of a dataset's training and validation lists (relative path, label, class name, in
    order): what identifies the sample a run trains and selects on."""
    blob = json.dumps({"train": _records(data.train), "val": _records(data.val)})
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_record(data) -> dict[str, Any]:
    """What ``sample.json`` holds for ``data`` (a loaded :class:`~promptalign.data.Dataset`): its
    sampling settings, the hash and sizes of the lists, and the lists themselves for a few-shot
    sample."""
    record: dict[str, Any] = {
        **data.sampling_info(),
        "sha256": sample_hash(data),
        "sizes": {"train": len(data.train), "val": len(data.val)},
    }
    if data.shots is not None:
        record.update(train=_records(data.train), val=_records(data.val))
    return record


def write_sample(run_dir: Path, data) -> None:
    write_text(run_dir / SAMPLE, json.dumps(sample_record(data), indent=1))


def check_sample(run_dir: Path, data) -> tuple[SampleCheck, str]:
    """Does ``data`` (the run's dataset as loaded now) give the sample recorded in ``run_dir``?
    Returns ("same", ""), ("unrecorded", why) for a run folder without a readable record, or
    ("changed", a sentence naming what differs)."""
    path = run_dir / SAMPLE
    if not path.is_file():
        return "unrecorded", f"{run_dir} has no {SAMPLE} (written by an older version)"
    try:
        stored = read_json(path)
    except CheckpointError as e:
        return "unrecorded", str(e)
    if stored.get("sha256") == sample_hash(data):
        return "same", ""
    parts = []
    for split in ("train", "val"):
        now = _records(getattr(data, split))
        if split in stored:
            old = [list(r) for r in stored[split]]
            differ = sum(a != b for a, b in zip(old, now)) + abs(len(old) - len(now))
            if differ:
                extra = old[len(now) :] or now[len(old) :]
                first = next((a for a, b in zip(old, now) if a != b), extra[0] if extra else None)
                parts.append(f"{differ} of {len(old)} {split} entries differ, first {first[0]!r}")
        elif stored.get("sizes", {}).get(split) != len(now):
            parts.append(f"{split}: {stored.get('sizes', {}).get(split)} -> {len(now)} images")
    detail = "; ".join(parts) or "the training / validation lists differ"
    return "changed", (
        f"{path}: the dataset {data.name!r} as read now no longer gives this run's sample "
        f"({detail}); the data, its split files or its few-shot cache changed since training"
    )


def record_sample(run_dir: Path, data, *, resume: bool, write: bool = True) -> None:
    """A new run records its sample (``write``: on the main process); a resumed one checks that
    the data still gives it and refuses to continue on another sample."""
    if not resume:
        if write:
            write_sample(run_dir, data)
        return
    status, message = check_sample(run_dir, data)
    if status == "changed":
        raise CheckpointError(
            f"{message}; --resume continues a run only on its own sample: restore the data, or "
            "start a new run with another --out"
        )
    if status == "unrecorded":
        log.warning("%s; cannot check that the resumed run trains on its own sample", message)


def save_checkpoint(run_dir: Path, method, info: dict[str, Any]) -> None:
    """Write prompts then run info (the info names what the prompts belong to)."""
    write_tensors(run_dir / PROMPTS, method.prompt_state_dict())
    write_text(run_dir / RUN_INFO, json.dumps(info, indent=2))


# --------------------------------------------------------------------------- metrics log
def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, epoch: int, steps: int) -> None:
    """Keep only the log lines of the first ``epoch`` epochs (``steps`` steps), so a resumed run
    does not repeat the steps an interrupted epoch had logged."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if (
            "step" in rec
            and rec["step"] <= steps
            or "step" not in rec
            and rec.get("epoch", epoch) < epoch
        ):
            kept.append(line)
    write_text(path, "".join(ln + "\n" for ln in kept))


# --------------------------------------------------------------------------- resume state
def optimizer_tensors(
    opt: torch.optim.Optimizer, names: dict[int, str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state into tensors (keyed by parameter name) and JSON scalars."""
    tensors, scalars = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[id(p)]}::{key}"] = value
                else:
                    scalars[f"{names[id(p)]}::{key}"] = value
    return tensors, scalars


def load_optimizer(
    opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict, scalars: dict, device
) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            state = {}
            prefix = f"{names[id(p)]}::"
            for k, v in tensors.items():
                if k.startswith(prefix):
                    state[k[len(prefix) :]] = v.to(device)
            for k, v in scalars.items():
                if k.startswith(prefix):
                    state[k[len(prefix) :]] = v
            if state:
                opt.state[p] = state


def save_resume(
    run_dir: Path, method, opt, scaler, names: dict[int, str], epoch: int, steps: int
) -> None:
    """One atomic file holding everything a resume needs (prompts + optimiser)."""
    tensors = {f"prompt/{k}": v for k, v in method.prompt_state_dict().items()}
    scalars: dict = {}
    if opt is not None:
        ot, scalars = optimizer_tensors(opt, names)
        tensors.update({f"optim/{k}": v for k, v in ot.items()})
    meta = {"epoch": epoch, "steps": steps, "optim_scalars": scalars, "scaler": scaler.state_dict()}
    write_tensors(run_dir / RESUME_STATE, tensors, metadata={"resume": json.dumps(meta)})


def load_resume(
    run_dir: Path, method, opt, scaler, names: dict[int, str], device
) -> tuple[int, int]:
    """Restore :func:`save_resume`'s state; returns (epochs done, steps done)."""
    path = run_dir / RESUME_STATE
    tensors = read_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["resume"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} lacks its resume metadata ({e}); it was not written by promptalign"
        ) from e
    prompts = {k[len("prompt/") :]: v for k, v in tensors.items() if k.startswith("prompt/")}
    try:
        method.load_prompt_state_dict(prompts)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if opt is not None:
        load_optimizer(
            opt,
            names,
            {k[len("optim/") :]: v for k, v in tensors.items() if k.startswith("optim/")},
            meta.get("optim_scalars", {}),
            device,
        )
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return int(meta["epoch"]), int(meta["steps"])


def init_prompts_from_run(method, run_dir: str | Path) -> None:
    """Start ``method`` from the prompts of a finished run (``method.init_from``; PLOT++ stage 2
    from stage 1): its ``prompts.safetensors`` loaded strictly, its method name checked."""
    src = Path(run_dir).expanduser()
    info = read_json(src / RUN_INFO)
    if info.get("method") != method.registered_name:
        raise CheckpointError(
            f"{src / RUN_INFO}: method.init_from needs a {method.registered_name!r} run, "
            f"this one is {info.get('method')!r}; point it at a run of the same method"
        )
    try:
        method.load_prompt_state_dict(read_tensors(src / PROMPTS))
    except ValueError as e:
        raise CheckpointError(f"{src / PROMPTS} (method.init_from): {e}") from e
