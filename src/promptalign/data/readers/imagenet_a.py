"""ImageNet-A (Hendrycks et al. 2021), test only: imagenet-a/<wnid>/ (200 sorted folders),
evaluated 200-way with names from ImageNet's classnames.txt in the dataset folder."""

from pathlib import Path

from ...registry import DATASETS
from ..base import DatasetReader, Splits, folder_records
from .imagenet import wnid_classes


@DATASETS.register("imagenet_a")
class ImageNetA(DatasetReader):
    folder = "imagenet-adversarial"
    image_dir = "imagenet-a"
    test_only = True

    def read(self, root: Path) -> Splits:
        wnids, names = wnid_classes(self.dataset_dir(root), self.image_root(root), "", self.registered_name)
        return Splits([], [], folder_records(self.image_root(root), "", wnids, names), names)
