"""ImageNet-Sketch (Wang et al. 2019), test only: images/<wnid>/ (1000 sorted folders) with
ImageNet's classnames.txt in the dataset folder."""

from pathlib import Path

from ...registry import DATASETS
from ..base import DatasetReader, Splits, folder_records
from .imagenet import wnid_classes


@DATASETS.register("imagenet_sketch")
class ImageNetSketch(DatasetReader):
    folder = "imagenet-sketch"
    image_dir = "images"
    test_only = True

    def read(self, root: Path) -> Splits:
        wnids, names = wnid_classes(self.dataset_dir(root), self.image_root(root), "", self.registered_name)
        return Splits([], [], folder_records(self.image_root(root), "", wnids, names), names)
