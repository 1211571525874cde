"""ImageNet-1k (Deng et al. 2009) in CoOp's layout: images/train/<wnid>/, images/val/<wnid>/ and
classnames.txt ("<wnid> <name>" lines). Labels follow the sorted wnid folders; file lists are
sorted so a seed always selects the same images. val is the test set (as in CoOp)."""

from pathlib import Path

from ...registry import DATASETS
from ..base import (
    DatasetError,
    DatasetReader,
    Splits,
    folder_records,
    list_dirs,
    read_classnames_txt,
)


def wnid_classes(
    root_dir: Path, image_root: Path, sub: str, dataset: str
) -> tuple[list[str], list[str]]:
    """Sorted wnid folders under ``image_root/sub`` and their names from
    ``root_dir/classnames.txt``."""
    names = read_classnames_txt(root_dir / "classnames.txt", dataset)
    folder = image_root / sub if sub else image_root
    if not folder.is_dir():
        raise DatasetError(f"{dataset}: image folder {folder} does not exist")
    wnids = list_dirs(folder)
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DatasetError(
            f"{dataset}: folders {unknown[:5]} in {folder} are not in {root_dir / 'classnames.txt'}"
        )
    return wnids, [names[w] for w in wnids]


class WnidFolderReader(DatasetReader):
    """Test-only ImageNet variants laid out as ``<image_dir>/<wnid>/`` (sorted folders give the
    labels) with ImageNet's classnames.txt in the dataset folder."""

    test_only = True

    def read(self, root: Path) -> Splits:
        wnids, names = wnid_classes(
            self.dataset_dir(root), self.image_root(root), "", self.registered_name
        )
        return Splits([], [], folder_records(self.image_root(root), "", wnids, names), names)


@DATASETS.register("imagenet")
class ImageNet(DatasetReader):
    folder = "imagenet"
    image_dir = "images"
    template = "a photo of a {}."

    def read(self, root: Path) -> Splits:
        d, img = self.dataset_dir(root), self.image_root(root)
        wnids, names = wnid_classes(d, img, "train", self.registered_name)
        train = folder_records(img, "train", wnids, names)
        val_wnids, _ = wnid_classes(d, img, "val", self.registered_name)
        if val_wnids != wnids:
            raise DatasetError(
                f"{self.registered_name}: {img / 'val'} and {img / 'train'} hold different "
                "class folders"
            )
        test = folder_records(img, "val", wnids, names)
        return Splits(train=train, val=test, test=test, classnames=names)
