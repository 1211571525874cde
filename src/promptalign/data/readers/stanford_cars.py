"""Stanford Cars (Krause et al. 2013) with CoOp's split; paths are relative to stanford_cars/."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("stanford_cars")
class StanfordCars(SplitJsonReader):
    folder = "stanford_cars"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"
    template = "a photo of a {}."
