"""ImageNetV2 matched-frequency (Recht et al. 2019), test only:
imagenetv2-matched-frequency-format-val/<0..999>/ where the folder index is the ImageNet label,
with ImageNet's classnames.txt (file order = label order) in the dataset folder."""

from pathlib import Path

from ...registry import DATASETS
from ..base import (
    DatasetError,
    DatasetReader,
    Record,
    Splits,
    list_dirs,
    list_images,
    read_classnames_txt,
)


@DATASETS.register("imagenetv2")
class ImageNetV2(DatasetReader):
    folder = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"
    test_only = True

    def read(self, root: Path) -> Splits:
        names = list(
            read_classnames_txt(
                self.dataset_dir(root) / "classnames.txt", self.registered_name
            ).values()
        )
        img = self.image_root(root)
        if not img.is_dir():
            raise DatasetError(f"{self.registered_name}: image folder {img} does not exist")
        test = []
        for folder in sorted(
            list_dirs(img), key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f)
        ):
            if not folder.isdigit() or int(folder) >= len(names):
                raise DatasetError(
                    f"{self.registered_name}: folder {img / folder} is not a label index "
                    f"0..{len(names) - 1}"
                )
            label = int(folder)
            test += [
                Record(f"{folder}/{f}", label, names[label]) for f in list_images(img / folder)
            ]
        return Splits([], [], test, names)
