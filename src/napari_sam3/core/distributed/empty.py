"""Which tiles are empty, so precompute, segment-everything and concepts can skip them.

As cellpose and micro-sam do for whole slides: a tile is empty when the pixels the model
would see (0-255, after the image's intensity limits) span at most ``max_range`` levels
(a uniform background, the black margin of a scan), or when a user ``mask`` (any array
the shape of the image plane, or a smaller one scaled to it: e.g. a tissue mask drawn on
a thumbnail) has no nonzero pixel under the tile. Skipped tiles are listed in what the
run returns; nothing is silently lost. NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: ``--skip-empty`` without a value: tiles spanning at most this many of 255 levels.
DEFAULT_MAX_RANGE = 4

Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class EmptyTiles:
    """The rule: ``max_range`` (None: no intensity test) and/or ``mask`` (None: none)."""

    max_range: int | None = None
    mask: object = None

    def __post_init__(self):
        if self.max_range is not None and not 0 <= int(self.max_range) <= 255:
            raise ValueError(f"max_range must be 0 to 255 levels, got {self.max_range}")
        if self.mask is not None and len(self.mask.shape) != 2:
            raise ValueError(f"the mask must be 2D (Y, X), got shape {tuple(self.mask.shape)}")

    def mask_empty(self, plane_shape, box: Box) -> bool:
        """No nonzero pixel of the mask under ``box`` (scaled to the mask's size)."""
        if self.mask is None:
            return False
        h, w = (int(v) for v in plane_shape[:2])
        mh, mw = (int(v) for v in self.mask.shape)
        r0, c0, r1, c1 = box
        rows = slice(r0 * mh // h, max(-(-r1 * mh // h), r0 * mh // h + 1))
        cols = slice(c0 * mw // w, max(-(-c1 * mw // w), c0 * mw // w + 1))
        return not np.any(np.asarray(self.mask[rows, cols]))

    def empty(self, image, grid, tile, limits) -> bool:
        """Whether ``tile`` of ``image`` is skipped (the mask first: it reads no pixels);
        ``limits`` as the model's normalisation takes them."""
        if self.mask_empty(image.shape, tile_box(tile)):
            return True
        if self.max_range is None:
            return False
        from ..normalize import to_rgb_uint8

        rgb = to_rgb_uint8(grid.read(image, tile), limits)
        return int(rgb.max()) - int(rgb.min()) <= int(self.max_range)


def tile_box(tile) -> Box:
    return int(tile.r0), int(tile.c0), int(tile.r1), int(tile.c1)
