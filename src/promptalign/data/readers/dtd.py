"""Describable Textures (Cimpoi et al. 2014) with CoOp's split."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("dtd")
class DTD(SplitJsonReader):
    folder = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    template = "{} texture."
