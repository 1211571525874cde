"""One seam adapter per tower type open_clip builds (see :mod:`.vision` and :mod:`.text`)."""

from .errors import UnsupportedTower
from .text import HFText, OpenCLIPText, TextTower, text_tower
from .vision import OpenCLIPViT, TimmViT, VisionTower, vision_tower

__all__ = [
    "HFText",
    "OpenCLIPText",
    "OpenCLIPViT",
    "TextTower",
    "TimmViT",
    "UnsupportedTower",
    "VisionTower",
    "text_tower",
    "vision_tower",
]
