"""Caltech101 (Fei-Fei et al. 2004) with CoOp's split; the split file already holds the cleaned
names (BACKGROUND_Google and Faces_easy dropped; airplanes -> airplane, Faces -> face,
Leopards -> leopard, Motorbikes -> motorbike), and the same renames are applied here to older
files."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("caltech101")
class Caltech101(SplitJsonReader):
    folder = "caltech-101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    template = "a photo of a {}."
    rename = {
        "airplanes": "airplane",
        "Faces": "face",
        "Leopards": "leopard",
        "Motorbikes": "motorbike",
    }
