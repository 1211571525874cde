"""Oxford-IIIT Pets (Parkhi et al. 2012) with CoOp's split."""

from ...registry import DATASETS
from ..base import SplitJsonReader


@DATASETS.register("oxford_pets")
class OxfordPets(SplitJsonReader):
    folder = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    template = "a photo of a {}, a type of pet."
