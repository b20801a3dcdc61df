"""In-memory LRU of image embeddings, bounded in bytes."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def content_key(rgb: np.ndarray, *extra: object) -> str:
    """A hash of the pixels handed to the model plus anything else that changes the result."""
    h = hashlib.blake2b(digest_size=20)
    h.update(str(rgb.shape).encode())
    h.update(str(rgb.dtype).encode())
    h.update(np.ascontiguousarray(rgb).data)
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()


class MemoryLRU:
    """Thread-safe least-recently-used store; ``size_of(value)`` gives bytes."""

    def __init__(self, max_bytes: int, size_of):
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._items: OrderedDict[str, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        size = self._size_of(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._size_of(self._items.pop(key))
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size_of(old)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
