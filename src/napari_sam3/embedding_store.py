"""Image embeddings on disk (Zarr v3).

The segmenter keeps an in-memory LRU of recently used tiles (bounded in bytes)
in front of this store.

Layout of a store (a local folder)::

    embeddings.zarr/              group; attrs: {"napari_sam3": {"format_version": 1, ...}}
      tiles/<key>/                one group per encoded tile or slice; attrs: model,
        0, 1, 2                   preprocessing, shapes, dtype and a checksum per array;
                                  each array (C, h, w) is a single chunk
      tmp/                        entries being written

``key`` is a hash of the tile's pixels as handed to the model (after
normalisation and padding), the model fingerprint and the settings that change
the features (input size, compute dtype, storage dtype), so an edited image,
another model or other settings never get stale features.

Crash safety: an entry is written under ``tmp/`` and renamed into ``tiles/``
in one step, so a killed writer leaves no entry that reads as valid and a
second process writing the same key loses the rename race harmlessly. Every
read checks the checksums; a corrupt entry is deleted and recomputed. If the
folder cannot be created or written (read-only, disk full), the store warns
once and keeps working in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
STORE_KIND = "napari-sam3 image embeddings"


class CacheWarning(UserWarning):
    """The on-disk cache is unusable; work goes on in memory."""


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/napari-sam3/embeddings.zarr`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-sam3" / "embeddings.zarr"


def checksum(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).data, digest_size=16).hexdigest()


class EmbeddingStore:
    """get/put of per-tile feature lists (NumPy arrays, batch dimension dropped)."""

    def __init__(self, path, storage_dtype: str = "float16", on_warning=None):
        if np.dtype(storage_dtype) not in (np.float16, np.float32):
            raise ValueError("storage dtype must be float16 or float32")
        self.storage_dtype = np.dtype(storage_dtype)
        self.on_warning = on_warning
        self.path: Path | None = None
        self.disk_reads = 0
        self.disk_writes = 0
        if path is not None:
            try:
                self._open(Path(path).expanduser())
            except OSError as e:
                self._disable(f"cannot use the embedding cache at {path} ({_reason(e)})")

    # -- set-up -----------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        import zarr

        if path.exists() and (path / "zarr.json").is_file():
            attrs = zarr.open_group(path, mode="r").attrs.asdict().get("napari_sam3", {})
            if attrs.get("kind") != STORE_KIND:
                raise OSError(f"{path} is a Zarr store but not a napari-sam3 embedding cache")
            if attrs.get("format_version") != FORMAT_VERSION:
                raise OSError(f"cache format {attrs.get('format_version')} is not "
                              f"{FORMAT_VERSION}; clear it or choose another location")
        else:
            path.mkdir(parents=True, exist_ok=True)
            zarr.open_group(path, mode="a", zarr_format=3, attributes={"napari_sam3": {
                "kind": STORE_KIND, "format_version": FORMAT_VERSION,
                "layout": "tiles/<key>/{0,1,2}: (C, h, w) one chunk each",
            }})
        for sub in ("tiles", "tmp"):
            (path / sub).mkdir(exist_ok=True)
        probe = path / "tmp" / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")  # fails early on a read-only location
        probe.unlink()
        self.path = path

    def _disable(self, message: str) -> None:
        self.path = None
        message += "; embeddings are kept in memory only"
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            warnings.warn(message, CacheWarning, stacklevel=3)

    # -- public -----------------------------------------------------------------------------
    def get(self, key: str) -> list[np.ndarray] | None:
        return None if self.path is None else self._read(key)

    def contains(self, key: str) -> bool:
        """Cheap check (no read, no checksum) for precompute planning."""
        return self.path is not None and (self.path / "tiles" / key / "zarr.json").is_file()

    def put(self, key: str, feats, meta: dict | None = None) -> list[np.ndarray]:
        """Store features; returns them as they will be served from disk (rounded to the
        storage dtype), or unchanged when the store is not usable."""
        if self.path is None:
            return list(feats)
        stored = [np.ascontiguousarray(f, dtype=self.storage_dtype) for f in feats]
        try:
            self._write(key, stored, meta or {})
        except OSError as e:
            self._disable(f"cannot write the embedding cache at {self.path} ({_reason(e)})")
            return list(feats)
        return stored

    def clear(self) -> None:
        """Drop every entry on disk."""
        if self.path is not None:
            for sub in ("tiles", "tmp"):
                shutil.rmtree(self.path / sub, ignore_errors=True)
                (self.path / sub).mkdir(exist_ok=True)

    def disk_entries(self) -> list[str]:
        if self.path is None:
            return []
        return sorted(p.name for p in (self.path / "tiles").iterdir()
                      if (p / "zarr.json").is_file())

    def disk_bytes(self) -> int:
        if self.path is None:
            return 0
        return sum(f.stat().st_size for f in (self.path / "tiles").rglob("*") if f.is_file())

    # -- disk -------------------------------------------------------------------------------
    def _write(self, key: str, feats: list[np.ndarray], meta: dict) -> None:
        import zarr

        final = self.path / "tiles" / key
        if (final / "zarr.json").is_file():
            return
        tmp = self.path / "tmp" / f"{key}.{uuid.uuid4().hex}"
        try:
            attrs = {"meta": _jsonable(meta), "dtype": self.storage_dtype.name,
                     "shapes": [list(f.shape) for f in feats],
                     "checksums": [checksum(f) for f in feats]}
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            for i, f in enumerate(feats):
                arr = group.create_array(str(i), shape=f.shape, dtype=f.dtype, chunks=f.shape)
                arr[...] = f
            group.attrs.update(attrs)  # last: an entry without checksums is never valid
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "zarr.json").is_file():  # not a lost race: a real failure
                    raise
            self.disk_writes += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _read(self, key: str) -> list[np.ndarray] | None:
        import zarr

        entry = self.path / "tiles" / key
        if not (entry / "zarr.json").is_file():
            return None
        try:
            group = zarr.open_group(entry, mode="r")
            attrs = group.attrs.asdict()
            feats = [np.asarray(group[str(i)][...]) for i in range(len(attrs["checksums"]))]
            ok = all(checksum(f) == c for f, c in zip(feats, attrs["checksums"], strict=True))
        except Exception:  # unreadable chunk or metadata: treat as corrupt
            ok = False
        if not ok:
            shutil.rmtree(entry, ignore_errors=True)
            return None
        self.disk_reads += 1
        return feats


def _reason(e: OSError) -> str:
    return e.strerror or str(e).splitlines()[0]


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
