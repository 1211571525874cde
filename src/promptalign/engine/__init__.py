"""The engine: one training loop for every method, evaluation, run folders, distributed helpers.

build.py (data, backbone, method, optimiser and the resolved config), loop.py (one epoch and the
loop), checkpoint.py (every run-folder read and write, resume included), inference.py (load a
run, evaluate it, predict), evaluate.py (metrics), schedule.py, distributed.py.
"""

from ..resolve import resolve_config
from .build import build_run, load_data
from .checkpoint import CheckpointError
from .evaluate import NonFiniteError, evaluate, harmonic_mean, metrics_from_predictions
from .inference import evaluate_run, load_run, predict
from .loop import TrainResult, train, train_epoch
from .schedule import lr_at

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "TrainResult",
    "build_run",
    "evaluate",
    "evaluate_run",
    "harmonic_mean",
    "load_data",
    "load_run",
    "lr_at",
    "metrics_from_predictions",
    "predict",
    "resolve_config",
    "train",
    "train_epoch",
]
