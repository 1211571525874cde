"""Tiny image trees in the exact on-disk layouts of CoOp's DATASETS.md, for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

SPLIT_SIZES = {"train": 6, "val": 3, "test": 2}  # images per class
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
WNID_NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]

# (folder, image dir, split file, raw class names as they appear in the split file)
JSON_DATASETS = {
    "caltech101": (
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        ["airplanes", "Faces", "Leopards", "Motorbikes", "dalmatian"],
    ),
    "oxford_pets": (
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        ["abyssinian", "american_bulldog", "beagle", "bengal", "boxer"],
    ),
    "stanford_cars": (
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Audi R8 Coupe"],
    ),
    "oxford_flowers": (
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "rose"],
    ),
    "food101": (
        "food-101",
        "images",
        "split_zhou_Food101.json",
        ["apple_pie", "baby_back_ribs", "baklava"],
    ),
    "sun397": (
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        ["abbey", "airplane_cabin", "airport_terminal"],
    ),
    "dtd": (
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        ["banded", "blotchy", "braided"],
    ),
    "eurosat": (
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "SeaLake"],
    ),
    "ucf101": (
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        ["Apply_Eye_Makeup", "PlayingCello", "Basketball"],
    ),
}
EXPECTED_NAMES = {
    "caltech101": ["airplane", "face", "leopard", "motorbike", "dalmatian"],
    "eurosat": [
        "Annual Crop Land",
        "Forest",
        "Herbaceous Vegetation Land",
        "Highway or Road",
        "Sea or Lake",
    ],
    "ucf101": ["Apply Eye Makeup", "Playing Cello", "Basketball"],
    "oxford_pets": ["abyssinian", "american bulldog", "beagle", "bengal", "boxer"],
    "food101": ["apple pie", "baby back ribs", "baklava"],
}


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (12, 10), colour).save(path, fmt)


def make_json_dataset(root: Path, name: str) -> None:
    folder, image_dir, split_file, classes = JSON_DATASETS[name]
    base = root / folder / image_dir if image_dir else root / folder
    data: dict[str, list] = {"train": [], "val": [], "test": []}
    n = 0
    for label, cname in enumerate(classes):
        for split, count in SPLIT_SIZES.items():
            for i in range(count):
                sub = (
                    "cars_train"
                    if name == "stanford_cars" and split != "test"
                    else ("cars_test" if name == "stanford_cars" else cname.replace(" ", "_"))
                )
                rel = f"{sub}/{label:02d}_{split}_{i}.jpg"
                image(base / rel, n)
                n += 1
                data[split].append([rel, label, cname])
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / split_file).write_text(json.dumps(data))


def make_imagenet(root: Path) -> None:
    d = root / "imagenet"
    d.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, WNID_NAMES)))
    n = 0
    for split, count in (("train", 7), ("val", 2)):
        for w in WNIDS:
            for i in range(count):
                image(d / "images" / split / w / f"{w}_{i}.JPEG", n)
                n += 1


def make_imagenet_variants(root: Path) -> None:
    names = "".join(f"{w} {n}\n" for w, n in zip(WNIDS, WNID_NAMES))
    v2 = root / "imagenetv2"
    (v2).mkdir(parents=True, exist_ok=True)
    (v2 / "classnames.txt").write_text(names)
    for label in range(len(WNIDS)):
        for i in range(2):
            image(
                v2 / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg",
                label * 10 + i,
            )
    for folder, image_dir, wnids in (
        ("imagenet-sketch", "images", WNIDS),
        ("imagenet-adversarial", "imagenet-a", WNIDS[1:]),
        ("imagenet-rendition", "imagenet-r", WNIDS[:3]),
    ):
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "classnames.txt").write_text(names)
        for w in wnids:
            for i in range(3):
                image(
                    d / image_dir / w / f"{i}.png"
                    if folder == "imagenet-sketch"
                    else d / image_dir / w / f"{i}.jpg",
                    i,
                )


AIRCRAFT = ["707-320", "727-200", "A300B4", "Cessna 172", "DC-3"]


def make_aircraft(root: Path) -> None:
    d = root / "fgvc_aircraft"
    d.mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    n = 1000000
    for split, count in SPLIT_SIZES.items():
        lines = []
        for v in AIRCRAFT:
            for _ in range(count):
                image(d / "images" / f"{n}.jpg", n)
                lines.append(f"{n} {v}")
                n += 1
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def make_all(root: Path) -> Path:
    for name in JSON_DATASETS:
        make_json_dataset(root, name)
    make_imagenet(root)
    make_imagenet_variants(root)
    make_aircraft(root)
    return root
