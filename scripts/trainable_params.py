"""Trainable parameters of every registered method on a random ViT-B/16 (open_clip ``ViT-B-16``,
no pretrained weights, so it builds offline): the figures of the methods tables in README.md and
docs/methods.md, and what tests/test_docs.py checks those tables against.

    python scripts/trainable_params.py            # one "name count" line per method
    python scripts/trainable_params.py --classes 100 --shots 16

Methods whose trainable size grows with the classes or the data say so: a class-specific context
grows with K, and Tip-Adapter-F's cache keys (``shots x K x D``) exist only once its cache is built
from the training features, so its figure is that cache's size for ``--shots`` images per class.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

import promptalign
from promptalign.methods import create_method, list_methods
from promptalign.registry import METHODS


def per_image_parameters(method) -> int:
    """Trainable parameters per training image of a method whose trainable state is built from the
    training features (Tip-Adapter-F's cache keys): its engine hook ``fit_before_training`` run on
    one random image of each of two classes, divided by the two images (zero for zero-shot)."""
    size = method.backbone.preprocess.image_size

    def batches(view: int = 0, crop_scale=None):
        g = torch.Generator().manual_seed(view)
        yield torch.randn(2, 3, *size, generator=g), torch.tensor([0, 1])

    with torch.no_grad():
        method.fit_before_training(batches)
    return method.num_trainable() // 2


def count(
    names: list[str] | None = None, classes: int = 100, shots: int = 16, arch: str = "ViT-B-16"
) -> dict[str, int]:
    """``{method: trainable parameters}`` on a random ``arch`` with ``classes`` classes (and, for
    a method whose trainable state is built from the training images, ``shots`` per class)."""
    torch.manual_seed(0)
    bb = promptalign.load_backbone(arch, None)
    classnames = [f"class {i}" for i in range(classes)]
    out = {}
    for name in names or list_methods():
        n = create_method(name, bb, classnames).num_trainable()
        if n == 0:  # nothing to learn before training data arrive (a cache), or zero-shot
            fields = {f.name for f in dataclasses.fields(METHODS.get(name).config_class)}
            one_view = {"augment_views": 1} if "augment_views" in fields else {}  # same key count
            method = create_method(name, bb, ["a", "b"], **one_view)
            n = per_image_parameters(method) * shots * classes
        out[name] = n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("methods", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name, n in count(args.methods or None, args.classes, args.shots, args.arch).items():
        print(f"{name} {n}")


if __name__ == "__main__":
    main()
