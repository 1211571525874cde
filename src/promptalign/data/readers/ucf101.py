"""UCF101 mid-frames (Soomro et al. 2012) with CoOp's split; CamelCase names become words joined
by '_'."""

from pathlib import Path

from ...registry import DATASETS
from ..base import SplitJsonReader, Splits, camel_to_words


@DATASETS.register("ucf101")
class UCF101(SplitJsonReader):
    folder = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    template = "a photo of a person doing {}."

    def read(self, root: Path) -> Splits:
        splits = super().read(root)
        # split files hold "Apply_Eye_Makeup"; older ones "ApplyEyeMakeup": normalise both
        fix = {c: c if "_" in c else camel_to_words(c) for c in splits.classnames}
        for name in ("train", "val", "test"):
            setattr(
                splits,
                name,
                [r.__class__(r.path, r.label, fix[r.classname]) for r in splits.split(name)],
            )
        splits.classnames = [fix[c] for c in splits.classnames]
        return splits
