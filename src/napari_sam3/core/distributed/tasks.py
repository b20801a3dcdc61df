"""The functions dask workers run: one tile (or a small batch of tiles) per task.

Each gets a :class:`~.sources.ModelSpec` (the model, loaded once per worker process),
the image as :func:`~.sources.ship` gave it, tile indices into the image's tile grid and
the run's settings, and returns only keys and small results: precompute writes its
entries into the shared store itself (the store's atomic write), segment-everything and
concepts return the tile's instances (boolean crops) for the client to merge.
"""

from __future__ import annotations

import threading

from .. import tile_keys
from .sources import plane, worker_model

# a worker process has one model (sources.worker_model) but may run several tasks at once
# (a dask worker has one thread per core by default): they take turns, each with all of
# the worker's torch threads
_MODEL_LOCK = threading.Lock()


class WorkerCacheError(RuntimeError):
    """A worker cannot write the shared embedding cache."""


def _tracker(spec):
    model = worker_model(spec)
    store = model.store
    if spec.cache is not None and (store is None or store.path is None):
        raise WorkerCacheError(f"this worker cannot use the embedding cache at {spec.cache}: "
                               "put it on a filesystem every worker can write")
    return model


def precompute_tiles(spec, data, lead, indices, limits, skip, batch_size: int = 1
                     ) -> list[tuple]:
    """Encode tiles ``indices`` of the image into the shared store, ``batch_size`` per
    encoder forward: ``(index, key or None, "encoded" | "cached" | "skipped")`` each."""
    with _MODEL_LOCK:
        model = _tracker(spec)
        image = plane(data, lead)
        grid = model.tiles(image)
        if batch_size > 1:
            from ..batch_encode import iter_encode_tiles

            return list(iter_encode_tiles(model, image, grid, indices, limits, skip,
                                          batch_size))
        out = []
        for k in indices:
            tile = grid.tiles[k]
            if skip is not None and skip.empty(image, grid, tile, limits):
                out.append((k, None, "skipped"))
                continue
            before = model.encoder_calls
            model.encode_tile(image, grid, tile, limits)
            key = tile_keys.tile_key(model, image, grid, tile, limits)  # remembered: no read
            out.append((k, key, "encoded" if model.encoder_calls > before else "cached"))
        return out


def everything_tile(spec, data, lead, k, limits, settings, skip):
    """``(k, instances of tile k, or None when skipped)`` of segment-everything."""
    with _MODEL_LOCK:
        from ..everything import tile_instances

        model = _tracker(spec)
        image = plane(data, lead)
        return k, tile_instances(model, image, model.tiles(image), k, limits, settings, skip=skip)


def concept_tile(spec, data, lead, k, limits, prompt, floor, skip):
    """``(k, candidates of tile k, or None when skipped)`` of the concept detector."""
    with _MODEL_LOCK:
        model = worker_model(spec)
        return k, model.tile_candidates(plane(data, lead), prompt, k, limits, floor, skip)
