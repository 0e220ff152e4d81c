"""Every PIL image mode a dataset may hold becomes the right 8-bit L / RGB pixels (ditscale.data.images), upright
by its EXIF orientation; and a 16-bit PNG goes through the shard builder with its values, not as a white image."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from ditscale.data import build_shards, iter_dataset
from ditscale.data.images import to_channels

H, W = 2, 3  # not square: a rotation shows


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, rounded half up (what to_channels computes for colour that is not plain RGB)."""
    return np.floor(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)


def over(c: np.ndarray, a: np.ndarray, bg: float | np.ndarray) -> np.ndarray:
    """Alpha compositing on the 8-bit scale, halves up."""
    a = a.astype(np.float64) / 255.0
    if c.ndim == 3:
        a = a[..., None]
    return np.floor(c * a + np.asarray(bg, dtype=np.float64) * (1 - a) + 0.5).astype(np.uint8)


GREY = np.array([[0, 50, 100], [150, 200, 255]], dtype=np.uint8)
ALPHA = np.array([[255, 0, 128], [64, 255, 1]], dtype=np.uint8)
RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [200, 100, 50], [255, 255, 255]]], np.uint8)
SIXTEEN = np.array([[0, 257, 65535], [32896, 1000, 65534]], dtype=np.uint16)  # -> 0, 1, 255, 128, 4, 255
SIXTEEN_8 = np.array([[0, 1, 255], [128, 4, 255]], dtype=np.uint8)
PALETTE = [255, 0, 0, 0, 128, 0, 10, 20, 30, 250, 250, 250]  # 4 colours
INDICES = np.array([[0, 1, 2], [3, 0, 1]], dtype=np.uint8)
PAL_RGB = np.array(PALETTE, dtype=np.uint8).reshape(-1, 3)[INDICES]


def palette_image(transparent: int | None = None, alpha: np.ndarray | None = None) -> Image.Image:
    """A palette image of INDICES into PALETTE; with a transparent index, or as PA with an alpha channel."""
    if alpha is not None:
        img = Image.new("PA", (W, H))
        img.putpalette(PALETTE)
        img.putdata(list(zip(INDICES.ravel().tolist(), alpha.ravel().tolist(), strict=True)))
        return img
    img = Image.new("P", (W, H))
    img.putpalette(PALETTE)
    img.putdata(INDICES.ravel().tolist())
    if transparent is not None:
        img.info["transparency"] = transparent
    return img


def cases():
    """(name, image, expected RGB, expected L) for the white background."""
    white = 255.0
    bw = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    one = Image.new("1", (W, H))
    one.putdata((bw.ravel() * 255).tolist())
    bw8 = (bw * 255).astype(np.uint8)
    yield "1", one, np.repeat(bw8[..., None], 3, -1), bw8
    yield "L", Image.fromarray(GREY), np.repeat(GREY[..., None], 3, -1), GREY
    la = Image.fromarray(np.stack([GREY, ALPHA], -1), mode="LA")
    yield "LA", la, np.repeat(over(GREY, ALPHA, white)[..., None], 3, -1), over(GREY, ALPHA, white)
    yield "P", palette_image(), PAL_RGB, luma(PAL_RGB)
    transparent = np.where(INDICES == 2, 0, 255).astype(np.uint8)  # palette index 2 is transparent
    yield (
        "P+transparency",
        palette_image(transparent=2),
        over(PAL_RGB, transparent, white),
        over(luma(PAL_RGB).astype(np.float64), transparent, white),
    )
    yield (
        "PA",
        palette_image(alpha=ALPHA),
        over(PAL_RGB, ALPHA, white),
        over(luma(PAL_RGB).astype(np.float64), ALPHA, white),
    )
    r, g, b = (RGB[..., i].astype(np.int64) for i in range(3))
    pil_luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # Pillow's RGB -> L
    yield "RGB", Image.fromarray(RGB), RGB, pil_luma.astype(np.uint8)
    rgba = Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), mode="RGBA")
    yield "RGBA", rgba, over(RGB, ALPHA, white), over(luma(RGB).astype(np.float64), ALPHA, white)
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 128], [0, 0, 0, 255]], [[128, 0, 0, 0], [0, 255, 255, 0], [0] * 4]],
                    dtype=np.uint8)  # fmt: skip
    cmyk_rgb = np.array([[[0, 255, 255], [127, 127, 127], [0, 0, 0]], [[127, 255, 255], [255, 0, 0], [255] * 3]],
                        dtype=np.uint8)  # fmt: skip
    yield "CMYK", Image.fromarray(cmyk, mode="CMYK"), cmyk_rgb, luma(cmyk_rgb)
    yield "I;16", Image.fromarray(SIXTEEN), np.repeat(SIXTEEN_8[..., None], 3, -1), SIXTEEN_8
    yield "I", Image.fromarray(SIXTEEN.astype(np.int32), mode="I"), np.repeat(SIXTEEN_8[..., None], 3, -1), SIXTEEN_8
    f = np.array([[0.0, 0.5, 1.0], [0.25, 0.002, 1.0]], dtype=np.float32)
    f8 = np.array([[0, 128, 255], [64, 1, 255]], dtype=np.uint8)
    yield "F", Image.fromarray(f, mode="F"), np.repeat(f8[..., None], 3, -1), f8
    png16 = io.BytesIO()
    Image.fromarray(SIXTEEN).save(png16, format="PNG")  # a real 16-bit greyscale PNG file
    reopened = Image.open(io.BytesIO(png16.getvalue()))
    reopened.load()
    yield "16-bit PNG", reopened, np.repeat(SIXTEEN_8[..., None], 3, -1), SIXTEEN_8


CASES = {name: (img, rgb, grey) for name, img, rgb, grey in cases()}


def rotated(img: Image.Image, orientation: int, via_png: bool) -> Image.Image:
    """The image stored rotated, with an EXIF orientation saying how to turn it upright."""
    # orientation 6: "rotate 90 degrees clockwise to display"; store the upright image turned 90 degrees the other way
    stored = img.transpose(Image.Transpose.ROTATE_90)
    if via_png and stored.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        stored.save(buf, format="PNG", exif=exif)
        out = Image.open(io.BytesIO(buf.getvalue()))
        out.load()
        return out
    stored.getexif()[0x0112] = orientation
    return stored


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("exif", [None, "memory", "png"])
def test_every_mode_gives_the_right_pixels(name, exif):
    img, want_rgb, want_grey = CASES[name]
    if exif is not None:
        img = rotated(img, 6, via_png=exif == "png")
        assert img.size == (H, W)  # stored sideways
    rgb = to_channels(img, 3)
    grey = to_channels(img, 1)
    assert rgb.mode == "RGB" and grey.mode == "L"
    np.testing.assert_array_equal(np.asarray(rgb), want_rgb, err_msg=name)
    np.testing.assert_array_equal(np.asarray(grey), want_grey, err_msg=name)


def test_background_colour_is_a_parameter():
    img, _, _ = CASES["RGBA"]
    black = to_channels(img, 3, background=(0, 0, 0))
    np.testing.assert_array_equal(np.asarray(black), over(RGB, ALPHA, np.zeros(3)))
    red = to_channels(CASES["LA"][0], 3, background=(255, 0, 0))
    np.testing.assert_array_equal(np.asarray(red)[0, 1], [255, 0, 0])  # alpha 0: the background itself


def test_out_of_range_values_are_clipped_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="ditscale.data.images")
    f = Image.fromarray(np.array([[-0.5, 2.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_channels(f, 1, source="x.tif")), [[0, 255]])
    assert "x.tif" in caplog.text and "clipped" in caplog.text
    caplog.clear()
    i = Image.fromarray(np.array([[70000, 65535]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_channels(i, 1)), [[255, 255]])
    assert "clipped" in caplog.text


def test_plain_images_are_unchanged():
    for arr in (GREY, RGB):
        img = Image.fromarray(arr)
        assert to_channels(img, arr.ndim == 3 and 3 or 1).tobytes() == img.tobytes()


def test_a_16_bit_png_is_not_white_in_the_shards(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    (tmp_path / "src").mkdir()
    Image.fromarray(values).save(tmp_path / "src" / "deep.png")
    rgba = np.concatenate([rng.integers(0, 256, (8, 8, 3)), np.zeros((8, 8, 1))], -1).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "src" / "transparent.png")  # all transparent: white
    build_shards("folder", str(tmp_path / "src"), str(tmp_path / "out"), resolution=8, channels=1, progress=False)
    got = {}
    for x, _, index in iter_dataset(str(tmp_path / "out")):
        got[index] = np.floor((x[0].numpy().astype(np.float64) + 1) * 127.5 + 0.5).astype(np.int64)
    deep, transparent = got[0], got[1]  # sorted listing: deep.png, transparent.png
    np.testing.assert_array_equal(deep, np.floor(values / 257.0 + 0.5).astype(np.int64))
    assert 100 < deep.mean() < 155 and deep.std() > 50  # random 16-bit values: mid-grey on average, not all white
    assert (transparent == 255).all()
