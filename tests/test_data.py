"""Dataset readers on generated trees in the exact CoOp layouts; few-shot, base/new, caching,
custom datasets, transforms and every bad-input case."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from promptalign.data import (
    DatasetError,
    ImageDataset,
    build_transform,
    collate,
    list_datasets,
    load_custom_dataset,
    load_dataset,
    make_loader,
)
from promptalign.data.base import get_reader

from data_fixtures import (
    AIRCRAFT,
    EXPECTED_NAMES,
    JSON_DATASETS,
    WNID_NAMES,
    image,
    make_all,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_all(tmp_path_factory.mktemp("data"))


EXPECTED = {  # name: (classes, train, val, test)
    **{
        n: (len(c[3]), len(c[3]) * 6, len(c[3]) * 3, len(c[3]) * 2)
        for n, c in JSON_DATASETS.items()
    },
    "imagenet": (4, 28, 8, 8),
    "fgvc_aircraft": (5, 30, 15, 10),
    "imagenetv2": (4, 0, 0, 8),
    "imagenet_sketch": (4, 0, 0, 12),
    "imagenet_a": (3, 0, 0, 9),
    "imagenet_r": (3, 0, 0, 9),
}


def test_all_fifteen_readers_are_registered():
    benchmark = [d for d in list_datasets() if not d.startswith("synthetic_")]
    assert sorted(benchmark) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_counts_and_images_exist(root, name):
    ds = load_dataset(name, root)
    assert (ds.num_classes, len(ds.train), len(ds.val), len(ds.test)) == EXPECTED[name]
    for r in ds.train[:3] + ds.test[:3]:
        assert (ds.image_root / r.path).is_file()
        assert 0 <= r.label < ds.num_classes
        assert ds.classnames[r.label] == r.classname.replace("_", " ")
    assert "{}" in ds.template


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_class_name_cleanups(root, name):
    assert load_dataset(name, root).classnames == EXPECTED_NAMES[name]


def test_imagenet_family_names_and_labels(root):
    assert load_dataset("imagenet", root).classnames == WNID_NAMES
    assert load_dataset("imagenet_a", root).classnames == WNID_NAMES[1:]  # 200-way style subset
    assert load_dataset("imagenet_r", root).classnames == WNID_NAMES[:3]
    v2 = load_dataset("imagenetv2", root)
    assert all(r.path.split("/")[0] == str(r.label) for r in v2.test)
    assert load_dataset("fgvc_aircraft", root).classnames == AIRCRAFT


def test_templates_per_dataset():
    assert get_reader("dtd").template == "{} texture."
    assert get_reader("eurosat").template == "a centered satellite photo of {}."
    assert get_reader("ucf101").template == "a photo of a person doing {}."
    assert get_reader("imagenet_sketch").template == "a photo of a {}."


def _coop_reference(items, k, seed):
    """CoOp's generate_fewshot_dataset, written against python's global random as CoOp does."""
    random.seed(seed)
    out = []
    for split_items, shots in ((items[0], k), (items[1], min(k, 4))):
        tracker = {}
        for it in split_items:
            tracker.setdefault(it.label, []).append(it)
        sampled = []
        for _, group in tracker.items():
            sampled.extend(random.sample(group, shots) if len(group) >= shots else group)
        out.append(sampled)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 2, 4, 16])
def test_few_shot_follows_coop_rule(root, tmp_path, seed, shots):
    full = get_reader("oxford_pets").read(root)
    ds = load_dataset("oxford_pets", root, shots=shots, seed=seed, cache_dir=tmp_path)
    ref_train, ref_val = _coop_reference((full.train, full.val), shots, seed)
    assert [r.path for r in ds.train] == [r.path for r in ref_train]
    assert [r.path for r in ds.val] == [r.path for r in ref_val]
    per_class = min(shots, 6)
    assert len(ds.train) == 5 * per_class and len(ds.val) == 5 * min(shots, 4, 3)
    again = load_dataset("oxford_pets", root, shots=shots, seed=seed, cache_dir=tmp_path / "other")
    assert again.train == ds.train  # deterministic without the cache too


def test_seeds_select_different_images(root, tmp_path):
    a = load_dataset("dtd", root, shots=2, seed=1, cache_dir=tmp_path)
    b = load_dataset("dtd", root, shots=2, seed=2, cache_dir=tmp_path)
    assert [r.path for r in a.train] != [r.path for r in b.train]


def test_base_new_odd_class_count_and_shared_sample(root, tmp_path):
    full = load_dataset("caltech101", root, shots=4, seed=1, cache_dir=tmp_path)
    base = load_dataset("caltech101", root, shots=4, seed=1, subsample="base", cache_dir=tmp_path)
    new = load_dataset("caltech101", root, shots=4, seed=1, subsample="new", cache_dir=tmp_path)
    assert full.num_classes == 5
    assert base.num_classes == math.ceil(5 / 2) == 3 and new.num_classes == 2
    assert base.classnames == full.classnames[:3] and new.classnames == full.classnames[3:]
    assert {r.label for r in new.train} == {0, 1} and {r.label for r in new.test} == {0, 1}
    # base and new come from the one all-class sample
    assert {r.path for r in base.train} | {r.path for r in new.train} == {
        r.path for r in full.train
    }
    assert len(base.test) == 3 * 2 and len(new.test) == 2 * 2


def test_test_only_dataset_base_new(root):
    new = load_dataset("imagenet_sketch", root, subsample="new")
    assert new.classnames == WNID_NAMES[2:]
    assert {r.label for r in new.test} == {0, 1}


def test_cache_is_portable_json_outside_the_data_and_survives_moving_the_root(
    tmp_path, monkeypatch
):
    from promptalign.data.base import default_cache_dir

    cache_root = tmp_path / "cache"
    monkeypatch.setenv("PROMPTALIGN_CACHE_DIR", str(cache_root))
    assert default_cache_dir() == cache_root
    src = tmp_path / "a"
    from data_fixtures import make_json_dataset

    make_json_dataset(src, "food101")
    first = load_dataset("food101", src, shots=2, seed=3)
    assert not list(src.rglob("shot_*"))  # nothing written into the user's data folder
    (cache,) = (cache_root / "fewshot" / "food101").glob("shot_2-seed_3-*.json")
    data = json.loads(cache.read_text())
    assert all(not Path(p).is_absolute() for p, _, _ in data["train"])
    assert data["key"]["shots"] == 2 and data["key"]["seed"] == 3
    # prove the cache is read when nothing changed: a marked entry comes back
    marked = json.loads(cache.read_text())
    marked["train"] = marked["train"][:1]
    cache.write_text(json.dumps(marked))
    assert len(load_dataset("food101", src, shots=2, seed=3).train) == 1
    cache.write_text(json.dumps(data))
    moved = tmp_path / "b"
    shutil.move(str(src), str(moved))
    second = load_dataset("food101", moved, shots=2, seed=3)
    assert second.train == first.train and second.image_root == moved / "food-101" / "images"
    assert all((second.image_root / r.path).is_file() for r in second.train)


def test_xdg_cache_home_is_the_default_cache(monkeypatch, tmp_path):
    from promptalign.data.base import default_cache_dir

    monkeypatch.delenv("PROMPTALIGN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "promptalign"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "promptalign"


def _imagefolder(root: Path, classes: list[str], n: int = 4) -> None:
    for label, c in enumerate(classes):
        for i in range(n):
            image(root / "train" / c / f"{i}.png", label * 10 + i)
        image(root / "test" / c / "0.png", label)


def test_added_class_folder_samples_afresh_with_correct_labels(tmp_path):
    """Issue 12 item 1: a stale few-shot cache was reused after a class folder was added."""
    _imagefolder(tmp_path / "shapes", ["blue", "green", "red", "yellow"])
    first = load_custom_dataset(tmp_path / "shapes", shots=2, seed=1)
    assert len(first.train) == 8
    _imagefolder(tmp_path / "shapes", ["blue", "green", "purple", "red", "yellow"])
    second = load_custom_dataset(tmp_path / "shapes", shots=2, seed=1)
    assert (
        second.classnames == ["blue", "green", "purple", "red", "yellow"]
        and len(second.train) == 10
    )
    for r in second.train:  # every label matches the folder the image is in
        assert r.path.split("/")[1] == second.classnames[r.label]


def test_changed_split_file_samples_afresh(tmp_path):
    rows, split = ["path,label,classname"], {"train": [], "val": [], "test": []}
    for label, c in enumerate(["red", "blue"]):
        for i in range(4):
            rel = f"img/{c}{i}.jpg"
            image(tmp_path / rel, i)
            rows.append(f"{rel},{label},{c}")
            split["train" if i < 3 else "test"].append([rel, label, c])
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "split.json").write_text(json.dumps(split))
    a = load_custom_dataset(
        tmp_path / "list.csv", split_file=tmp_path / "split.json", shots=2, seed=1
    )
    assert {r.path for r in a.train} <= {p for p, _, _ in split["train"]}
    # a corrected split file: other images in train; the sample must come from the new file
    split["train"], split["test"] = split["test"] + split["train"][:1], split["train"][1:]
    (tmp_path / "split.json").write_text(json.dumps(split))
    b = load_custom_dataset(
        tmp_path / "list.csv", split_file=tmp_path / "split.json", shots=2, seed=1
    )
    assert {r.path for r in b.train} <= {p for p, _, _ in split["train"]}
    assert {r.path for r in b.train} != {r.path for r in a.train}


def test_corrupt_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog):
    """Issue 14 item 5: a corrupt cache JSON raised a raw JSONDecodeError. It is only a cache:
    it is ignored with a warning naming the file, and rewritten."""
    from data_fixtures import make_json_dataset

    make_json_dataset(tmp_path / "d", "dtd")
    first = load_dataset("dtd", tmp_path / "d", shots=2, seed=1, cache_dir=tmp_path / "c")
    (cache,) = (tmp_path / "c").rglob("*.json")
    cache.write_text('{"train": [["x.jpg", 0')
    with caplog.at_level(logging.WARNING, logger="promptalign.data.base"):
        again = load_dataset("dtd", tmp_path / "d", shots=2, seed=1, cache_dir=tmp_path / "c")
    assert again.train == first.train
    assert any(
        str(cache) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    assert json.loads(cache.read_text())["key"]["seed"] == 1  # rebuilt


def test_summary_table_is_logged(root, caplog):
    with caplog.at_level(logging.INFO, logger="promptalign.data.base"):
        ds = load_dataset("eurosat", root, shots=2, seed=1, subsample="base")
    text = caplog.text
    assert "classes" in text and "train" in text and "eurosat" in text
    assert ds.summary().splitlines()[1].split()[2:] == ["3", "6", "6", "6", "2"]


# ----------------------------------------------------------------------- bad input
def test_missing_root_and_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="data root .* does not exist"):
        load_dataset("dtd", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="dtd: dataset folder .*dtd does not exist"):
        load_dataset("dtd", tmp_path)


def test_missing_and_malformed_split_files(tmp_path):
    (tmp_path / "dtd").mkdir()
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json does not exist"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{broken")
    with pytest.raises(DatasetError, match="dtd: split file .* is not valid JSON"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetError, match="'train', 'val' and 'test'"):
        load_dataset("dtd", tmp_path)
    bad = {"train": [["a.jpg", "zero", "x"]], "val": [], "test": []}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"train\[0\].*not \[relpath, int label, classname\]"):
        load_dataset("dtd", tmp_path)


def test_labels_outside_the_class_list(tmp_path):
    (tmp_path / "dtd").mkdir()
    bad = {"train": [["a/1.jpg", 0, "banded"], ["a/2.jpg", 2, "woven"]], "val": [], "test": []}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"labels \[1\] never occur"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "fgvc_aircraft").mkdir()
    (tmp_path / "fgvc_aircraft" / "variants.txt").write_text("707-320\n")
    for s in ("train", "val", "test"):
        (tmp_path / "fgvc_aircraft" / f"images_variant_{s}.txt").write_text("1 747-400\n")
    with pytest.raises(DatasetError, match=r"images_variant_train.txt:1: '1 747-400'"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_path_escaping_the_dataset_folder(tmp_path):
    (tmp_path / "dtd").mkdir()
    bad = {"train": [["../../etc/passwd", 0, "banded"]], "val": [], "test": []}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"train\[0\]: path '../../etc/passwd' escapes"):
        load_dataset("dtd", tmp_path)


def test_unknown_imagenet_folder(tmp_path):
    from data_fixtures import make_imagenet

    make_imagenet(tmp_path)
    (tmp_path / "imagenet" / "images" / "train" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="n99999999.*classnames.txt"):
        load_dataset("imagenet", tmp_path)


def test_corrupt_image_errors_or_is_skipped_and_counted(tmp_path):
    from data_fixtures import make_json_dataset

    make_json_dataset(tmp_path, "dtd")
    ds = load_dataset("dtd", tmp_path)
    victim = ds.image_root / ds.test[1].path
    victim.write_bytes(b"not a jpeg")
    pre = build_transform(_pre(), train=False)
    strict = ImageDataset(ds.name, ds.image_root, ds.test, pre)
    with pytest.raises(DatasetError, match=rf"dtd: cannot read image .*{victim.name} \(entry 1"):
        strict[1]
    lenient = ImageDataset(ds.name, ds.image_root, ds.test, pre, skip_corrupt=True)
    batches = list(make_loader(lenient, batch_size=4, train=False))
    assert sum(b["skipped"] for b in batches) == 1
    assert sum(len(b["label"]) for b in batches) == len(ds.test) - 1
    assert lenient.skipped == [str(victim)]


# ----------------------------------------------------------------------- custom datasets
def test_custom_imagefolder_with_split_folders(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for c in ("cat", "dog", "emu"):
            for i in range(n):
                image(tmp_path / "pets" / split / c / f"{i}.png", i)
    ds = load_custom_dataset(tmp_path / "pets", shots=2, seed=1)
    assert ds.classnames == ["cat", "dog", "emu"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 0, 6)


def test_custom_flat_imagefolder_is_evaluation_only(tmp_path):
    for c in ("a_b", "c"):
        image(tmp_path / "flat" / c / "0.jpg", 1)
    ds = load_custom_dataset(tmp_path / "flat")
    assert ds.classnames == ["a b", "c"] and len(ds.test) == 2 and not ds.train


def test_custom_csv_and_split_file(tmp_path):
    rows = ["path,label,classname"]
    split = {"train": [], "val": [], "test": []}
    for label, c in enumerate(["red", "blue"]):
        for i in range(4):
            rel = f"img/{c}{i}.jpg"
            image(tmp_path / rel, i)
            rows.append(f"{rel},{label},{c}")
            split["train" if i < 3 else "test"].append([rel, label, c])
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    evaluation = load_custom_dataset(tmp_path / "list.csv")
    assert evaluation.classnames == ["red", "blue"] and len(evaluation.test) == 8
    (tmp_path / "split.json").write_text(json.dumps(split))
    ds = load_custom_dataset(
        tmp_path / "list.csv", split_file=tmp_path / "split.json", shots=1, seed=2
    )
    assert (len(ds.train), len(ds.test)) == (2, 2)
    split["test"].append(["img/unlisted.jpg", 0, "red"])
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="unlisted.jpg.*not listed"):
        load_custom_dataset(tmp_path / "list.csv", split_file=tmp_path / "split.json")
    (tmp_path / "bad.csv").write_text("a.jpg,1,x\nb.jpg,notanumber\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: expected 'path,label\[,classname\]'"):
        load_custom_dataset(tmp_path / "bad.csv")


# ----------------------------------------------------------------------- transforms / loading
def _pre():
    from promptalign.backbone import Preprocess

    return Preprocess(image_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_transforms_follow_backbone_preprocess(root, tiny):
    ds = load_dataset("oxford_flowers", root)
    for train in (True, False):
        t = build_transform(tiny.preprocess, train=train)
        x = ImageDataset(ds.name, ds.image_root, ds.test, t)[0]["image"]
        assert x.shape == (3, *tiny.preprocess.image_size)
    names = [type(s).__name__ for s in build_transform(tiny.preprocess, train=True).transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    rrc = build_transform(tiny.preprocess, train=True).transforms[0]
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation.value == "bicubic"
    assert ds.crop_scale == (0.08, 1.0)  # CoOp/Dassl's crop for the photograph datasets
    rrc = build_transform(tiny.preprocess, train=True, crop_scale=(0.5, 1.0)).transforms[0]
    assert rrc.scale == (0.5, 1.0)
    names = [type(s).__name__ for s in build_transform(tiny.preprocess, train=False).transforms]
    assert names[:2] == ["Resize", "CenterCrop"]


def test_loader_batches_and_seeded_shuffle(root):
    ds = load_dataset("sun397", root)
    data = ImageDataset(ds.name, ds.image_root, ds.train, build_transform(_pre(), train=False))
    a = [b["index"].tolist() for b in make_loader(data, 5, train=True, seed=3)]
    b = [b["index"].tolist() for b in make_loader(data, 5, train=True, seed=3)]
    assert a == b and sorted(sum(a, [])) == list(range(len(ds.train)))
    batch = next(iter(make_loader(data, 4, train=False)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.long
    assert collate([None])["skipped"] == 1


def _textured(folder: Path, n: int = 10) -> ImageDataset:
    """Noise images (solid colours would hide the augmentation) as a training dataset."""
    from PIL import Image

    from promptalign.data import Record

    g = torch.Generator().manual_seed(5)
    recs = []
    for i in range(n):
        px = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"{i}.png")
        recs.append(Record(f"{i}.png", i % 3, f"c{i % 3}"))
    return ImageDataset("noise", folder, recs, build_transform(_pre(), train=True))


def _two_epochs(data, workers: int, extra_iter: bool) -> list[tuple[list[int], torch.Tensor]]:
    loader = make_loader(data, 4, train=True, seed=7, workers=workers)
    out = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        if extra_iter:  # what tqdm.auto does: one more iter() that is never consumed
            iter(loader)
        for b in loader:
            out.append((b["index"].tolist(), b["image"]))
    return out


def test_training_order_and_augmentation_independent_of_workers_and_extra_iter(tmp_path):
    """Issue 12 item 2: the progress bar's extra iter() and the worker count changed the order
    and the augmented pixels. Both are now a function of (seed, epoch, index) only."""
    data = _textured(tmp_path)
    ref = _two_epochs(data, workers=0, extra_iter=False)
    assert sorted(sum((i for i, _ in ref[: len(ref) // 2]), [])) == list(range(len(data)))
    assert [i for i, _ in ref[: len(ref) // 2]] != [
        i for i, _ in ref[len(ref) // 2 :]
    ]  # epochs differ
    g0 = torch.get_rng_state()
    for workers, extra in ((0, True), (2, False), (2, True)):
        got = _two_epochs(data, workers=workers, extra_iter=extra)
        assert [i for i, _ in got] == [i for i, _ in ref], (workers, extra)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref)), (workers, extra)
    assert torch.equal(torch.get_rng_state(), g0)  # the loaders never touched the global RNG


def test_same_sample_is_augmented_differently_across_epochs(tmp_path):
    data = _textured(tmp_path)
    x0 = data[(0, 11)]["image"]
    assert torch.equal(x0, data[(0, 11)]["image"]) and not torch.equal(x0, data[(0, 12)]["image"])


def test_sampler_shards_for_data_parallel():
    from promptalign.data.loader import EpochSampler

    shards = [EpochSampler(10, seed=3, epoch=2, num_replicas=3, rank=r).order() for r in range(3)]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    assert EpochSampler(10, seed=3, epoch=2).order() == EpochSampler(10, seed=3, epoch=2).order()


def test_training_without_a_train_split_says_how_to_fix(tmp_path):
    """Issue 12 item 8: a CSV without split file failed with 'num_samples should be a positive
    integer value'."""
    image(tmp_path / "a.png", 1)
    (tmp_path / "list.csv").write_text("a.png,0,cat\n")
    ds = load_custom_dataset(tmp_path / "list.csv", shots=1)
    data = ImageDataset(ds.name, ds.image_root, ds.train, build_transform(_pre(), train=True))
    with pytest.raises(
        DatasetError, match=r"list: no training images.*--split-file / data.split_file"
    ):
        make_loader(data, 4, train=True, seed=1)


def test_skipped_paths_travel_with_the_batches_from_workers(tmp_path):
    from data_fixtures import make_json_dataset

    make_json_dataset(tmp_path, "dtd")
    ds = load_dataset("dtd", tmp_path)
    victim = ds.image_root / ds.test[2].path
    victim.write_bytes(b"not an image")
    lenient = ImageDataset(
        ds.name, ds.image_root, ds.test, build_transform(_pre(), train=False), skip_corrupt=True
    )
    batches = list(make_loader(lenient, batch_size=4, train=False, workers=2))
    assert sum((b["skipped_paths"] for b in batches), []) == [str(victim)]
    assert lenient.skipped == []  # read in worker processes: the batches carry the paths


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "a.png,0,x\nb.png,1,y\na.png,1,y\n",
            r"list.csv: 'a.png' is listed with conflicting labels 0 and 1 \(rows 1 and 3\)",
        ),
        ("a.png,0,x\na.png,0,x\n", r"'a.png' is listed twice \(rows 1 and 2\)"),
        ("path,label\na.png,0\nb.png,5\n", r"list.csv:3: label 5 is out of range"),
        ("a.png,0,x\nb.png,0,y\n", r"list.csv:2: label 0 is named 'y' here and 'x' in row 1"),
    ],
)
def test_bad_csv_rows_are_named(tmp_path, text, match):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_custom_dataset(tmp_path / "list.csv")


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
def test_eval_resize_matches_open_clip(mode, size):
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image

    from promptalign.backbone import Preprocess
    from promptalign.data import build_transform

    rng = np.random.default_rng(0)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pre = Preprocess(image_size=size, mean=mean, std=std, interpolation="bicubic", resize_mode=mode)
    ours = build_transform(pre, train=False)
    theirs = image_transform(
        size, is_train=False, mean=mean, std=std, resize_mode=mode, interpolation="bicubic"
    )
    for hw in [(300, 451), (517, 233)]:  # landscape and portrait, odd sizes (rounding, padding)
        img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        a, b = ours(img), theirs(img)
        assert tuple(a.shape) == tuple(b.shape) == (3, *size)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if mode == "longest":  # fits inside and pads: the border is black (normalised)
        tall = ours(Image.fromarray(rng.integers(0, 256, (400, 100, 3), dtype=np.uint8)))
        torch.testing.assert_close(tall[0, :, 0], torch.full((size[0],), -mean[0] / std[0]))
