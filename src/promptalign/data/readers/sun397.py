"""SUN397 (Xiao et al. 2010) with CoOp's split."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("sun397")
class SUN397(SplitJsonReader):
    folder = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    template = "a photo of a {}."
