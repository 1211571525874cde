"""torch.distributed helpers: launched by torchrun (env://), gloo on CPU, nccl on GPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError


def init_from_env(device: torch.device) -> bool:
    """Initialise the process group when launched with WORLD_SIZE > 1; True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> torch.device:
    """Resolve "auto"/"cuda" to this process's device (LOCAL_RANK under torchrun)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {str(device)[:80]!r} is not a device PyTorch knows; use auto, cpu, cuda, "
            "cuda:N or mps"
        ) from None
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list of one element when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join the torchrun process group for the duration of a call (True when distributed); the
    group is destroyed on exit if this call created it."""
    created = not is_distributed() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    distributed = init_from_env(device)
    try:
        yield distributed
    finally:
        if created:
            cleanup()
