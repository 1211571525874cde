"""EuroSAT (Helber et al. 2019) with CoOp's split and CoOp's readable class names."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("eurosat")
class EuroSAT(SplitJsonReader):
    folder = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    template = "a centered satellite photo of {}."
    rename = {
        "AnnualCrop": "Annual Crop Land",
        "Forest": "Forest",
        "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings",
        "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land",
        "Residential": "Residential Buildings",
        "River": "River",
        "SeaLake": "Sea or Lake",
    }
