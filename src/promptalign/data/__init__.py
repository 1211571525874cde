"""Data: dataset readers in the CoOp layout, few-shot and base/new splits, custom datasets,
transforms and loaders."""

from .base import (
    Dataset,
    DatasetError,
    DatasetReader,
    Record,
    Splits,
    list_datasets,
    load_dataset,
)
from .custom import load_custom_dataset
from .loader import ImageDataset, collate, make_loader
from .templates import IMAGENET_SELECT_TEMPLATES
from .transforms import build_transform

__all__ = [
    "IMAGENET_SELECT_TEMPLATES",
    "Dataset",
    "DatasetError",
    "DatasetReader",
    "ImageDataset",
    "Record",
    "Splits",
    "build_transform",
    "collate",
    "list_datasets",
    "load_custom_dataset",
    "load_dataset",
    "make_loader",
]
