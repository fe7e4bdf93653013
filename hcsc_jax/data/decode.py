"""Image bytes to pixels: JPEG through libjpeg-turbo (`simplejpeg`), anything else through Pillow.

simplejpeg decodes a 500 x 375 JPEG in about a third of Pillow's time on the same core (see
BENCHMARKS.md, "Host input"); JPEGs it cannot read (CMYK, progressive files with errors, PNGs
named .jpg) fall back to Pillow. Either way the result is (H, W, C) uint8 with C = 1 for mode
"L" and 3 for "RGB" (gray-level conversion: the JPEG's luma, or Pillow's ITU-R 601 formula).
16-bit gray-level PNGs keep their top 8 bits (value >> 8, as Pillow reads 16-bit color PNGs;
Pillow's own conversion to "L" clips everything above 255 to white).

Before any pixel is decoded, the header's width x height is checked against `max_pixels`
(default `MAX_PIXELS`, Pillow's decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS`, 89,478,485;
`config.input.max_pixels`): a 30000 x 30000 JPEG of 14 MB on disk would take 2.7 GB decoded.
A larger `max_pixels` raises Pillow's own limit to it. A file that cannot be decoded, or is too
large, raises `DecodeError` naming it.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

__all__ = ["GRAY_MODES", "MAX_PIXELS", "DecodeError", "decode", "max_file_bytes", "mode_of"]

GRAY_MODES = ("L", "LA", "La", "1", "I;16", "I;16B", "I;16L", "I;16N", "I")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb limit
_JPEG_MAGIC = b"\xff\xd8"
_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit gray levels ("I": Pillow's older reading)


class DecodeError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image, too large)."""


def max_file_bytes(max_pixels: int = MAX_PIXELS) -> int:
    """The largest image file read into memory: 4 bytes per allowed pixel (an uncompressed RGBA
    image of `max_pixels`; 358 MB by default)."""
    return 4 * int(max_pixels)


def check_pixels(width: int, height: int, max_pixels: int, where: str) -> None:
    """DecodeError naming `where` when width x height exceeds `max_pixels`."""
    if width * height > max_pixels:
        raise DecodeError(f"cannot decode image {where}: {width} x {height} = {width * height:,} pixels, "
                          f"more than the limit of {int(max_pixels):,} (config.input.max_pixels)")


def _pillow(data: bytes, mode: str, where: str, max_pixels: int) -> np.ndarray:
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check (in Image.open) then agrees with ours
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(*im.size, max_pixels, where)
            if im.mode in _WIDE_GRAY:
                wide = np.clip(np.asarray(im, np.int64), 0, 65535) >> 8
                im = Image.fromarray(wide.astype(np.uint8))
            a = np.asarray(im if im.mode == mode else im.convert(mode), np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        raise DecodeError(f"cannot decode image {where}: not an image Pillow can read") from e
    except Exception as e:
        raise DecodeError(f"cannot decode image {where}: {e}") from e
    return a[..., None] if a.ndim == 2 else a


def decode(data: bytes, mode: str = "RGB", where: str = "<bytes>",
           max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image `data` -> (H, W, C) uint8 in `mode` ("RGB": C = 3, "L": C = 1); DecodeError
    naming `where` for an image of more than `max_pixels` pixels (checked on the header)."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if data[:2] == _JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # a header libjpeg-turbo cannot read: Pillow decides
            pass
        else:
            check_pixels(width, height, max_pixels, where)
            try:
                a = simplejpeg.decode_jpeg(data, colorspace="RGB" if mode == "RGB" else "GRAY")
            except ValueError:  # CMYK, or a file libjpeg-turbo refuses: Pillow decides
                pass
            else:
                return a if a.ndim == 3 else a[..., None]
    return _pillow(data, mode, where, max_pixels)


def mode_of(data: bytes, where: str = "<bytes>") -> str:
    """The decoded mode an image implies: "L" for gray-level files, else "RGB" (header only)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return "L" if im.mode in GRAY_MODES else "RGB"
    except UnidentifiedImageError as e:
        raise DecodeError(f"cannot decode image {where}: not an image Pillow can read") from e
    except Exception as e:
        raise DecodeError(f"cannot decode image {where}: {e}") from e
