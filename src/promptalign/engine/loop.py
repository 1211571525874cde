"""The one training loop every method uses: schedule, AMP, clipping, evaluation, logging.

Methods only compute losses (``training_step``); building the run is :mod:`.build`, the run
folder is :mod:`.checkpoint`. Determinism: the data order of epoch e comes from a generator seeded
with (seed, e) (and ``sampler.set_epoch(e)`` when the loader's sampler has one), the global torch
RNG (augmentation, dropout) is re-seeded at the start of every epoch, and the progress bar wraps an
iterator that already exists, so it never draws from the data-order generator. Resuming from the
end of an epoch therefore replays exactly what an uninterrupted run does (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..accel import compile_step
from ..claim import Claim
from ..config import RunConfig
from ..data import make_loader
from . import checkpoint as ck
from . import distributed as du
from .build import Run, build_run, record_batches, resume_config, run_info
from .evaluate import NonFiniteError, autocast, evaluate
from .schedule import lr_at

log = logging.getLogger(__name__)
StepCallback = Callable[[dict[str, Any]], None]
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder written.
        metrics: the final metrics on the run's ``run.eval_split`` (the test split unless the
            run is scored on validation): ``accuracy``, ``macro_f1`` in percent, ``n`` images,
            ..., as stored in the run folder's ``run.json``.
        epochs: the epochs of the run's schedule (a resumed run counts those before it too).
        steps: optimiser steps taken, in total.
        split: the split ``metrics`` were measured on (``run.eval_split``).
    """

    run_dir: Path
    metrics: dict[str, Any]
    epochs: int
    steps: int
    split: str = "test"


class _Step(torch.nn.Module):
    """What DistributedDataParallel wraps: one training step of a method."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, labels):
        return self.method.training_step((images, labels))


def train_epoch(
    r: Run,
    step_module: torch.nn.Module,
    epoch: int,
    steps: int,
    run_dir: Path,
    device: torch.device,
    callbacks: Sequence[StepCallback] = (),
) -> tuple[int, int]:
    """One epoch of ``r``; returns (steps done in total, images skipped as unreadable)."""
    o, seed, opt = r.cfg.optim, r.cfg.run.seed, r.optimizer
    lr = lr_at(
        epoch,
        lr=o.lr,
        epochs=o.epochs,
        warmup_epochs=o.warmup_epochs,
        warmup_lr=o.warmup_lr,
        scheduler=o.scheduler,
    )
    for g in opt.param_groups:
        g["lr"] = lr
    torch.manual_seed(seed * 100_003 + epoch)  # augmentation / dropout stream of this epoch
    sampler = None
    if du.is_distributed():
        sampler = torch.utils.data.distributed.DistributedSampler(
            r.train_set, shuffle=True, seed=seed
        )
    loader = make_loader(
        r.train_set,
        o.batch_size,
        train=True,
        workers=r.cfg.data.workers,
        device=device,
        seed=seed * 1000 + epoch,
        sampler=sampler,
    )
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    r.method.train()
    batches = _progress(iter(loader), len(loader), r.cfg, f"epoch {epoch + 1}/{o.epochs}")
    t0, seen, skipped = time.perf_counter(), 0, 0
    for batch in batches:
        skipped += batch["skipped"]
        if batch["image"] is None:
            continue
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, o.amp, training=True):
            out = step_module(images, labels)
        scalars = {
            k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1
        }
        if not torch.isfinite(out["loss"].detach()):
            raise NonFiniteError(
                f"training diverged at epoch {epoch + 1}, step {steps + 1}: loss {scalars['loss']} "
                f"({', '.join(f'{k}={v:.4g}' for k, v in scalars.items())}); lower optim.lr, set "
                "optim.grad_clip or use optim.amp=none"
            )
        opt.zero_grad(set_to_none=True)
        r.scaler.scale(out["loss"]).backward()
        if o.grad_clip is not None:
            r.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(r.method.trainable_parameters(), o.grad_clip)
        r.scaler.step(opt)
        r.scaler.update()
        steps += 1
        seen += len(labels)
        record = {
            "epoch": epoch,
            "step": steps,
            "lr": lr,
            **scalars,
            "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
        }
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if du.is_main():
            ck.log_metrics(run_dir, record)
        for cb in callbacks:
            cb(record)
    return steps, skipped


def train(
    cfg: RunConfig | None,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    backbone=None,
    callbacks: Sequence[StepCallback] = (),
    epoch_callbacks: Sequence[EpochCallback] = (),
) -> TrainResult:
    """Train ``cfg``'s method and write the run folder ``out``.

    Args:
        cfg: the run config (optimisation None fields come from the method's preset); None with
            ``resume`` (the run folder's config is used).
        out: run folder; must not hold a previous run unless ``resume``.
        resume: continue the run in ``out`` from its last epoch checkpoint (config from ``out``).
        overrides: with ``resume``: settings to change that do not change results (device,
            progress, workers, data root); any other change is a :class:`ConfigError`.
        backbone: an already built backbone to reuse (tests, benchmarks).
        callbacks: called after every optimiser step with the step record.
        epoch_callbacks: called at the end of every epoch, once its checkpoint is written, with
            ``{"epoch": e (0-based), "epochs": n, "split": run.eval_split, "eval": metrics}``;
            ``eval`` holds the evaluation of that epoch (``run.eval_every``), else None. An
            exception raised there (e.g. a search pruning the run) ends the run, which stays
            resumable from that epoch.

    Returns:
        The run folder and its final metrics on ``run.eval_split`` (:class:`TrainResult`).
    """
    run_dir = Path(out).expanduser()
    if resume:
        cfg = resume_config(ck.read_config(run_dir), overrides)
    device = du.local_device(cfg.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with du.process_group(device) as distributed:
        created = not run_dir.exists()
        # one process trains in a folder at a time (the main one under torchrun): claimed first
        claim = ck.claim_run_dir(run_dir) if du.is_main() else None
        try:
            r = build_run(cfg, device, backbone)
            if du.is_main():
                ck.open_run_dir(run_dir, resume=resume)
            return _train(
                r, run_dir, resume, distributed, device, callbacks, epoch_callbacks, claim
            )
        except BaseException:
            if claim is not None and not resume:
                ck.remove_failed_start(run_dir, created=False)  # while the folder is still ours
                claim.release()
                if created:  # and the folder it made, unless another run has claimed it since
                    with contextlib.suppress(OSError):
                        run_dir.rmdir()
            raise
        finally:
            if claim is not None:
                claim.release()


def _train(
    r: Run,
    run_dir: Path,
    resume: bool,
    distributed: bool,
    device: torch.device,
    callbacks: Sequence[StepCallback],
    epoch_callbacks: Sequence[EpochCallback] = (),
    claim: Claim | None = None,
) -> TrainResult:
    cfg, o = r.cfg, r.cfg.optim
    ck.record_sample(run_dir, r.data, resume=resume, write=du.is_main())  # a resume checks it
    if du.is_main():
        ck.write_config(run_dir, cfg)
    start_epoch, steps = 0, 0
    if cfg.method.init_from and not (resume and (run_dir / ck.RESUME_STATE).exists()):
        ck.init_prompts_from_run(r.method, cfg.method.init_from)
        log.info("prompts initialised from %s", cfg.method.init_from)
    if resume and (run_dir / ck.RESUME_STATE).exists():
        start_epoch, steps = ck.load_resume(
            run_dir, r.method, r.optimizer, r.scaler, r.param_names, device
        )
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    if du.is_main():
        ck.truncate_metrics(run_dir, start_epoch, steps)
    epochs = o.epochs if r.optimizer is not None else 0
    step_module: torch.nn.Module = _Step(r.method)
    if distributed and r.optimizer is not None:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
    if r.optimizer is not None:  # optim.compile: torch.compile over the step (eager OT inside)
        step_module = compile_step(step_module, o.compile, device=device)
    skipped = 0
    for epoch in range(start_epoch, epochs):
        steps, lost = train_epoch(r, step_module, epoch, steps, run_dir, device, callbacks)
        skipped += lost
        r.method.on_epoch_end(epoch, epochs)  # e.g. PromptSRC's prompt aggregation
        ev = None
        if cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0 and epoch + 1 < epochs:
            ev = _short(
                evaluate(
                    r.method,
                    r.eval_set,
                    batch_size=o.eval_batch_size,
                    device=device,
                    amp=o.amp,
                    where=f"evaluation after epoch {epoch + 1}",
                )
            )
            if du.is_main():
                ck.log_metrics(run_dir, {"epoch": epoch, "eval": ev})
        if claim is not None:
            claim.check()  # taken over while this process was stopped: write nothing more
        if du.is_main():
            ck.save_checkpoint(run_dir, r.method, run_info(cfg, r.method, r.data, epoch + 1, None))
            ck.save_resume(
                run_dir, r.method, r.optimizer, r.scaler, r.param_names, epoch + 1, steps
            )
        du.barrier()
        end = {"epoch": epoch, "epochs": epochs, "split": cfg.run.eval_split, "eval": ev}
        for cb in epoch_callbacks:
            cb(end)
    # inference-time choices on the validation split, never on test (e.g. Tip-Adapter's alpha/beta)
    chosen = r.method.select_on_validation(
        record_batches(cfg, r.data, r.data.val, r.method, device, augment=False)
    )
    if chosen:
        log.info("chosen on the validation split: %s", chosen)
        if du.is_main():
            ck.log_metrics(run_dir, {"validation_selection": chosen})
    metrics = evaluate(
        r.method,
        r.eval_set,
        batch_size=o.eval_batch_size,
        device=device,
        amp=o.amp,
        where=f"final evaluation after epoch {epochs}",
    )
    metrics.update({f"val_selected_{k}": v for k, v in chosen.items()})
    metrics["skipped_train_images"] = skipped
    if skipped or metrics["skipped"]:
        log.warning(
            "skipped %d unreadable training and %d %s images",
            skipped,
            metrics["skipped"],
            "validation" if cfg.run.eval_split == "val" else "test",
        )
    if claim is not None:
        claim.check()
    if du.is_main():
        ck.save_checkpoint(
            run_dir, r.method, run_info(cfg, r.method, r.data, epochs, _short(metrics))
        )
        ck.log_metrics(run_dir, {"final": _short(metrics)})
    return TrainResult(run_dir, metrics, epochs, steps, cfg.run.eval_split)


def _short(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "per_class_accuracy"}


def _progress(batches, total: int, cfg: RunConfig, desc: str):
    """A progress bar over an existing iterator (so it cannot re-iterate the loader), only on
    the main process and only when stderr is a terminal."""
    if not cfg.run.progress or not du.is_main() or not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True)
