"""How often the training crop still shows what its label says: zero-shot accuracy on crops.

For a dataset and a frozen backbone, the zero-shot classifier (the dataset's template) is scored
on the few-shot training images without augmentation and under the training RandomResizedCrop at
each ``--scales`` lower bound (``data.crop_scale = [lo, 1]``), several draws per image. Where a
crop scale loses many points against the un-augmented images, its crops often cut out the object:
prompts trained on them learn from crops their label no longer describes. Prints one JSON line
per crop scale.

    python benchmarks/crop_label_noise.py --data-root bench-data --arch tiny-shapes-v3 \
        --subsample base --scales 0.08 0.25 0.5 1.0

Measured for issue 18 (2026-11-23, tiny-shapes-v3, colour x shape, the 24 base classes, 16 shots,
seed 1, 384 images x 8 draws; 53 s on one CPU thread), zero-shot accuracy on the training images:

    crop_scale   none    [0.08, 1]  [0.25, 1]  [0.5, 1]  [1, 1] (aspect jitter and flip only)
    accuracy     62.50   46.78      51.20      55.99     61.88

CoOp/Dassl's 8-100 % crops cost 15.7 points here: an object covers 5-18 % of a 48 px image.
"""

from __future__ import annotations

import argparse
import json

import torch

import promptalign
from promptalign.data import ImageDataset, build_transform, load_dataset
from promptalign.methods.prompts import template_ensemble


def accuracy(bb, ds, classes: torch.Tensor, transform, draws: int, seed: int) -> float:
    """Zero-shot accuracy (%) over ``draws`` passes of ``transform`` over the training images."""
    torch.manual_seed(seed)  # RandomResizedCrop draws from torch's global generator
    images = ImageDataset(ds.name, ds.image_root, ds.train, transform)
    correct = total = 0
    for _ in range(draws):
        for i in range(0, len(images), 256):
            items = [images[j] for j in range(i, min(i + 256, len(images)))]
            x = torch.stack([it["image"] for it in items])
            y = torch.tensor([int(it["label"]) for it in items])
            with torch.no_grad():
                f = torch.nn.functional.normalize(bb.encode_image(x), dim=-1)
            correct += int(((f @ classes.t()).argmax(-1) == y).sum())
            total += len(items)
    return 100.0 * correct / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic_colour_shapes")
    p.add_argument("--data-root", required=True)
    p.add_argument("--arch", default="tiny-shapes-v3")
    p.add_argument("--weights", default=None)
    p.add_argument("--subsample", default="base", choices=["all", "base", "new"])
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--draws", type=int, default=8, help="crops drawn per training image")
    p.add_argument("--scales", type=float, nargs="+", default=[0.08, 0.25, 0.5, 1.0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bb = promptalign.load_backbone(a.arch, a.weights)
    ds = load_dataset(a.dataset, a.data_root, shots=a.shots, seed=a.seed, subsample=a.subsample)
    classes = template_ensemble(bb, ds.classnames, (ds.template,))
    pre = bb.preprocess
    rows = [("none", accuracy(bb, ds, classes, build_transform(pre, train=False), 1, a.seed))]
    for lo in a.scales:
        tf = build_transform(pre, train=True, crop_scale=(lo, 1.0))
        rows.append(([lo, 1.0], accuracy(bb, ds, classes, tf, a.draws, a.seed)))
    for scale, acc in rows:
        print(
            json.dumps(
                {
                    "dataset": a.dataset,
                    "arch": a.arch,
                    "subsample": a.subsample,
                    "images": len(ds.train),
                    "crop_scale": scale,
                    "zero_shot_accuracy": round(acc, 2),
                    "minus_uncropped": round(acc - rows[0][1], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
