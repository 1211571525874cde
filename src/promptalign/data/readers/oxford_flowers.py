"""Oxford Flowers 102 (Nilsback & Zisserman 2008) with CoOp's split."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("oxford_flowers")
class OxfordFlowers(SplitJsonReader):
    folder = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    template = "a photo of a {}, a type of flower."
