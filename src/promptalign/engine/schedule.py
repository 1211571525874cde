"""Learning-rate schedule of the CoOp lineage: constant warm-up, then cosine, stepped per epoch.

Epochs ``0 .. warmup_epochs-1`` run at ``warmup_lr``; epoch ``e >= warmup_epochs`` runs at
``lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2`` (Dassl's ConstantWarmupScheduler around
CosineAnnealingLR with T_max = epochs).
"""

from __future__ import annotations

import math


def lr_at(
    epoch: int,
    *,
    lr: float,
    epochs: int,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
    scheduler: str = "cosine",
) -> float:
    """Learning rate for ``epoch`` (0-based)."""
    if epoch < warmup_epochs:
        return warmup_lr
    if scheduler == "constant":
        return lr
    if scheduler != "cosine":
        raise ValueError(f"scheduler {scheduler!r} unknown; use 'cosine' or 'constant'")
    t = epoch - warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * t / max(epochs, 1)))
