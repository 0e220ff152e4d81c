"""Any PIL image, any mode, to the 8-bit grey (L) or RGB image a shard stores, with the right values.

`to_channels(img, channels)`:
1. applies the EXIF orientation (a phone photo stored sideways is turned upright);
2. reads the pixel values on their own scale and brings them to 8 bits:
   - "1" (bilevel): 0 / 255;  "L", "RGB": as they are;  "P" (palette): its colours (and its transparency);
   - 16-bit grey ("I;16", "I;16B", "I;16L", "I;16N", and "I", Pillow's mode for 16-bit PNG, PGM and TIFF):
     round(v * 255 / 65535), values outside [0, 65535] clipped (with a warning). Pillow itself would clip every
     value above 255 to white. 16-bit colour PNGs are decoded to 8 bits by Pillow (the high byte);
   - "F" (32-bit float): values in [0, 1] -> round(v * 255), values outside clipped (with a warning);
   - "CMYK": R = 255 (1 - C/255)(1 - K/255) (and G, B from M, Y), without colour management (ICC profiles are
     not applied);
   - "YCbCr", "LAB", "HSV", "RGBX": Pillow's conversion to RGB;
3. composites alpha ("LA", "La", "PA", "RGBA", "RGBa", "P" with a transparent colour) over `background`, white
   (255, 255, 255) by default: out = round(c a + b (1 - a)), a = alpha / 255;
4. gives the requested channels: 1 -> L (colour to grey by ITU-R 601-2 luma, as Pillow: L = 0.299 R + 0.587 G +
   0.114 B), 3 -> RGB (grey replicated).
Images already in L or RGB without EXIF rotation come out unchanged (the bytes of existing shards do not change).
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)
DEFAULT_BACKGROUND = WHITE
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_LUMA = np.array([0.299, 0.587, 0.114])


def _round8(x: np.ndarray) -> np.ndarray:
    """float values on the 0..255 scale -> uint8, rounding halves up."""
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def _scaled(arr: np.ndarray, top: float, what: str, source: str) -> np.ndarray:
    """Values on 0..top to the 0..255 scale (float), clipped, warning when some were outside."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > top * (1 + 1e-6):
        log.warning("%s: %s values in [%g, %g] exceed [0, %g]: clipped", source, what, lo, hi, top)
    return np.clip(arr, 0.0, top) * (255.0 / top)


def _values(img: Image.Image, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour or grey values on the 0..255 scale as float (H, W) or (H, W, 3), alpha in [0, 1] or None)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        return _scaled(np.asarray(img), 65535.0, f"16-bit ({mode})", source), None
    if mode == "F":
        return _scaled(np.asarray(img), 1.0, "float (F)", source), None
    if mode == "CMYK":
        cmyk = np.asarray(img).astype(np.float64) / 255.0
        rgb = 255.0 * (1.0 - cmyk[..., :3]) * (1.0 - cmyk[..., 3:4])
        return rgb, None
    if mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info or (img.palette and img.palette.mode == "RGBA")
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGB")  # YCbCr, LAB, HSV, RGBX, ...
    arr = np.asarray(img).astype(np.float64)
    if img.mode in ("LA", "RGBA"):
        return arr[..., :-1].squeeze(-1) if img.mode == "LA" else arr[..., :3], arr[..., -1] / 255.0
    return arr, None


def to_channels(
    img: Image.Image, channels: int, background: tuple[int, int, int] = DEFAULT_BACKGROUND, *, source: str = "image"
) -> Image.Image:
    """An 8-bit L (channels 1) or RGB (channels 3) image of `img`, whatever its mode (see the module docstring).
    `background`: the RGB colour alpha is composited over; `source`: names the image in warnings."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = ImageOps.exif_transpose(img)
    target = "L" if channels == 1 else "RGB"
    if img.mode in ("L", "RGB"):  # the common case, as before: Pillow's own conversion (luma for RGB -> L)
        return img if img.mode == target else img.convert(target)
    values, alpha = _values(img, source)
    bg = np.asarray(background, dtype=np.float64)
    if values.ndim == 2 and channels == 3:
        values = np.repeat(values[..., None], 3, axis=-1)
    if channels == 1:
        if values.ndim == 3:
            values = values @ _LUMA
        bg = bg @ _LUMA
    if alpha is not None:
        a = alpha[..., None] if values.ndim == 3 else alpha
        values = values * a + bg * (1.0 - a)
    return Image.fromarray(_round8(values))  # (H, W) uint8 -> L, (H, W, 3) -> RGB
