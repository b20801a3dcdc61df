"""Overlapping square tiles over a 2D image, and routing objects to tiles.

NumPy only. A tile is ``tile_size`` pixels square, the model's input size by
default, so tiles are encoded at native resolution. Neighbouring tiles overlap
by ``overlap`` pixels; the last tile of a row or column sits flush with the
image edge. An image that fits in one tile is not tiled (it goes to the model
whole, as transformers would do). Along an axis shorter than a tile, tiles are
padded with zeros to the square the model expects.

An object goes to the tile that contains its prompts with the most margin to
a seam (an edge shared with another tile; image borders do not count). So any
object whose extent from its prompts is under ``overlap / 2`` on every side
comes out whole from one tile: a round cell of diameter up to ``overlap``
clicked near its centre is never cut. Unless that tile is not encoded yet and
another, encoded one holds the prompts with at least ``overlap // 4`` of margin:
then that one is used (no encoding; objects reaching up to ``overlap / 4`` from
their prompts still come out whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache import content_key
from .defaults import DEFAULT_OVERLAP, DEFAULT_TILE
from .feature_cache import FeatureCache
from .tile_keys import TileKeys


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``r0:r1`` and columns ``c0:c1`` of the image (before padding)."""

    index: tuple[int, int]
    r0: int
    c0: int
    r1: int
    c1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    def intersects(self, region) -> bool:
        r0, c0, r1, c1 = region
        return self.r0 < r1 and r0 < self.r1 and self.c0 < c1 and c0 < self.c1


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


class TileGrid:
    """The tiles of an image of ``shape`` (H, W)."""

    def __init__(self, shape, tile_size: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP):
        h, w = (int(s) for s in shape[:2])
        if tile_size < 16:
            raise ValueError(f"tile size {tile_size} is too small")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap {overlap} must be >= 0 and smaller than the tile size")
        self.shape = (h, w)
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        stride = self.tile_size - self.overlap
        rows = _starts(h, self.tile_size, stride)
        cols = _starts(w, self.tile_size, stride)
        self.grid_shape = (len(rows), len(cols))
        self.tiles = [
            Tile((i, j), r, c, min(r + self.tile_size, h), min(c + self.tile_size, w))
            for i, r in enumerate(rows) for j, c in enumerate(cols)
        ]

    @property
    def single(self) -> bool:
        """True when the whole image is one tile (no tiling, no padding)."""
        return len(self.tiles) == 1

    def padded_shape(self, tile: Tile) -> tuple[int, int]:
        """The shape handed to the model for ``tile``."""
        return tile.shape if self.single else (self.tile_size, self.tile_size)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    def tiles_in(self, region=None) -> list[Tile]:
        """Tiles that intersect ``region`` = (row0, col0, row1, col1), or all tiles."""
        if region is None:
            return list(self.tiles)
        return [t for t in self.tiles if t.intersects(region)]

    def margin(self, tile: Tile, bbox) -> float:
        """Smallest distance from ``bbox`` to a seam of ``tile`` (negative: crosses it)."""
        r0, c0, r1, c1 = bbox
        h, w = self.shape
        sides = []
        if tile.r0 > 0:
            sides.append(r0 - tile.r0)
        if tile.r1 < h:
            sides.append(tile.r1 - 1 - r1)
        if tile.c0 > 0:
            sides.append(c0 - tile.c0)
        if tile.c1 < w:
            sides.append(tile.c1 - 1 - c1)
        inside = min(r0 - tile.r0, tile.r1 - 1 - r1, c0 - tile.c0, tile.c1 - 1 - c1)
        if inside < 0:
            return float(inside) - 1e9  # not contained: rank by how far it sticks out
        return float(min(sides)) if sides else float("inf")

    @property
    def reuse_margin(self) -> int:
        """The margin an encoded tile needs to take an object from the best tile: a
        quarter of the overlap, half what the best tile guarantees a point (half the
        overlap), so an object reaching up to this far from its prompts stays whole."""
        return self.overlap // 4

    def route(self, bbox, encoded=None, min_margin: int | None = None) -> Tile:
        """The tile holding ``bbox`` (row0, col0, row1, col1) with the most margin.

        ``encoded``: a predicate ``tile -> bool`` (is it encoded already?). When the best
        tile is not encoded, the encoded tile with the most margin is taken instead if
        it holds ``bbox`` with at least ``min_margin`` (default :attr:`reuse_margin`).
        The predicate is asked about the best tile first, then only about tiles that
        hold ``bbox`` with that margin, most margin first.
        """
        margins = [self.margin(t, bbox) for t in self.tiles]
        best = self.tiles[int(np.argmax(margins))]
        if encoded is None or encoded(best):
            return best
        need = self.reuse_margin if min_margin is None else min_margin
        held = sorted((k for k, m in enumerate(margins) if m >= need and self.tiles[k] != best),
                      key=lambda k: -margins[k])
        return next((self.tiles[k] for k in held if encoded(self.tiles[k])), best)

    def read(self, image, tile: Tile) -> np.ndarray:
        """The pixels of ``tile`` from an array-like (NumPy, Zarr, dask), not padded."""
        return np.asarray(image[tile.slices])


def pad_to(rgb: np.ndarray, shape) -> np.ndarray:
    """Zero-pad an (h, w, 3) tile at the bottom/right to ``shape``."""
    h, w = rgb.shape[:2]
    if (h, w) == tuple(shape):
        return rgb
    out = np.zeros((shape[0], shape[1]) + rgb.shape[2:], dtype=rgb.dtype)
    out[:h, :w] = rgb
    return out


class TiledModel:
    """What every SAM3 wrapper shares: the model and processor, device, identity for the
    cache, its feature cache (memory LRU, then the Zarr store) and the tiling settings
    (default: the model's input size and a quarter of it as overlap)."""

    def __init__(self, model, processor, device: str, *, model_id: str, fingerprint,
                 store, memory, tile_size: int | None, overlap: int | None):
        self.model = model
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self.fingerprint = fingerprint or {"id": model_id}
        self.feature_cache = FeatureCache(memory, store)
        self.tile_size = int(tile_size or self.input_size)
        self.overlap = int(self.tile_size // 4 if overlap is None else overlap)
        TileGrid((1, 1), self.tile_size, self.overlap)  # validates the settings
        self.encoder_calls = 0
        self.tile_keys = TileKeys()  # cache keys of tiles, remembered per image
        # route prompts to already encoded tiles (see TileGrid.route): off by default, so
        # the API and CLI give masks that do not depend on the cache; the widget turns it on
        self.reuse_encoded = False
        # cached features serve any compute dtype (it is recorded in each entry); True: only
        # those computed in this model's dtype (e.g. no bfloat16 GPU entries on a CPU)
        self.exact_dtype = False

    @property
    def input_size(self) -> int:
        """Side of the square model input (1008 for SAM3)."""
        return int(self.processor.image_processor.size["height"])

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def store(self):
        """The Zarr embedding store (None: memory only)."""
        return self.feature_cache.store

    @property
    def memory(self):
        """The in-memory LRU of recent features."""
        return self.feature_cache.memory

    @property
    def key_dtype(self) -> str | None:
        """The compute dtype as part of cache keys: only with :attr:`exact_dtype`."""
        return str(self.dtype) if self.exact_dtype else None

    def feature_key(self, rgb: np.ndarray, *kind) -> str:
        """The cache key of the features of ``rgb``: its pixels, this model (by content:
        ``model_fingerprint``), its input size, the storage dtype, ``kind`` (which
        features, if not the tracker's) and, with :attr:`exact_dtype`, the compute dtype.
        Nothing in it depends on where the model, the image or the cache lies."""
        extra = () if self.key_dtype is None else (self.key_dtype,)
        return content_key(rgb, self.fingerprint, self.input_size,
                           self.feature_cache.storage, *extra, *kind)

    def tiles(self, image) -> TileGrid:
        """The tile grid used for ``image`` (one tile when it fits in ``tile_size``)."""
        return TileGrid(image.shape[:2], self.tile_size, self.overlap)
