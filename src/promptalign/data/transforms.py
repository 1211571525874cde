"""Image transforms resolved from the backbone's preprocessing (never from dataset configs).

train: RandomResizedCrop(scale 0.08-1) + horizontal flip; test: resize the shorter side +
center crop; both with the backbone's interpolation and mean/std.
"""

from __future__ import annotations

from torchvision import transforms as T

from ..backbone import Preprocess

_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def build_transform(pre: Preprocess, train: bool) -> T.Compose:
    """The torchvision pipeline for training (augmenting) or evaluation."""
    interp = _INTERP.get(pre.interpolation)
    if interp is None:
        raise ValueError(f"interpolation {pre.interpolation!r} unknown; use one of {sorted(_INTERP)}")
    size = pre.image_size
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if train:
        return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp),
                          T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(min(size), interpolation=interp), T.CenterCrop(size), *norm])
