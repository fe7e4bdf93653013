"""The one type of images that both inputs hand to the devices (`pipeline`).

`Images(views, cropped)`: `views` is a tuple of uint8 (B, H, W, C) arrays, batch-sharded.
`cropped=True` (streamed input): they are the views themselves, cropped on the host, one per
augmentation config (training) or the one center crop (feature pass). `cropped=False`
(resident input): one array of whole images, from which the devices crop every view. `cropped`
is static (pytree metadata), so a jitted step specializes on it and compiles once per input.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Images:
    views: tuple
    cropped: bool

    def __post_init__(self):
        if not isinstance(self.views, tuple) or not self.views:
            raise ValueError(f"views must be a non-empty tuple of arrays, got {type(self.views).__name__}")
        if not self.cropped and len(self.views) != 1:
            raise ValueError(f"whole images come as one array, got {len(self.views)}")

    @property
    def batch_size(self) -> int:
        return self.views[0].shape[0]


jax.tree_util.register_dataclass(Images, data_fields=["views"], meta_fields=["cropped"])
