"""Generated JPEGs for the input benchmarks: an image folder of ImageNet-like files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_folder(root: str, n: int, height: int, width: int, quality: int):
    """n smooth random JPEGs (JPEG-typical content, not noise) in 4 class folders."""
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(os.path.join(root, f"class{c}"))
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        im.save(os.path.join(root, f"class{i % 4}", f"{i:06d}.jpg"), quality=quality)
