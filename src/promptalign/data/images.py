"""Reading image files: one function for every place the library opens an image.

* Every mode Pillow opens becomes 8-bit RGB correctly (:func:`to_rgb`): 16-bit images
  ("I;16*", and "I" holding 16-bit values, as 16-bit PNG / TIFF files open) are scaled from
  0..65535 to 0..255 rather than clipped at 255 (which turns most of such an image white);
  32-bit integer images with larger values are scaled by their own range; float ("F") images
  by 0..1 when they lie in it, else clipped to 0..255; palette images with transparency and
  premultiplied modes through their alpha mode. Alpha is dropped as CLIP's own preprocessing
  does (``convert("RGB")``), so RGB, L, LA, RGBA, P, CMYK and "1" images give exactly what
  ``convert("RGB")`` gives.
* A pixel limit (``data.max_image_pixels``; None = Pillow's ``MAX_IMAGE_PIXELS``) guards against
  decompression bombs: a larger image is an :class:`ImageTooLarge` naming the file, its pixel
  count and the setting, checked from the header before any pixel is decoded.
* :func:`check_image` reads the header only (format, size, mode), so a data set can be checked
  before a run starts (:func:`find_unreadable`).

Any failure to decode is an :class:`ImageReadError` (an ``OSError``) whose message says why.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

PIXEL_SETTING = "data.max_image_pixels"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_PILLOW_LIMIT = threading.Lock()


class ImageReadError(OSError):
    """An image file cannot be read; the message says why (without the path)."""


class ImageTooLarge(ImageReadError):
    """An image has more pixels than the limit (a possible decompression bomb)."""


def pixel_limit(max_pixels: int | None) -> int | None:
    """The limit in force: ``max_pixels``, else Pillow's ``MAX_IMAGE_PIXELS`` (None: no limit)."""
    return max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS


def _too_large(pixels: int | None, limit: int) -> ImageTooLarge:
    count = f"{pixels:,} pixels" if pixels is not None else "more pixels than Pillow allows"
    return ImageTooLarge(
        f"{count}, over the limit of {limit:,} ({PIXEL_SETTING}; raise it, e.g. "
        f"{PIXEL_SETTING}={pixels or limit * 4}, only for files you trust)"
    )


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` lazily (header only) and check its size against the pixel limit.

    Raises:
        ImageTooLarge: more pixels than ``max_pixels`` (None: Pillow's limit).
        ImageReadError: not an image Pillow can identify, or not readable.
    """
    limit = pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():  # the size is checked below, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else None
        if limit is not None and (pixels is None or pixels > limit):
            raise _too_large(pixels, limit) from None
        im = _open_unchecked(path)  # the caller allows more than Pillow does
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(_reason(e)) from None
    w, h = im.size
    if limit is not None and w * h > limit:
        im.close()
        raise _too_large(w * h, limit)
    return im


def _open_unchecked(path: str | os.PathLike) -> Image.Image:
    """``Image.open`` with Pillow's own pixel limit lifted (the caller checks a larger one)."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageReadError(_reason(e)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (see the module docstring), decoded in full.

    Raises:
        ImageTooLarge: over the pixel limit (checked before decoding).
        ImageReadError: anything else that stops the file from decoding.
    """
    im = open_image(path, max_pixels)
    try:
        with im:
            return to_rgb(im)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders of damaged files raise all kinds of errors
        raise ImageReadError(_reason(e)) from None


def check_image(path: str | os.PathLike, max_pixels: int | None = None) -> str | None:
    """Why ``path`` cannot be read as an image, from its header alone (None if it looks fine)."""
    try:
        with open_image(path, max_pixels) as im:
            _ = im.mode
    except ImageReadError as e:
        return str(e)
    return None


def find_unreadable(
    image_root: str | os.PathLike, paths: Iterable[str], max_pixels: int | None = None
) -> list[tuple[str, str]]:
    """``(path, reason)`` of every file under ``image_root`` whose header does not read as an
    image within the pixel limit (the pixels themselves are not decoded: fast)."""
    root = Path(image_root)
    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for p in dict.fromkeys(paths):
            why = check_image(root / p, max_pixels)
            if why is not None:
                bad.append((p, why))
    return bad


# --------------------------------------------------------------------------- modes
def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode (see the module docstring)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im).astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if mode != "I" or (lo >= 0 and hi <= 65535):
            a8 = (a + 128) // 257  # round(a * 255 / 65535): 0 -> 0, 65535 -> 255
        else:  # 32-bit values beyond 16 bits: their own range, 0 included
            lo = min(lo, 0)
            a8 = np.rint((a - lo) * (255.0 / max(hi - lo, 1)))
        return _gray_to_rgb(a8)
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return _gray_to_rgb(np.rint(np.clip(a, 0.0, 255.0)))
    if mode in ("P", "PA") and "transparency" in im.info or mode in ("RGBa", "PA"):
        return im.convert("RGBA").convert("RGB")
    if mode == "La":
        return im.convert("LA").convert("RGB")
    return im.convert("RGB")


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
