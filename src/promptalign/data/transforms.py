"""Image transforms resolved from the backbone's preprocessing (never from dataset configs).

train: RandomResizedCrop(scale 0.08-1) + horizontal flip (as open_clip trains, whatever the
resize mode); test: open_clip's evaluation resize for the weights' ``resize_mode``
(``open_clip.transform.image_transform``):

* "shortest": scale the image so it covers the target (shorter side to the target), center crop;
* "longest": scale it so it fits inside the target (longer side to the target), center crop or
  pad with black to the target size;
* "squash": resize to the target size, ignoring the aspect ratio.

All with the backbone's interpolation and mean/std.
"""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..backbone import Preprocess
from .base import DEFAULT_CROP_SCALE

_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}
RESIZE_MODES = ("shortest", "longest", "squash")


class ResizeKeepRatio:
    """Scale a PIL image by one factor so that it covers (``longest=False``) or fits inside
    (``longest=True``) ``size`` = (height, width); the rounding follows open_clip's."""

    def __init__(self, size: tuple[int, int], longest: bool, interpolation: T.InterpolationMode):
        self.size, self.longest, self.interpolation = tuple(size), longest, interpolation

    def __call__(self, img):
        h, w = img.size[1], img.size[0]
        rh, rw = h / self.size[0], w / self.size[1]
        ratio = max(rh, rw) if self.longest else min(rh, rw)
        return TF.resize(
            img, [round(h / ratio), round(w / ratio)], interpolation=self.interpolation
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, longest={self.longest})"


def eval_resize(pre: Preprocess, interp: T.InterpolationMode) -> list:
    """The resize + crop/pad steps of the evaluation pipeline for ``pre.resize_mode``."""
    size = tuple(pre.image_size)
    if pre.resize_mode == "squash":
        return [T.Resize(size, interpolation=interp)]
    if pre.resize_mode == "longest":
        # CenterCrop pads with 0 (black) where the image is smaller than the target
        return [ResizeKeepRatio(size, longest=True, interpolation=interp), T.CenterCrop(size)]
    if pre.resize_mode == "shortest":
        first = (
            T.Resize(size[0], interpolation=interp)
            if size[0] == size[1]
            else ResizeKeepRatio(size, longest=False, interpolation=interp)
        )
        return [first, T.CenterCrop(size)]
    raise ValueError(f"resize_mode {pre.resize_mode!r} unknown; use one of {list(RESIZE_MODES)}")


def build_transform(
    pre: Preprocess, train: bool, crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE
) -> T.Compose:
    """The torchvision pipeline for training (augmenting: a random crop of ``crop_scale`` of the
    image area, resized, and a horizontal flip) or evaluation."""
    interp = _INTERP.get(pre.interpolation)
    if interp is None:
        raise ValueError(
            f"interpolation {pre.interpolation!r} unknown; use one of {sorted(_INTERP)}"
        )
    size = pre.image_size
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=interp),
                T.RandomHorizontalFlip(),
                *norm,
            ]
        )
    return T.Compose([*eval_resize(pre, interp), *norm])
