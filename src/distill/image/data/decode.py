"""Decoding one image file into a uint8 [3, H, W] array, and the limits that guard it.

* **Size limit** (``max_side``): the width and height are read from the header (``Image.open`` does not decode
  pixels) and an image wider or taller than ``max_side`` is refused with a :class:`DataError` naming the file,
  before any pixel is decoded. Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``; a warning
  above it, an error above twice it) is turned into the same kind of :class:`DataError` in both cases.
* **Bit depth**: 16-bit images are scaled to 8 bits by keeping the high byte (``x >> 8``, i.e. ``x // 256``;
  65535 -> 255, ``257 * v`` -> ``v``). That is what Pillow itself does when it opens a 16-bit RGB, RGBA or LA
  PNG, so a 16-bit grey image and the same image stored as 16-bit RGB decode alike. 16-bit grey arrives as
  mode ``I;16``/``I;16B``/``I;16L``/``I;16N``, or ``I`` from a PNG or PPM/PGM (Pillow scales those to
  0..65535). Other 32-bit integer (``I``) or float (``F``) images are decoded as before when every value is
  in 0..255 and refused otherwise: nothing is ever clipped silently.
* Everything else goes through ``Image.convert("RGB")`` (alpha dropped, palettes expanded, grey replicated).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .common import DataError

__all__ = ["DEFAULT_MAX_IMAGE_SIDE", "check_image_side", "decode_image", "to_rgb_array"]

#: Default for ``prepare_dataset(max_image_side=...)``: 4096 px per side (at most 16.8 Mpx, 50 MB decoded).
DEFAULT_MAX_IMAGE_SIDE = 4096

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Formats whose mode "I" images are nominally 16 bits (PNG has at most 16; Pillow scales PPM/PGM to 0..65535).
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


def check_image_side(width: int, height: int, max_side: int, name: str) -> None:
    """Refuse an image wider or taller than ``max_side`` pixels, naming it."""
    if width > max_side or height > max_side:
        raise DataError(
            f"image {name} is {width}x{height} (WxH), larger than max_image_side={max_side} px per side: "
            f"resize the images or raise max_image_side"
        )


def _grey16_to_rgb(a: np.ndarray) -> np.ndarray:
    """[H, W] 16-bit grey (any integer dtype holding 0..65535) -> [H, W, 3] uint8 by the high byte."""
    g = (a.astype(np.uint32, copy=False) >> 8).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def to_rgb_array(im: Image.Image, name: str) -> np.ndarray:
    """An opened image -> uint8 [H, W, 3] (see the module docstring for the bit-depth rules)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _grey16_to_rgb(np.asarray(im))
    if mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "I" and im.format in _SIXTEEN_BIT_I_FORMATS:
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise DataError(f"image {name} ({im.format}, mode I) has values outside 0..65535")
            return _grey16_to_rgb(a)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 255):
            kind = "32-bit integer" if mode == "I" else "floating-point"
            raise DataError(
                f"image {name} has {kind} pixels (Pillow mode {mode}) outside 0..255: converting it "
                f"would clip them; convert it to 8 or 16 bits per channel first"
            )
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, name: str, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> np.ndarray:
    """Decode one image file to a uint8 array [3, H, W]. ``name`` is used in error messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(
            f"image {name} is too large: {e} (refused before decoding; Pillow's "
            f"decompression-bomb limit is PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"
        ) from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    with im:
        check_image_side(im.size[0], im.size[1], max_side, name)  # header only: nothing decoded yet
        try:
            arr = to_rgb_array(im, name)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    return arr.transpose(2, 0, 1)
