"""Image embeddings on disk (Zarr v3).

The segmenter keeps an in-memory LRU of recently used tiles (bounded in bytes)
in front of this store.

Layout of a store (a local folder)::

    embeddings.zarr/              group; attrs: {"napari_sam3": {"kind": STORE_KIND,
                                  "format_version": 1, ...}}: the marker of our stores
      tiles/<key>/                one group per encoded tile or slice; attrs: model,
        0, 1, 2                   preprocessing, shapes, dtype and a checksum per array;
                                  each array (C, h, w) is a single chunk
      tmp/<key>.<uuid>/           entries being written
      images/<image id>.json      what the last precompute of an image used (its
                                  intensity limits), so another process, on another
                                  machine or path, normalises that image the same way

``key`` is a hash of the tile's pixels as handed to the model (after
normalisation and padding), the model fingerprint and the settings that change
the features (input size, storage dtype; the compute dtype only when asked for:
it is recorded in every entry), so an edited image, another model or other
settings never get stale features.

Whose files: a location is used only if it does not exist, is an empty folder, or
already holds a store of ours (recognised by the marker in its ``zarr.json``); a
folder of other files, another Zarr store or a store of another format version is
refused (one warning, memory only). ``clear`` deletes only what a store writes:
key-named entries in ``tiles/`` and leftovers in ``tmp/``, never other files.

Crash safety: an entry is written under ``tmp/`` and renamed into ``tiles/``
in one step, so a killed writer leaves no entry that reads as valid and a
second process writing the same key loses the rename race harmlessly. Every
read checks the checksums; a corrupt entry is deleted and recomputed. If the
folder cannot be created or written (read-only, disk full), the store warns
once and keeps working in memory.

Leftovers: a killed writer leaves its ``tmp/`` entry behind. Several processes (or
machines) share a store, so a leftover is told from a write in progress by age alone:
older than :data:`ORPHAN_AGE_S` (24 h; writing one entry takes seconds). Opening a
store for writing and ``clear`` remove them; ``orphans`` lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
STORE_KIND = "napari-sam3 image embeddings"
#: A ``tmp/`` entry older than this (seconds) is a killed writer's leftover.
ORPHAN_AGE_S = 24 * 3600

_KEY = re.compile(r"[0-9a-f]{16,128}")  # a hex digest, e.g. cache.content_key's
_TMP = re.compile(r"(?:[0-9a-f]{16,128}\.|\.probe-)[0-9a-f]{32}")  # _write's, _open's
_RECORD = re.compile(r"[0-9a-f]{32}\.json")  # images/<image_id>.json
_NOT_OURS = "that is not a napari-sam3 embedding cache"
_OS_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # a folder holding only these is empty


class CacheWarning(UserWarning):
    """The on-disk cache is unusable; work goes on in memory."""


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/napari-sam3/embeddings.zarr`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-sam3" / "embeddings.zarr"


def checksum(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).data, digest_size=16).hexdigest()


def _zarr_json(folder: Path) -> dict:
    """``folder/zarr.json`` parsed (OSError or ValueError if it cannot be)."""
    meta = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def _marker(path: Path) -> tuple[dict | None, str | None]:
    """(our marker attributes, None) if the folder ``path`` is a store of ours (any format
    version), else (None, what it is instead). Reads ``zarr.json`` only."""
    if not (path / "zarr.json").is_file():
        return None, f"a folder {_NOT_OURS}"
    try:
        meta = _zarr_json(path)
    except (OSError, ValueError) as e:
        return None, (f"a folder with an unreadable zarr.json ({_reason(e)}), not "
                      "recognisable as a napari-sam3 embedding cache")
    if meta.get("node_type") == "array":
        return None, f"a Zarr array {_NOT_OURS}"
    attrs = meta.get("attributes")
    ours = attrs.get("napari_sam3") if isinstance(attrs, dict) else None
    if meta.get("node_type") != "group" or not isinstance(ours, dict) \
            or ours.get("kind") != STORE_KIND:
        return None, f"a Zarr store {_NOT_OURS}"
    return ours, None


def _is_newer(marker: dict) -> bool:
    version = marker.get("format_version")
    return isinstance(version, int) and version > FORMAT_VERSION


def _version_problem(marker: dict, path: Path) -> str | None:
    version = marker.get("format_version")
    if version == FORMAT_VERSION:
        return None
    if _is_newer(marker):
        return (f"a napari-sam3 embedding cache of a newer format ({version}; this version "
                f"uses {FORMAT_VERSION}): use the napari-sam3 that wrote it, or choose "
                "another location")
    return (f"a napari-sam3 embedding cache of an older format ({version}; this version uses "
            f"{FORMAT_VERSION}): clear it ('napari-sam3 cache clear --cache {path}'), or "
            "choose another location")


def location_problem(path) -> str | None:
    """Why the folder ``path`` cannot hold an embedding cache, or None; changes nothing.

    Usable: a folder that does not exist yet (in a writable place), an empty folder, or a
    store of ours of this format version. Anything else holds files that are not ours.
    """
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        return "not a folder" if existing == path else f"{existing} is not a folder"
    if existing == path and any(p.name not in _OS_FILES for p in path.iterdir()):
        marker, other = _marker(path)
        if other is not None:
            return f"{other}; choose an empty or new folder"
        if problem := _version_problem(marker, path):
            return problem
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _age_s(path: Path) -> float:
    return time.time() - path.lstat().st_mtime


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        self.format_problem: str | None = None  # a store of an older format (``existing``)
        if path is not None:
            path = Path(path).expanduser()
            try:
                if problem := location_problem(path):
                    self._disable(f"cannot use the embedding cache at {path} ({problem})")
                else:
                    self._open(path)
            except Exception as e:  # noqa: BLE001 - a cache problem never stops the work
                self._disable(f"cannot use the embedding cache at {path} ({_reason(e)})")

    @classmethod
    def existing(cls, path) -> EmbeddingStore:
        """The store of ours at ``path``, of this or an older format version, to inspect
        or clear; creates and changes nothing. ValueError saying what ``path`` is otherwise
        (a newer version's store included: its layout is not ours to know)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError("not a folder")
        marker, other = _marker(path)
        if other is not None:
            raise ValueError(other)
        if _is_newer(marker):
            raise ValueError(_version_problem(marker, path))
        store = cls(None)
        store.path = path
        store.format_problem = _version_problem(marker, path)
        return store

    # -- set-up -----------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        if not (path / "zarr.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            self._write_marker(path)
        for sub in ("tiles", "tmp"):
            (path / sub).mkdir(exist_ok=True)
        probe = path / "tmp" / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")  # fails early on a read-only location
        probe.unlink()
        self.path = path
        self._remove_orphans()

    @staticmethod
    def _write_marker(path: Path) -> None:
        import zarr

        group = zarr.open_group(path, mode="a", zarr_format=3)  # creates or keeps the group
        group.attrs["napari_sam3"] = {
            "kind": STORE_KIND, "format_version": FORMAT_VERSION,
            "layout": "tiles/<key>/{0,1,2}: (C, h, w) one chunk each",
        }

    def _disable(self, message: str) -> None:
        self.path = None
        message += "; embeddings are kept in memory only"
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            warnings.warn(message, CacheWarning, stacklevel=3)

    # -- public -----------------------------------------------------------------------------
    def get(self, key: str) -> list[np.ndarray] | None:
        return None if self.path is None else self._read(_checked(key))

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
            self._write(_checked(key), stored, meta or {})
        except OSError as e:
            self._disable(f"cannot write the embedding cache at {self.path} ({_reason(e)})")
            return list(feats)
        return stored

    def clear(self) -> int:
        """Delete every entry and every leftover (:meth:`orphans`) this store wrote, and
        nothing else: other files in the folder stay, and so do other processes' writes in
        progress. A store of an older format version is then marked as this version's.
        Returns the number of leftovers removed."""
        if self.path is None:
            return 0
        for entry in self._entry_dirs():
            shutil.rmtree(entry, ignore_errors=True)
        for record in self._record_files():
            record.unlink(missing_ok=True)
        removed = self._remove_orphans()
        if self.format_problem is not None:
            self._write_marker(self.path)
            self.format_problem = None
        return removed

    def disk_entries(self) -> list[str]:
        return sorted(p.name for p in self._entry_dirs())

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for entry in self._entry_dirs()
                   for f in entry.rglob("*") if f.is_file())

    def orphans(self) -> list[Path]:
        """Leftovers of killed writers: our ``tmp/`` entries older than ORPHAN_AGE_S."""
        if self.path is None or not (self.path / "tmp").is_dir():
            return []
        found = []
        for p in (self.path / "tmp").iterdir():
            try:
                if _TMP.fullmatch(p.name) and _age_s(p) > ORPHAN_AGE_S:
                    found.append(p)
            except OSError:  # removed meanwhile by another process
                pass
        return sorted(found)

    def put_record(self, image: str, record: dict) -> None:
        """Remember ``record`` (JSON-able: e.g. the limits a precompute used) for the image
        whose :func:`image_id` is ``image``; written by rename, the last writer wins."""
        if self.path is None or not re.fullmatch(r"[0-9a-f]{32}", image):
            return
        folder = self.path / "images"
        try:
            folder.mkdir(exist_ok=True)
            tmp = self.path / "tmp" / f"{image}.{uuid.uuid4().hex}"
            tmp.write_text(json.dumps(_jsonable(record)), encoding="utf-8")
            os.replace(tmp, folder / f"{image}.json")
        except OSError:
            pass  # a record is a convenience: the entries stay valid without it

    def get_record(self, image: str) -> dict | None:
        """The record of :meth:`put_record` for ``image``, or None."""
        if self.path is None or not re.fullmatch(r"[0-9a-f]{32}", image):
            return None
        try:
            found = json.loads((self.path / "images" / f"{image}.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    # -- disk -------------------------------------------------------------------------------
    def has_records(self) -> bool:
        """Whether any image record is stored (a directory listing, no reads)."""
        folder = None if self.path is None else self.path / "images"
        return folder is not None and folder.is_dir() and any(folder.iterdir())

    def _record_files(self) -> list[Path]:
        folder = None if self.path is None else self.path / "images"
        if folder is None or not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if _RECORD.fullmatch(p.name) and p.is_file()]

    def _entry_dirs(self) -> list[Path]:
        """Entries we wrote: key-named folders in ``tiles/`` with our entry attributes."""
        if self.path is None or not (self.path / "tiles").is_dir():
            return []
        return [p for p in (self.path / "tiles").iterdir()
                if _KEY.fullmatch(p.name) and not p.is_symlink() and _is_entry(p)]

    def _remove_orphans(self) -> int:
        found = self.orphans()
        for p in found:
            _remove(p)
        return len(found)

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


def image_id(data, window: int = 64, grid: int = 4, planes: int = 8) -> str:
    """A short identity of an image array (NumPy, Zarr, dask; any path): its shape,
    dtype and the pixels of a fixed grid of small windows on up to ``planes`` leading
    planes. The same pixels give the same id wherever the file lies; reads a few KB."""
    shape = tuple(int(s) for s in data.shape)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{shape}{np.dtype(data.dtype).str}".encode())
    rgb = len(shape) >= 3 and shape[-1] in (2, 3, 4)
    yx = len(shape) - (3 if rgb else 2)
    lead_shape = shape[:yx]
    leads = [()]
    if lead_shape:
        flat = int(np.prod(lead_shape))
        picks = np.unique(np.linspace(0, flat - 1, min(planes, flat)).astype(int))
        leads = [tuple(int(v) for v in np.unravel_index(k, lead_shape)) for k in picks]
    rows = np.unique(np.linspace(0, max(shape[yx] - window, 0), grid).astype(int))
    cols = np.unique(np.linspace(0, max(shape[yx + 1] - window, 0), grid).astype(int))
    for lead in leads:
        for r in rows:
            for c in cols:
                a = np.ascontiguousarray(data[lead + (slice(r, r + window), slice(c, c + window))])
                h.update(a.tobytes())
    return h.hexdigest()


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _checked(key: str) -> str:
    """Keys name folders: hex digests only (never a path of the caller's choosing)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"embedding key must be a lowercase hex digest, got {key!r}")
    return key


def _is_entry(folder: Path) -> bool:
    """True if ``folder/zarr.json`` is a group with the attributes ``_write`` gives it."""
    try:
        meta = _zarr_json(folder)
        attrs = meta.get("attributes")
        return meta.get("node_type") == "group" and isinstance(attrs, dict) \
            and isinstance(attrs.get("checksums"), list)
    except (OSError, ValueError):
        return False


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
