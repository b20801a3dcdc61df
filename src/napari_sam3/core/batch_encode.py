"""Several tiles per image-encoder forward, the next batch prepared while one encodes.

A GPU runs the ViT faster per tile on a batch of tiles; a CPU does not (its matrix
products are already large), so the default there stays one tile per forward
(:func:`default_batch_size`) and the one-tile path is unchanged. With batches, preparing
the next batch (reading the tiles, normalising them, hashing them for their cache keys,
the processor's resize) runs in a helper thread, and storing the last one (to host,
float16, checksum, Zarr) in others, while the model encodes: torch, NumPy's arithmetic,
blake2b and the Zarr codecs release the GIL.

Batched embeddings equal those of one tile at a time up to float32 rounding on a CPU
(a matrix product's blocking depends on its row count); each tile's embedding owns its
memory (a copy out of the batch), so the memory LRU's size bound stays true.

torch is imported inside functions only.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import tile_keys

CUDA_BATCH = 1  # tiles per forward on CUDA by default: 1 until a GPU run measures batches
WRITERS = 8  # at most this many threads store encoded tiles while the next batch encodes


def default_batch_size(device: str) -> int:
    """Tiles per encoder forward when none is given: 1 except on CUDA."""
    return CUDA_BATCH if str(device).startswith("cuda") else 1


def check_batch_size(batch_size, device: str = "cpu") -> int:
    """``batch_size`` as a whole number >= 1 (None: :func:`default_batch_size`)."""
    if batch_size is None:
        return default_batch_size(device)
    try:
        whole = not isinstance(batch_size, bool) and int(batch_size) == batch_size >= 1
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    return int(batch_size)


def pixel_batch(segmenter, rgbs: Sequence[np.ndarray]):
    """The processor's (B, 3, S, S) float32 pixels of several (H, W, 3) uint8 images, on
    the host (in page-locked memory when the model is on CUDA, for an asynchronous copy)."""
    pixels = segmenter.processor(images=list(rgbs), return_tensors="pt")["pixel_values"]
    return pixels.pin_memory() if str(segmenter.device).startswith("cuda") else pixels


def encode_pixels(segmenter, pixels, shapes, keys=None) -> list:
    """One encoder forward over a batch of processor pixels: an ``ImageEmbedding`` per
    image (``shapes``: each image's (H, W); ``keys``: their cache keys). Counts each
    image in ``segmenter.encoder_calls``."""
    import torch

    from .segmenter import ImageEmbedding, image_features, with_no_memory

    keys = [""] * len(shapes) if keys is None else list(keys)
    px = pixels.to(segmenter.device, segmenter.dtype, non_blocking=True)
    out = []
    with torch.inference_mode():
        levels = image_features(segmenter.model, px)
        for i, shape in enumerate(shapes):
            raw = [level[i:i + 1].clone() for level in levels]  # owns its memory
            out.append(ImageEmbedding(key=keys[i], raw=raw,
                                      features=with_no_memory(segmenter.model, raw),
                                      image_shape=tuple(int(v) for v in shape[:2])))
    segmenter.encoder_calls += len(out)
    return out


def encode_batch(segmenter, rgbs: Sequence[np.ndarray], keys=None) -> list:
    """``Sam3Segmenter.encode_rgb`` for several (H, W, 3) uint8 images in one forward
    (no cache): an ``ImageEmbedding`` each, in order."""
    return encode_pixels(segmenter, pixel_batch(segmenter, rgbs),
                         [r.shape[:2] for r in rgbs], keys)


# -- tiles of an image, batched, into the feature cache ------------------------------------------
@dataclass
class _Tile:
    index: int
    state: str  # "skipped", "cached" or "encode"
    key: str | None = None
    rgb: np.ndarray | None = None


def _prepare(segmenter, image, grid, indices, limits, skip):
    """The tiles of one batch as the encoder needs them, and their pixels (None: none to
    encode). A tile whose features are in memory or the store is "cached" (not loaded)."""
    tiles = []
    for k in indices:
        tile = grid.tiles[k]
        if skip is not None and skip.empty(image, grid, tile, limits):
            tiles.append(_Tile(k, "skipped"))
            continue
        made: dict = {}
        key = tile_keys.tile_key(segmenter, image, grid, tile, limits, made)
        if tile_keys.has_features(segmenter, key):
            tiles.append(_Tile(k, "cached", key))
            continue
        rgb = made.get("rgb")
        if rgb is None:
            rgb = segmenter.tile_rgb(image, grid, tile, limits)
        tiles.append(_Tile(k, "encode", key, rgb))
    rgbs = [t.rgb for t in tiles if t.state == "encode"]
    return tiles, (pixel_batch(segmenter, rgbs) if rgbs else None)


def _keep(segmenter, grid, tile, limits, rgb, emb) -> None:
    """Put a tile's embedding, computed in a batch, into the feature cache as
    ``Sam3Segmenter.encode_tile`` does (same key, same stored metadata)."""
    from .segmenter import _limits_meta

    meta = {"limits": _limits_meta(limits), "tile": [tile.r0, tile.c0, tile.r1, tile.c1],
            "tile_size": grid.tile_size, "overlap": grid.overlap}
    ahead = segmenter.__dict__.setdefault("_encoded_ahead", {})
    ahead[emb.key] = emb  # what encode_rgb returns for this key instead of encoding
    try:
        segmenter.embed_rgb(rgb, meta)
    finally:
        ahead.pop(emb.key, None)


def iter_encode_tiles(segmenter, image, grid, indices, limits, skip=None,
                      batch_size: int = 1) -> Iterator[tuple[int, str | None, str]]:
    """Encode tiles ``indices`` of ``image`` (on ``grid``) into the segmenter's feature
    cache, ``batch_size`` per forward. While a batch encodes, one thread reads and
    normalises the next and up to :data:`WRITERS` threads store the one before (the
    store's conversion, checksum and compression release the GIL). Yields ``(index, key
    or None, "encoded" | "cached" | "skipped")`` per tile, in order, once its batch is
    stored. Closing the generator stops after the batches under way are stored."""
    indices = list(indices)
    batch_size = check_batch_size(batch_size)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if not batches:
        return
    writers = max(1, min(WRITERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(1, thread_name_prefix="napari-sam3-read") as reader, \
            ThreadPoolExecutor(writers, thread_name_prefix="napari-sam3-store") as writer:
        ahead = reader.submit(_prepare, segmenter, image, grid, batches[0], limits, skip)
        stored: deque = deque()  # (tiles, store futures) of the batches not yet reported
        for b in range(len(batches)):
            tiles, pixels = ahead.result()
            if b + 1 < len(batches):
                ahead = reader.submit(_prepare, segmenter, image, grid, batches[b + 1], limits,
                                      skip)
            todo = [t for t in tiles if t.state == "encode"]
            futures = []
            if todo:
                embs = encode_pixels(segmenter, pixels, [t.rgb.shape[:2] for t in todo],
                                     [t.key for t in todo])
                if segmenter.store is not None:  # the store keeps what it serves back
                    embs = [_on_host(e) for e in embs]  # copied now: the GPU goes on
                futures = [writer.submit(_keep, segmenter, grid, grid.tiles[t.index], limits,
                                         t.rgb, emb) for t, emb in zip(todo, embs, strict=True)]
                del embs
            stored.append((tiles, futures))
            while len(stored) > 1 or (stored and b + 1 == len(batches)):
                yield from _reported(*stored.popleft())


def _on_host(emb):
    """``emb`` with its raw levels copied to the host as float32 (what the store takes):
    done on the encoding thread, so storing threads never wait on the device."""
    from .segmenter import ImageEmbedding

    host = [level.float().cpu() for level in emb.raw]
    return ImageEmbedding(key=emb.key, raw=host, features=host, image_shape=emb.image_shape)


def _reported(tiles, futures):
    for f in futures:
        f.result()  # a failed write is raised here
    for t in tiles:
        t.rgb = None
        yield t.index, t.key, "encoded" if t.state == "encode" else t.state


def precompute_batched(segmenter, image, grid, indices, limits, skip, report,
                       batch_size: int) -> Iterator[tuple[int, int, bool]]:
    """``Sam3Segmenter.precompute`` without a cluster, ``batch_size`` tiles per forward:
    yields ``(done, total, encoded)`` per tile into ``report`` (a ``PrecomputeReport``)."""
    total = len(indices)
    steps = iter_encode_tiles(segmenter, image, grid, indices, limits, skip, batch_size)
    for done, (k, _key, state) in enumerate(steps, 1):
        report.add(tile_keys.tile_box(grid.tiles[k]), None, state)
        yield done, total, state == "encoded"


__all__ = ["default_batch_size", "check_batch_size", "pixel_batch", "encode_pixels",
           "encode_batch", "iter_encode_tiles", "precompute_batched", "CUDA_BATCH"]
