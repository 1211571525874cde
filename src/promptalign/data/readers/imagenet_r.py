"""ImageNet-R (Hendrycks et al. 2021), test only: imagenet-r/<wnid>/ (200 sorted folders),
evaluated 200-way with names from ImageNet's classnames.txt in the dataset folder."""

from ...registry import DATASETS
from .imagenet import WnidFolderReader


@DATASETS.register("imagenet_r")
class ImageNetR(WnidFolderReader):
    folder = "imagenet-rendition"
    image_dir = "imagenet-r"
