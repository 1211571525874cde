"""The engine: one trainer for every method, evaluation, checkpoints, distributed helpers."""

from .checkpoint import CheckpointError
from .evaluate import evaluate, harmonic_mean, metrics_from_predictions
from .schedule import lr_at
from .trainer import TrainResult, evaluate_run, load_run, predict, train

__all__ = [
    "CheckpointError",
    "TrainResult",
    "evaluate",
    "evaluate_run",
    "harmonic_mean",
    "load_run",
    "lr_at",
    "metrics_from_predictions",
    "predict",
    "train",
]
