"""promptalign: prompt learning for frozen CLIP-style vision-language models.

Public API:
    load_backbone(arch, weights=None) -> Backbone   frozen CLIP with prompt seams
    list_backbones(), list_pretrained(arch)
    list_methods(), create_method(name, backbone, classnames, **config) -> PromptMethod
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
from .config import OptimConfig
from .methods import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    create_method,
    list_methods,
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
    "MethodConfig",
    "MethodOutput",
    "OptimConfig",
    "PromptMethod",
    "create_method",
    "list_methods",
    "__version__",
]
