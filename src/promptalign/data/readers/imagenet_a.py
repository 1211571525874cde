"""ImageNet-A (Hendrycks et al. 2021), test only: imagenet-a/<wnid>/ (200 sorted folders),
evaluated 200-way with names from ImageNet's classnames.txt in the dataset folder."""

from ...registry import DATASETS
from .imagenet import WnidFolderReader


@DATASETS.register("imagenet_a")
class ImageNetA(WnidFolderReader):
    folder = "imagenet-adversarial"
    image_dir = "imagenet-a"
