"""FGVC-Aircraft (Maji et al. 2013), variant level, with the official split files:
variants.txt (label order) and images_variant_{train,val,test}.txt ("<image id> <variant>")."""

from pathlib import Path

from ...registry import DATASETS
from ..base import DatasetError, DatasetReader, Record, Splits, read_dataset_text


@DATASETS.register("fgvc_aircraft")
class FGVCAircraft(DatasetReader):
    folder = "fgvc_aircraft"
    image_dir = "images"
    template = "a photo of a {}, a type of aircraft."

    def read(self, root: Path) -> Splits:
        d = self.dataset_dir(root)
        vpath = d / "variants.txt"
        if not vpath.is_file():
            raise DatasetError(f"{self.registered_name}: {vpath} does not exist")
        text = read_dataset_text(vpath, self.registered_name)
        names = [line.strip() for line in text.splitlines() if line.strip()]
        index = {n: i for i, n in enumerate(names)}
        out = {}
        for split in ("train", "val", "test"):
            path = d / f"images_variant_{split}.txt"
            if not path.is_file():
                raise DatasetError(f"{self.registered_name}: split file {path} does not exist")
            recs = []
            for i, line in enumerate(read_dataset_text(path, self.registered_name).splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split(" ", 1)
                if len(parts) != 2 or parts[1] not in index:
                    raise DatasetError(
                        f"{self.registered_name}: {path}:{i}: {line!r} is not "
                        f"'<image id> <variant>' with a variant listed in {vpath}"
                    )
                recs.append(Record(f"{parts[0]}.jpg", index[parts[1]], parts[1]))
            out[split] = recs
        return Splits(out["train"], out["val"], out["test"], names)
