"""Every image mode Pillow opens is read as the right 8-bit RGB pixels: saved to a file in that
mode, read back through the library's one image reader, compared with the values it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptalign.data import ImageDataset
from promptalign.data.base import Record
from promptalign.data.images import ImageTooLarge, check_image, read_image

H, W = 8, 32
RAMP8 = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (H, 1))  # [H, W] 0..248
RAMP16 = np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))  # [H, W] full range


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _save(tmp_path: Path, im: Image.Image, suffix: str, mode: str) -> Path:
    path = tmp_path / f"{mode.replace(';', '_')}{suffix}"
    im.save(path)
    with Image.open(path) as back:  # the file really holds this mode
        assert back.mode == mode, (mode, back.mode)
    return path


def _case_l(tmp_path):
    return _save(tmp_path, Image.fromarray(RAMP8, "L"), ".png", "L"), _rgb(RAMP8)


def _case_la(tmp_path):
    alpha = np.full_like(RAMP8, 77)
    im = Image.fromarray(np.stack([RAMP8, alpha], -1), "LA")
    return _save(tmp_path, im, ".png", "LA"), _rgb(RAMP8)  # alpha dropped, as CLIP does


def _case_p(tmp_path):
    palette = np.zeros((256, 3), np.uint8)
    palette[:, 0] = np.arange(256)
    palette[:, 1] = 255 - np.arange(256)
    palette[:, 2] = 40
    idx = (RAMP8 // 8).astype(np.uint8)  # indices 0..31
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.reshape(-1).tolist())
    return _save(tmp_path, im, ".png", "P"), palette[idx]


def _case_p_transparent(tmp_path):
    path, want = _case_p(tmp_path)
    with Image.open(path) as im:
        im.load()
        im.info["transparency"] = 0
        out = tmp_path / "Pt.png"
        im.save(out, transparency=0)
    return out, want  # colours kept, transparency dropped (no Pillow palette warning)


def _case_rgba(tmp_path):
    rgb = np.stack([RAMP8, 255 - RAMP8, np.full_like(RAMP8, 9)], -1)
    alpha = np.full_like(RAMP8, 3)
    im = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
    return _save(tmp_path, im, ".png", "RGBA"), rgb


def _case_cmyk(tmp_path):
    c, m, y, k = RAMP8, np.zeros_like(RAMP8), 255 - RAMP8, np.full_like(RAMP8, 0)
    im = Image.fromarray(np.stack([c, m, y, k], -1), "CMYK")
    want = np.stack([255 - c, 255 - m, 255 - y], -1)  # k = 0: RGB = 255 - CMY
    return _save(tmp_path, im, ".tif", "CMYK"), want


def _case_1(tmp_path):
    bits = RAMP8 >= 128
    im = Image.fromarray(bits.astype(np.uint8) * 255, "L").convert("1")
    return _save(tmp_path, im, ".png", "1"), _rgb(bits.astype(np.uint8) * 255)


def _case_i16(tmp_path):
    im = Image.fromarray(RAMP16)  # a 16-bit PNG
    want = np.round(RAMP16 / 257.0).astype(np.uint8)
    return _save(tmp_path, im, ".png", "I;16"), _rgb(want)


def _case_i(tmp_path):
    im = Image.fromarray(RAMP16.astype(np.int32), "I")  # 32-bit integers holding 16-bit values
    want = np.round(RAMP16 / 257.0).astype(np.uint8)
    return _save(tmp_path, im, ".tif", "I"), _rgb(want)


def _case_i_wide(tmp_path):
    wide = (RAMP16.astype(np.int64) * 1000).astype(np.int32)  # beyond 16 bits: own range
    im = Image.fromarray(wide, "I")
    want = np.round(wide / wide.max() * 255).astype(np.uint8)
    return _save(tmp_path, im, ".tif", "I"), _rgb(want)


def _case_f(tmp_path):
    im = Image.fromarray((RAMP8 / 255.0).astype(np.float32), "F")  # 0..1 floats
    return _save(tmp_path, im, ".tif", "F"), _rgb(RAMP8)


CASES = [
    _case_l,
    _case_la,
    _case_p,
    _case_p_transparent,
    _case_rgba,
    _case_cmyk,
    _case_1,
    _case_i16,
    _case_i,
    _case_i_wide,
    _case_f,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[len("_case_") :])
def test_every_mode_reads_as_its_rgb_values(case, tmp_path, recwarn):
    path, want = case(tmp_path)
    got = read_image(path)
    assert got.mode == "RGB" and got.size == (W, H)
    arr = np.asarray(got)
    assert np.abs(arr.astype(int) - want.astype(int)).max() <= 1, (arr[0, :8], want[0, :8])
    assert not [w for w in recwarn if "Palette images with Transparency" in str(w.message)]


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    """The failure this guards against: convert("RGB") clips 16-bit values at 255, so a 16-bit
    ramp turned almost entirely white."""
    path, _ = _case_i16(tmp_path)
    with Image.open(path) as im:
        naive = np.asarray(im.convert("RGB"))
    assert (naive == 255).mean() > 0.9  # Pillow's own conversion saturates
    arr = np.asarray(read_image(path))[..., 0]
    assert (arr == 255).mean() < 0.05
    assert arr.mean() == pytest.approx(RAMP16.mean() / 257, abs=1)
    assert (np.diff(arr[0].astype(int)) >= 0).all()  # the ramp keeps its order


def test_the_training_dataset_reads_through_the_same_reader(tmp_path):
    path, want = _case_i16(tmp_path)
    ds = ImageDataset("t", tmp_path, [Record(path.name, 0, "x")])
    assert np.abs(np.asarray(ds[0]["image"]).astype(int) - want.astype(int)).max() <= 1


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match=r"1,200 pixels, over the limit of 1,000 \(data.max"):
        read_image(tmp_path / "big.png", max_pixels=1000)
    assert "data.max_image_pixels" in check_image(tmp_path / "big.png", 1000)
    assert check_image(tmp_path / "big.png", 1200) is None
    assert read_image(tmp_path / "big.png", max_pixels=1200).size == (40, 30)


def test_a_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    """A user who raises data.max_image_pixels above Pillow's limit gets the image; Pillow's
    global setting is left as it was."""
    Image.new("L", (50, 50)).save(tmp_path / "im.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 2500 px is a "bomb" for Pillow
    with pytest.raises(ImageTooLarge, match="over the limit of 100"):
        read_image(tmp_path / "im.png")  # None: Pillow's limit
    assert read_image(tmp_path / "im.png", max_pixels=3000).size == (50, 50)
    assert Image.MAX_IMAGE_PIXELS == 100
