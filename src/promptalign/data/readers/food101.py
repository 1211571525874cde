"""Food-101 (Bossard et al. 2014) with CoOp's split."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("food101")
class Food101(SplitJsonReader):
    folder = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    template = "a photo of {}, a type of food."
