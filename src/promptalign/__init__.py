"""promptalign: prompt learning for frozen CLIP-style vision-language models.

Public API:
    load_backbone(arch, weights=None) -> Backbone   frozen CLIP with prompt seams
    list_backbones(), list_pretrained(arch)
    promptalign.ot                                   batched Sinkhorn and hierarchical OT
"""

from importlib.metadata import PackageNotFoundError, version

from .backbone import (
    Backbone,
    Preprocess,
    TextFeatures,
    VisionFeatures,
    WeightsError,
    list_backbones,
    list_pretrained,
    load_backbone,
)

try:
    __version__ = version("promptalign")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "Backbone",
    "Preprocess",
    "TextFeatures",
    "VisionFeatures",
    "WeightsError",
    "list_backbones",
    "list_pretrained",
    "load_backbone",
    "__version__",
]
