"""Frozen CLIP backbones with prompt seams (open_clip wrapper, weight loading)."""

from .clip import Backbone, Preprocess, TextFeatures, VisionFeatures
from .loading import (
    BackboneError,
    WeightsError,
    list_backbones,
    list_pretrained,
    load_backbone,
    load_weights_file,
    read_state_dict,
)

__all__ = [
    "Backbone",
    "BackboneError",
    "Preprocess",
    "TextFeatures",
    "VisionFeatures",
    "WeightsError",
    "list_backbones",
    "list_pretrained",
    "load_backbone",
    "load_weights_file",
    "read_state_dict",
]
