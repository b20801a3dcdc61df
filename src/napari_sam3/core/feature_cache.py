"""One lookup for a model's image features: the memory LRU, then the Zarr store, then
the model. The tracker's embeddings and the concept detector's ViT trunk both go
through it, each with its own keys (see ``TiledModel.feature_key``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cache import MemoryLRU
from .embedding_store import EmbeddingStore


class FeatureCache:
    """Features by content key: ``memory`` (recent values, as the model uses them), then
    ``store`` (NumPy arrays on disk; None: memory only), then ``compute``.

    ``load(arrays)`` turns stored arrays into a value (e.g. tensors on the device);
    ``dump(value)`` turns a computed value into the float32 arrays to store. A computed
    value is kept as the store serves it (rounded to the storage dtype), so a warm and
    a cold run see the same numbers.
    """

    def __init__(self, memory: MemoryLRU, store: EmbeddingStore | None):
        self.memory = memory
        self.store = store

    @property
    def storage(self) -> str:
        """What the values are rounded to: the store's dtype, or "memory" without one."""
        return self.store.storage_dtype.name if self.store is not None else "memory"

    def get(self, key: str, load: Callable[[list[np.ndarray]], object]):
        """The value for ``key`` from memory, else read from the store (then kept in
        memory); None when neither holds it. Nothing is computed."""
        hit = self.memory.get(key)
        if hit is None and self.store is not None:
            arrays = self.store.get(key)
            if arrays is not None:
                hit = load(arrays)
                self.memory.put(key, hit)
        return hit

    def get_or_compute(self, key: str, compute: Callable[[], object],
                       load: Callable[[list[np.ndarray]], object],
                       dump: Callable[[object], list[np.ndarray]],
                       meta: Callable[[], dict]):
        """The value for ``key``; on a miss ``compute()`` it, write ``dump(value)`` to the
        store with ``meta()`` and keep what the store serves back (through ``load``)."""
        hit = self.get(key, load)
        if hit is not None:
            return hit
        value = compute()
        if self.store is not None:
            value = load(self.store.put(key, dump(value), meta()))
        self.memory.put(key, value)
        return value
