"""ImageNet-Sketch (Wang et al. 2019), test only: images/<wnid>/ (1000 sorted folders) with
ImageNet's classnames.txt in the dataset folder."""

from ...registry import DATASETS
from .imagenet import WnidFolderReader


@DATASETS.register("imagenet_sketch")
class ImageNetSketch(WnidFolderReader):
    folder = "imagenet-sketch"
    image_dir = "images"
