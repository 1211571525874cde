"""Frozen CLIP backbones with prompt seams (open_clip wrapper, weight loading)."""

from .clip import Backbone, Preprocess, TextFeatures, VisionFeatures
from .loading import (
    BackboneError,
    TowerDepths,
    WeightsError,
    list_backbones,
    list_pretrained,
    load_backbone,
    load_weights_file,
    read_state_dict,
    tower_depths,
)

__all__ = [
    "Backbone",
    "BackboneError",
    "Preprocess",
    "TextFeatures",
    "TowerDepths",
    "VisionFeatures",
    "WeightsError",
    "list_backbones",
    "list_pretrained",
    "load_backbone",
    "load_weights_file",
    "read_state_dict",
    "tower_depths",
]
