"""Evaluation: accuracy, macro-F1 and per-class accuracy; text features computed once.

Sharded under torch.distributed: each rank scores a disjoint slice (indices rank::world, no
padding duplicates), predictions are gathered, and the metrics are exact.
"""

from __future__ import annotations

import contextlib

import torch

from ..accel import resolve_amp
from ..data import ImageDataset, make_loader
from . import distributed as dist_utils


class NonFiniteError(RuntimeError):
    """Training or evaluation produced NaN / inf (diverged or corrupt prompts); the message says
    where (epoch, step or evaluation batch) and what to try."""


def metrics_from_predictions(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """accuracy (%), macro-F1 (%), per-class accuracy (%) from flat predictions and labels."""
    n = labels.numel()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp = conf.diag().float()
    support = conf.sum(1).float()
    predicted = conf.sum(0).float()
    per_class = torch.where(
        support > 0, tp / support.clamp_min(1), torch.full_like(tp, float("nan"))
    )
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp)
    )
    present = support > 0
    return {
        "accuracy": 100.0 * tp.sum().item() / max(n, 1),
        "macro_f1": 100.0 * f1[present].mean().item() if present.any() else 0.0,
        "per_class_accuracy": [None if torch.isnan(v) else 100.0 * v.item() for v in per_class],
        "n": n,
    }


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


@torch.no_grad()
def evaluate(
    method,
    data: ImageDataset,
    *,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    amp: str = "none",
    workers: int = 0,
    where: str = "evaluation",
) -> dict:
    """Score ``data`` with ``method`` (its current class names) and return the metrics.

    Scalar diagnostics the method reports with its logits (``MethodOutput.extras``, e.g. the OT
    plan entropies) are averaged over the images under ``"diagnostics"``.

    Raises :class:`NonFiniteError` (naming ``where`` and the batch) when a logit is NaN or inf,
    instead of scoring every image as class 0."""
    device = torch.device(device)
    method.eval()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    shard = (
        torch.utils.data.Subset(data, list(range(rank, len(data), world))) if world > 1 else data
    )
    loader = make_loader(shard, batch_size, train=False, workers=workers, device=device)
    preds, labels, skipped = [], [], 0
    sums: dict[str, torch.Tensor] = {}  # image-weighted sums of the method's scalar diagnostics
    for i, batch in enumerate(loader):
        skipped += batch["skipped"]
        if batch["image"] is None:
            continue
        with autocast(device, amp):
            res = method(batch["image"].to(device, non_blocking=True))
        logits = res.logits
        for k, v in res.extras.items():
            if torch.is_tensor(v) and v.numel() == 1:  # batch means (e.g. OT plan entropy)
                sums[k] = sums.get(k, 0.0) + v.detach().float().reshape(()) * len(logits)
        if not torch.isfinite(logits).all():
            raise NonFiniteError(
                f"{where}: the method's logits are NaN/inf on test batch {i} (images "
                f"{i * batch_size}-{i * batch_size + len(logits) - 1}): its prompts diverged or "
                "are corrupt; retrain with a lower optim.lr (or optim.amp=none)"
            )
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["label"])
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    lab = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    host_sums = {k: v.item() for k, v in sums.items()}
    gathered = dist_utils.gather_objects((pred, lab, skipped, host_sums))
    pred = torch.cat([g[0] for g in gathered])
    lab = torch.cat([g[1] for g in gathered])
    out = metrics_from_predictions(pred, lab, method.num_classes)
    out["skipped"] = sum(g[2] for g in gathered)
    keys = sorted(set().union(*(g[3] for g in gathered)))  # a rank may have scored no images
    if keys and out["n"]:
        # averaged over the images scored, e.g. ot_prompt_entropy / ot_token_entropy: how far the
        # transport plans are from uniform (1.0) on this data
        out["diagnostics"] = {k: sum(g[3].get(k, 0.0) for g in gathered) / out["n"] for k in keys}
    return out


def autocast(device: torch.device, amp: str, *, training: bool = False):
    """Mixed-precision context for ``amp`` in {"auto", "none", "bf16", "fp16"} ("auto": see
    :func:`promptalign.accel.resolve_amp`)."""
    amp = resolve_amp(amp, device, training=training)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)
