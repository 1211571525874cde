"""The one trainer every method uses: optimisation, AMP, schedule, clipping, evaluation, logging,
checkpoints, resume and data-parallel training. Methods only compute losses.

Determinism: the data order of epoch e comes from a generator seeded with (seed, e) and the global
torch RNG (augmentation, dropout) is re-seeded at the start of every epoch, so resuming from the
end of an epoch replays exactly what an uninterrupted run does (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..backbone import load_backbone
from ..config import RunConfig, dump_yaml, load_yaml, resolve, to_dict
from ..data import Dataset, ImageDataset, build_transform, load_custom_dataset, load_dataset, make_loader
from ..data.base import DatasetError
from ..methods import create_method
from . import distributed as du
from .checkpoint import (
    CONFIG,
    PROMPTS,
    RESUME_STATE,
    RUN_INFO,
    CheckpointError,
    load_optimizer,
    optimizer_tensors,
    read_json,
    read_tensors,
    save_checkpoint,
    write_tensors,
    write_text,
)
from .evaluate import autocast, evaluate
from .schedule import lr_at

log = logging.getLogger(__name__)
StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    epochs: int
    steps: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig, seed: int, subsample: str | None = None) -> Dataset:
    """The dataset of ``cfg.data`` (registered name or a custom tree / CSV path)."""
    d = cfg.data
    sub = subsample or d.subsample
    if not d.dataset:
        raise DatasetError("no dataset given: set data.dataset (a registered name or a folder / CSV path)")
    from ..data import list_datasets

    if d.dataset in list_datasets():
        return load_dataset(d.dataset, d.root, shots=d.shots, seed=seed, subsample=sub)
    if Path(d.dataset).expanduser().exists():
        return load_custom_dataset(d.dataset, split_file=d.split_file, shots=d.shots, seed=seed, subsample=sub)
    raise DatasetError(
        f"dataset {d.dataset!r} is neither a registered dataset ({', '.join(list_datasets())}) "
        "nor an existing ImageFolder / CSV path"
    )


def build_method(cfg: RunConfig, classnames: Sequence[str], device: torch.device, backbone=None):
    if not cfg.method.name:
        from ..config import ConfigError
        from ..methods import list_methods

        raise ConfigError(f"no method given: set method.name (--method), one of {', '.join(list_methods())}")
    bb = backbone if backbone is not None else load_backbone(cfg.backbone.arch, cfg.backbone.weights, device=device)
    torch.manual_seed(cfg.run.seed)  # prompt initialisation
    method = create_method(cfg.method.name, bb, classnames, preset=cfg.method.preset, **dict(cfg.method.options))
    return method.to(device)


def _with_dataset_template(cfg: RunConfig, template: str) -> RunConfig:
    """Methods with a hand-written ``template`` field get the dataset's template unless the run
    sets one (recorded in the resolved config, so evaluation rebuilds the same prompts)."""
    from ..methods import list_methods
    from ..registry import METHODS

    list_methods()  # make sure every method file is registered
    fields = {f.name for f in dataclasses.fields(METHODS.get(cfg.method.name).config_class)} if cfg.method.name else set()
    if "template" not in fields or "template" in cfg.method.options:
        return cfg
    spec = dataclasses.replace(cfg.method, options={**cfg.method.options, "template": template})
    return dataclasses.replace(cfg, method=spec)


class _Step(torch.nn.Module):
    """What DistributedDataParallel wraps: one training step of a method."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, labels):
        return self.method.training_step((images, labels))


def _log_line(run_dir: Path, record: dict) -> None:
    if du.is_main():
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _run_info(cfg: RunConfig, method, data: Dataset, epoch: int, metrics: dict | None) -> dict:
    return {
        "method": cfg.method.name,
        "classnames": list(method.classnames),
        "sampling": data.sampling_info(),
        "epoch": epoch,
        "metrics": metrics or {},
        "promptalign_config": to_dict(cfg),
    }


def train(
    cfg: RunConfig | None,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    backbone=None,
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train ``cfg``'s method and write the run folder ``out``.

    Args:
        cfg: the run config (optimisation None fields come from the method's preset); None
            with ``resume`` (the run folder's config is used).
        out: run folder; must not hold a previous run unless ``resume``.
        resume: continue the run in ``out`` from its last epoch checkpoint (config from ``out``).
        backbone: an already built backbone to reuse (tests, benchmarks).
        callbacks: called after every optimiser step with the step record.
    """
    run_dir = Path(out).expanduser()
    if resume:
        cfg = load_yaml(run_dir / CONFIG)
    elif (run_dir / CONFIG).exists() or (run_dir / PROMPTS).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True (--resume) to continue it or choose another --out"
        )
    device = du.local_device(cfg.run.device)
    distributed = du.init_from_env(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed = cfg.run.seed
    seed_everything(seed)
    data = load_data(cfg, seed)
    cfg = _with_dataset_template(cfg, data.template)
    method = build_method(cfg, data.classnames, device, backbone)
    cfg = resolve(cfg, method.optim_preset)
    o = cfg.optim
    if du.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / CONFIG, dump_yaml(cfg))
    method.fit_before_training(_batches(data, data.train, method, cfg, device, augment=True))
    params = method.trainable_parameters()
    names = {id(p): n for n, p in method.named_parameters() if p.requires_grad}
    opt = None
    if params:
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=o.amp == "fp16")

    start_epoch, steps = 0, 0
    if resume and (run_dir / RESUME_STATE).exists():
        start_epoch, steps = _load_resume(run_dir, method, opt, scaler, names, device)
        log.info("resuming %s after epoch %d", run_dir, start_epoch)

    epochs = o.epochs if params else 0
    train_set = ImageDataset(data.name, data.image_root, data.train,
                             build_transform(method.backbone.preprocess, train=True), cfg.data.skip_corrupt)
    test_set = ImageDataset(data.name, data.image_root, data.test,
                            build_transform(method.backbone.preprocess, train=False), cfg.data.skip_corrupt)
    step_module: torch.nn.Module = _Step(method)
    if distributed and params:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=True,
        )
    skipped_total = 0
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        lr = lr_at(epoch, lr=o.lr, epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                   warmup_lr=o.warmup_lr, scheduler=o.scheduler)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(seed * 100_003 + epoch)  # augmentation / dropout stream of this epoch
        sampler = None
        if distributed:
            sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
        loader = make_loader(train_set, o.batch_size, train=True, workers=cfg.data.workers, device=device,
                             seed=seed * 1000 + epoch, sampler=sampler)
        method.train()
        bar = _progress(loader, cfg, epoch, epochs)
        t0, seen = time.perf_counter(), 0
        for batch in bar:
            skipped_total += batch["skipped"]
            if batch["image"] is None:
                continue
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast(device, o.amp):
                out = step_module(images, labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            if o.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            scaler.step(opt)
            scaler.update()
            steps += 1
            seen += len(labels)
            record = {"epoch": epoch, "step": steps, "lr": lr,
                      **{k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1},
                      "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{record['images_per_s']:.1f}")
            _log_line(run_dir, record)
            for cb in callbacks:
                cb(record)
        method.on_epoch_end(epoch, epochs)
        if cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0 and epoch + 1 < epochs:
            ev = evaluate(method, test_set, batch_size=o.eval_batch_size, device=device, amp=o.amp)
            _log_line(run_dir, {"epoch": epoch, "eval": _short(ev)})
        if du.is_main():
            save_checkpoint(run_dir, method, _run_info(cfg, method, data, epoch + 1, None))
            _save_resume(run_dir, method, opt, scaler, names, epoch + 1, steps)
        du.barrier()

    chosen = method.select_on_validation(_batches(data, data.val, method, cfg, device, augment=False))
    if chosen:
        log.info("chosen on the validation split: %s", chosen)
        _log_line(run_dir, {"validation_selection": chosen})
    metrics = evaluate(method, test_set, batch_size=o.eval_batch_size, device=device, amp=o.amp)
    metrics.update({f"val_selected_{k}": v for k, v in chosen.items()})
    metrics["skipped_train_images"] = skipped_total
    if skipped_total or metrics["skipped"]:
        log.warning("skipped %d unreadable training and %d test images", skipped_total, metrics["skipped"])
    if du.is_main():
        save_checkpoint(run_dir, method, _run_info(cfg, method, data, epochs, _short(metrics)))
        _log_line(run_dir, {"final": _short(metrics)})
    return TrainResult(run_dir, metrics, epochs, steps)


def _batches(data: Dataset, records, method, cfg: RunConfig, device, *, augment: bool):
    """For the method hooks: a callable iterating ``(images, labels)`` of ``records`` in a fixed
    order (training augmentation when ``augment``), unreadable images skipped."""
    dataset = ImageDataset(data.name, data.image_root, records,
                           build_transform(method.backbone.preprocess, train=augment), cfg.data.skip_corrupt)

    def batches():
        if not len(records):
            return
        loader = make_loader(dataset, cfg.optim.eval_batch_size, train=False, workers=cfg.data.workers,
                             device=device)
        for batch in loader:
            if batch["image"] is not None:
                yield batch["image"].to(device), batch["label"].to(device)

    return batches


def _short(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "per_class_accuracy"}


def _progress(loader, cfg: RunConfig, epoch: int, epochs: int):
    if not cfg.run.progress or not du.is_main():
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def _save_resume(run_dir, method, opt, scaler, names, epoch, steps) -> None:
    """One atomic file holding everything a resume needs (prompts + optimiser), so it can never
    be half from one epoch and half from another."""
    tensors = {f"prompt/{k}": v for k, v in method.prompt_state_dict().items()}
    scalars: dict = {}
    if opt is not None:
        ot, scalars = optimizer_tensors(opt, names)
        tensors.update({f"optim/{k}": v for k, v in ot.items()})
    meta = {"epoch": epoch, "steps": steps, "optim_scalars": scalars, "scaler": scaler.state_dict()}
    from safetensors.torch import save_file

    from ..io import atomic_write

    atomic_write(run_dir / RESUME_STATE, lambda tmp: save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
        metadata={"resume": json.dumps(meta)}))


def _load_resume(run_dir, method, opt, scaler, names, device) -> tuple[int, int]:
    path = run_dir / RESUME_STATE
    tensors = read_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["resume"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} lacks its resume metadata ({e}); it was not written by promptalign") from e
    prompts = {k[len("prompt/"):]: v for k, v in tensors.items() if k.startswith("prompt/")}
    try:
        method.load_prompt_state_dict(prompts)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if opt is not None:
        load_optimizer(opt, names, {k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")},
                       meta.get("optim_scalars", {}), device)
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return int(meta["epoch"]), int(meta["steps"])


# --------------------------------------------------------------------------- using a finished run
def load_run(run_dir: str | os.PathLike, *, device: str = "auto", backbone=None):
    """Rebuild a trained method from its run folder alone: ``(method, config, run info)``."""
    run_dir = Path(run_dir).expanduser()
    cfg = load_yaml(run_dir / CONFIG)
    info = read_json(run_dir / RUN_INFO)
    if "classnames" not in info or not isinstance(info["classnames"], list):
        raise CheckpointError(f"{run_dir / RUN_INFO} lacks the class names")
    dev = du.local_device(device)
    method = build_method(cfg, info["classnames"], dev, backbone)
    state = read_tensors(run_dir / PROMPTS)
    try:
        method.load_prompt_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{run_dir / PROMPTS}: {e}") from e
    return method.eval(), cfg, info


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    subsample: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    device: str = "auto",
    backbone=None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate a saved run on its dataset's test split, other classes (``subsample``) or another
    dataset (cross-dataset / domain generalisation)."""
    method, cfg, info = load_run(run_dir, device=device, backbone=backbone)
    data_cfg = cfg.data
    if dataset is not None:
        data_cfg = dataclasses.replace(data_cfg, dataset=dataset, root=root or data_cfg.root, split_file=None)
    elif root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=root)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    data = load_data(cfg, cfg.run.seed, subsample)
    method.set_classnames(data.classnames)
    test = ImageDataset(data.name, data.image_root, data.test,
                        build_transform(method.backbone.preprocess, train=False), cfg.data.skip_corrupt)
    m = evaluate(method, test, batch_size=batch_size or cfg.optim.eval_batch_size,
                 device=method.backbone.device, amp=cfg.optim.amp)
    m.update(dataset=data.name, subsample=data.subsample, num_classes=data.num_classes)
    return m


def predict(
    run_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    classnames: Sequence[str] | None = None,
    topk: int = 5,
    device: str = "auto",
    backbone=None,
) -> list[dict[str, Any]]:
    """Top-k labels for image files with a saved run (its classes, or ``classnames``)."""
    from PIL import Image

    method, _, _ = load_run(run_dir, device=device, backbone=backbone)
    if classnames:
        method.set_classnames(classnames)
    tf = build_transform(method.backbone.preprocess, train=False)
    out = []
    for path in images:
        try:
            with Image.open(path) as im:
                x = tf(im.convert("RGB")).unsqueeze(0).to(method.backbone.device)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        with torch.no_grad():
            probs = method.logits(x).softmax(-1)[0]
        k = min(topk, probs.numel())
        p, idx = probs.topk(k)
        out.append({"image": str(path),
                    "top": [{"label": method.classnames[i], "prob": float(q)} for q, i in zip(p.tolist(), idx.tolist())]})
    return out
