"""Checkpoints: the trainable state (safetensors) + resolved config + class names + sampling info.

Layout of a run folder::

    config.yaml           the fully resolved RunConfig
    prompts.safetensors   the method's own state (never CLIP weights)
    run.json              method, class names, data sampling info, epoch, metrics
    resume.safetensors    optimiser state (momentum buffers) for --resume
    resume.json           epoch reached, optimiser scalars, scaler state
    metrics.jsonl         one line per logged step / epoch / evaluation

Every file is written to a temporary name and renamed, so an interrupted write never replaces a
good checkpoint. Loading checks everything and names the file that is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_write, atomic_write_text

PROMPTS = "prompts.safetensors"
RUN_INFO = "run.json"
CONFIG = "config.yaml"
RESUME_STATE = "resume.safetensors"
RESUME_INFO = "resume.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit; the message names the file."""


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


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


def save_checkpoint(run_dir: Path, method, info: dict[str, Any]) -> None:
    """Write prompts then run info (the info names what the prompts belong to)."""
    write_tensors(run_dir / PROMPTS, method.prompt_state_dict())
    write_text(run_dir / RUN_INFO, json.dumps(info, indent=2))


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
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


def load_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict, scalars: dict, device) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            state = {}
            prefix = f"{names[id(p)]}::"
            for k, v in tensors.items():
                if k.startswith(prefix):
                    state[k[len(prefix):]] = v.to(device)
            for k, v in scalars.items():
                if k.startswith(prefix):
                    state[k[len(prefix):]] = v
            if state:
                opt.state[p] = state
