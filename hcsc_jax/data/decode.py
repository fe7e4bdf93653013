"""Image bytes to pixels: JPEG through libjpeg-turbo (`simplejpeg`), anything else through Pillow.

simplejpeg decodes a 500 x 375 JPEG in about a third of Pillow's time on the same core (see
BENCHMARKS.md, "Host input"); JPEGs it cannot read (CMYK, progressive files with errors, PNGs
named .jpg) fall back to Pillow. Either way the result is (H, W, C) uint8 with C = 1 for mode
"L" and 3 for "RGB" (gray-level conversion: the JPEG's luma, or Pillow's ITU-R 601 formula).
A file that neither can decode raises `DecodeError` naming it.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

__all__ = ["GRAY_MODES", "DecodeError", "decode", "mode_of"]

GRAY_MODES = ("L", "1", "I;16", "I")
_JPEG_MAGIC = b"\xff\xd8"


class DecodeError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


def _pillow(data: bytes, mode: str, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            a = np.asarray(im if im.mode == mode else im.convert(mode), np.uint8)
    except UnidentifiedImageError as e:
        raise DecodeError(f"cannot decode image {where}: not an image Pillow can read") from e
    except Exception as e:
        raise DecodeError(f"cannot decode image {where}: {e}") from e
    return a[..., None] if a.ndim == 2 else a


def decode(data: bytes, mode: str = "RGB", where: str = "<bytes>") -> np.ndarray:
    """Encoded image `data` -> (H, W, C) uint8 in `mode` ("RGB": C = 3, "L": C = 1)."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if data[:2] == _JPEG_MAGIC:
        try:
            a = simplejpeg.decode_jpeg(data, colorspace="RGB" if mode == "RGB" else "GRAY")
        except ValueError:  # CMYK, or a file libjpeg-turbo refuses: Pillow decides
            pass
        else:
            return a if a.ndim == 3 else a[..., None]
    return _pillow(data, mode, where)


def mode_of(data: bytes, where: str = "<bytes>") -> str:
    """The decoded mode an image implies: "L" for gray-level files, else "RGB" (header only)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return "L" if im.mode in GRAY_MODES else "RGB"
    except UnidentifiedImageError as e:
        raise DecodeError(f"cannot decode image {where}: not an image Pillow can read") from e
    except Exception as e:
        raise DecodeError(f"cannot decode image {where}: {e}") from e
