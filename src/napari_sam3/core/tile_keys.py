"""Which tiles of an image are encoded already: cache keys of tiles, remembered.

A tile's cache key is a hash of the pixels handed to the model, so finding it means
reading the tile, normalising it and hashing it: about 30 ms for a 1008 px uint16 tile
of a NumPy image and 80 ms from a Zarr array (2 shared CPU cores). :class:`TileKeys`
remembers each key per (image, tile box, context) so that routing a click to an encoded
tile and listing the encoded tiles cost next to nothing.

The image is identified by the object itself, held weakly (a ``PlaneView`` by its array
and plane index), so data replaced in a layer never reuses another array's keys. NumPy
arrays can be edited in place: their keys are checked against a digest of the tile's raw
pixels (about 1-2 ms). Lazy arrays (Zarr, dask, channel composites) are trusted while
the object lives, as ``Sam3Segmenter.resolve_limits`` trusts their sampled limits:
after editing what they read in place, pass a new object (the widget builds a new
composite for every click). The whole image of an untiled click is remembered the
same way (:func:`image_key`).

NumPy only (no torch, Qt or napari).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict

import numpy as np

from .normalize import check_limits
from .planes import PlaneView

Box = tuple[int, int, int, int]
MAX_ENTRIES = 1 << 16  # remembered keys per segmenter (a 20,000^2 image has 729 tiles)


def _base(image):
    """(the object that identifies ``image``, its plane index)."""
    if isinstance(image, PlaneView):
        return image.data, image.lead
    return image, ()


def _raw_digest(image, box: Box) -> bytes:
    """A fingerprint of the raw pixels of ``box`` (one contiguous copy, no other).

    SHA-256: about 6x faster than BLAKE2b on CPUs with SHA instructions (1-2 ms for a
    1008 px uint16 tile); it is kept in memory only, never in the cache."""
    r0, c0, r1, c1 = box
    a = np.ascontiguousarray(image[r0:r1, c0:c1])
    h = hashlib.sha256()
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
    return h.digest()


class TileKeys:
    """Cache keys of image regions, remembered while their image lives (thread-safe)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = int(max_entries)
        self._items: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def _slot(self, image, box: Box, context) -> tuple:
        base, lead = _base(image)
        return (id(base), lead, tuple(int(v) for v in box), context), base

    @staticmethod
    def _same_image(entry, base, image) -> bool:
        ref, shape, dtype = entry[0], entry[1], entry[2]
        return ref() is base and shape == tuple(image.shape) and dtype == str(image.dtype)

    def get(self, image, box: Box, context, compute) -> str:
        """The key of ``box`` of ``image`` in ``context`` (anything hashable that changes
        the key: limits, the shape handed to the model, ...): remembered, else
        ``compute()``, then remembered."""
        slot, base = self._slot(image, box, context)
        with self._lock:
            entry = self._items.get(slot)
        raw = None
        if entry is not None and self._same_image(entry, base, image):
            if entry[3] is None:
                return entry[4]
            raw = _raw_digest(image, box)
            if raw == entry[3]:
                return entry[4]
        key = compute()
        if isinstance(base, np.ndarray) and raw is None:
            raw = _raw_digest(image, box)
        try:
            ref = weakref.ref(base)
        except TypeError:  # not weak-referenceable: not remembered
            return key
        with self._lock:
            self._items[slot] = (ref, tuple(image.shape), str(image.dtype), raw, key)
            self._items.move_to_end(slot)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return key

    def known(self, image, context) -> dict[Box, str]:
        """``{box: key}`` remembered for ``image`` in ``context``; reads no pixels, so a
        NumPy image edited in place since may show its old keys (fine for display)."""
        base, lead = _base(image)
        with self._lock:
            items = list(self._items.items())
        return {slot[2]: entry[4] for slot, entry in items
                if slot[0] == id(base) and slot[1] == lead and slot[3] == context
                and self._same_image(entry, base, image)}

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# -- the tracker's tiles (``Sam3Segmenter``: ``tile_rgb``, ``embedding_key``) ------------------
def tile_box(tile) -> Box:
    return tile.r0, tile.c0, tile.r1, tile.c1


def context(model, grid, tile, limits) -> tuple:
    """What besides the pixels changes a tile's key: limits, the padded shape, storage."""
    return _context(model, grid.padded_shape(tile), limits)


def _context(model, shape, limits) -> tuple:
    lim = None if limits is None else np.asarray(limits, dtype=np.float64)
    lim = None if lim is None else (lim.shape, tuple(lim.ravel().tolist()))
    return lim, tuple(int(v) for v in shape), model.feature_cache.storage, model.key_dtype


def image_key(model, image, limits=None, made: dict | None = None) -> str:
    """The cache key of the embedding of the whole ``image`` (``Sam3Segmenter.encode``),
    remembered as tile keys are, per image object and limits as given (None: the
    robust limits, a function of the pixels, so the raw-pixel check covers them too).

    The rule: a key is reused only for the same object (held weakly), of the same shape
    and dtype, with the same limits, storage and key dtype; for a NumPy array (or a
    plane of one) only if a digest of its raw pixels is unchanged, so an in-place edit
    gives a new key. Lazy arrays are trusted while the object lives (see the module
    docstring). When the key has to be computed, the normalised image goes into
    ``made["rgb"]``."""
    if limits is not None:
        check_limits(limits)
    shape = tuple(int(v) for v in np.shape(image)[:2])

    def compute() -> str:
        rgb = model.prepare(image, limits)
        if made is not None:
            made["rgb"] = rgb
        return model.embedding_key(rgb)

    return model.tile_keys.get(image, (0, 0) + shape, _context(model, shape, limits), compute)


def tile_key(model, image, grid, tile, limits, made: dict | None = None) -> str:
    """The cache key of ``tile``'s embedding; when it has to be computed, the tile's RGB
    goes into ``made["rgb"]`` (so encoding does not normalise it twice)."""
    def compute() -> str:
        rgb = model.tile_rgb(image, grid, tile, limits)
        if made is not None:
            made["rgb"] = rgb
        return model.embedding_key(rgb)

    return model.tile_keys.get(image, tile_box(tile), context(model, grid, tile, limits),
                               compute)


def cached_tile(model, image, grid, tile, limits):
    """(the cached embedding of ``tile`` or None, and else its RGB to encode)."""
    made: dict = {}
    key = tile_key(model, image, grid, tile, limits, made)
    hit = model.feature_cache.get(key, model._loader(key, grid.padded_shape(tile)))
    if hit is not None:
        return hit, None
    rgb = made.get("rgb")
    return None, model.tile_rgb(image, grid, tile, limits) if rgb is None else rgb


def has_features(model, key: str) -> bool:
    """Whether ``key`` is in the memory LRU or the Zarr store (no read)."""
    return key in model.memory or (model.store is not None and model.store.contains(key))


def router(model, image, grid, limits):
    """``route(bbox) -> Tile`` for the prompts of one call: an encoded tile holding the
    prompt box with enough margin, else the one with the most margin (``TileGrid.route``).
    Each tile is looked up once per router (the image does not change during a call);
    with nothing cached anywhere (empty memory, no store) none is looked up."""
    nothing_cached = len(model.memory) == 0 and getattr(model.store, "path", None) is None
    if not model.reuse_encoded or nothing_cached:
        return grid.route
    seen: dict = {}

    def encoded(tile) -> bool:
        if tile not in seen:
            seen[tile] = has_features(model, tile_key(model, image, grid, tile, limits))
        return seen[tile]

    return lambda bbox: grid.route(bbox, encoded)


def encoded_tiles(model, image, limits=None, region=None, read: bool = False) -> list[Box]:
    """Boxes (row0, col0, row1, col1) of the tiles of ``image`` whose embeddings are in
    memory or the store, in grid order (meeting ``region`` if given).

    Without ``read`` only tiles whose keys are remembered for this image object count
    (those encoded, loaded or looked up for it): no pixel is read, a call costs well
    under a millisecond per tile. ``read=True`` also finds the keys of the other tiles
    (in ``region``), reading and hashing each once (~30-80 ms a 1008 px tile): e.g. to
    show tiles an earlier session stored, run in a worker."""
    limits = model.resolve_limits(image, limits)
    grid = model.tiles(image)
    tiles = grid.tiles_in(region)
    if read or grid.single:  # one tile: the image itself, small
        for t in tiles:
            tile_key(model, image, grid, t, limits)
    ctx = context(model, grid, tiles[0], limits) if tiles else None
    known = model.tile_keys.known(image, ctx) if tiles else {}
    return [tile_box(t) for t in tiles
            if tile_box(t) in known and has_features(model, known[tile_box(t)])]
