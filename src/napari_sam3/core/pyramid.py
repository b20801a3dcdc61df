"""A labels pyramid on disk: level 0 at full resolution, lower levels by stride sampling.

Level ``k`` holds every ``f``-th pixel of level 0 along rows and columns (``f`` its
integer factor per axis; the leading z/t axes are never downsampled), so
``level_k == level_0[..., ::f_r, ::f_c]`` exactly: labels keep their ids at every zoom.
A write of a region at level 0 updates the same region of every lower level from the
written values alone, so only the chunks under that region are touched, at any level.

Levels are the image's own (when it is multiscale with integer factors), else halvings
until the top level is at most ``TOP`` pixels a side; no level but level 0 is wider than
``TEXTURE`` (what napari draws at once). Arrays are Zarr v3 in one group with
OME-NGFF-style ``multiscales`` attributes. NumPy and Zarr only; no Qt, no napari.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TOP = 1024  # the top level is at most this many pixels a side
TEXTURE = 16384  # napari's largest texture: no level but level 0 is wider
CHUNK = 1024  # chunk side of every level


def factor_of(full: int, small: int) -> int | None:
    """The integer stride that samples ``small`` pixels out of ``full``, or None."""
    if small < 1 or small > full:
        return None
    f = max(1, round(full / small))
    return f if (small - 1) * f < full <= (small + 1) * f else None


def level_shapes(shape: Sequence[int], n_lead: int, image_levels=None, top: int | None = None,
                 texture: int | None = None) -> list[tuple[int, ...]]:
    """Shapes of the pyramid's levels for labels of ``shape`` (``n_lead`` leading axes).

    ``image_levels``: the (*lead, H, W) shapes of a multiscale image's levels; those that
    keep the leading axes and sample level 0 by integer strides are used, then halvings
    follow until the top level fits in ``top``. Levels above 0 wider than ``texture``
    are left out (defaults: ``TOP`` and ``TEXTURE``).
    """
    top = TOP if top is None else int(top)
    texture = TEXTURE if texture is None else int(texture)
    shape = tuple(int(s) for s in shape)
    lead, (h, w) = shape[:n_lead], shape[n_lead:]
    planes = [(h, w)]
    for level in list(image_levels or [])[1:]:
        level = tuple(int(s) for s in level)
        if len(level) != len(shape) or level[:n_lead] != lead:
            break
        lh, lw = level[n_lead:]
        ph, pw = planes[-1]
        if (lh, lw) == (ph, pw) or lh > ph or lw > pw:
            break
        if factor_of(h, lh) is None or factor_of(w, lw) is None:
            break
        planes.append((lh, lw))
    while max(planes[-1]) > top:
        ph, pw = planes[-1]
        planes.append((math.ceil(ph / 2), math.ceil(pw / 2)))
    kept = [planes[0]] + [p for p in planes[1:] if max(p) <= texture]
    return [lead + p for p in kept]


def _chunks(shape: tuple[int, ...], n_lead: int) -> tuple[int, ...]:
    return (1,) * n_lead + tuple(min(CHUNK, int(s)) for s in shape[n_lead:])


class Pyramid:
    """Levels of a labels image (array-likes, largest first) written through level 0.

    ``read(key)`` reads level 0; ``write(key, values)`` writes level 0 and the same
    region of every lower level. Keys are ints and step-less slices, leading axes first;
    missing trailing axes mean the whole axis.
    """

    def __init__(self, levels: Sequence, n_lead: int | None = None):
        self.levels = list(levels)
        base = self.levels[0]
        self.shape = tuple(int(s) for s in base.shape)
        self.dtype = np.dtype(base.dtype)
        self.ndim = len(self.shape)
        self.n_lead = self.ndim - 2 if n_lead is None else int(n_lead)
        h, w = self.shape[-2:]
        self.factors: list[tuple[int, int]] = []
        for level in self.levels:
            lshape = tuple(int(s) for s in level.shape)
            fr, fc = factor_of(h, lshape[-2]), factor_of(w, lshape[-1])
            if fr is None or fc is None or lshape[:-2] != self.shape[:-2]:
                raise ValueError(f"level of shape {lshape} is not a stride sampling of "
                                 f"{self.shape}")
            self.factors.append((fr, fc))

    @classmethod
    def create(cls, path: str | os.PathLike, shape: Sequence[int], n_lead: int,
               image_levels=None, dtype=np.int32, axes: str | None = None) -> Pyramid:
        """An empty (all 0) pyramid as a Zarr v3 group at ``path``: nothing is allocated
        or written but metadata (chunks never written read as 0)."""
        import zarr

        from .io import _AXIS_TYPES, label_axes

        shape = tuple(int(s) for s in shape)
        shapes = level_shapes(shape, n_lead, image_levels)
        names = label_axes(len(shape), axes)
        datasets = []
        for k, lshape in enumerate(shapes):
            scale = [1.0] * n_lead + [float(factor_of(s, ls)) for s, ls in
                                      zip(shape[-2:], lshape[-2:], strict=True)]
            datasets.append({"path": str(k),
                             "coordinateTransformations": [{"type": "scale", "scale": scale}]})
        multiscale = {"axes": [{"name": a, "type": _AXIS_TYPES[a]} for a in names],
                      "datasets": datasets, "name": Path(path).stem}
        attrs = {"multiscales": [{"version": "0.4", **multiscale}],
                 "image-label": {"version": "0.4"},
                 "ome": {"version": "0.5", "multiscales": [multiscale], "image-label": {}}}
        group = zarr.open_group(Path(path), mode="w", zarr_format=3, attributes=attrs)
        levels = [group.create_array(str(k), shape=lshape, chunks=_chunks(lshape, n_lead),
                                     dtype=np.dtype(dtype), fill_value=0,
                                     dimension_names=list(names))
                  for k, lshape in enumerate(shapes)]
        return cls(levels, n_lead)

    @classmethod
    def open(cls, path: str | os.PathLike, n_lead: int | None = None) -> Pyramid:
        """The pyramid :meth:`create` made at ``path``."""
        import zarr

        group = zarr.open_group(Path(path), mode="r+")
        datasets = group.attrs["multiscales"][0]["datasets"]
        return cls([group[d["path"]] for d in datasets], n_lead)

    # -- keys --------------------------------------------------------------------------------
    def full_key(self, key) -> tuple:
        """``key`` with every axis given: ints, and slices with a start and a stop."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim:
            raise IndexError(f"{len(key)} indices for a {self.ndim}D pyramid")
        out = []
        for k, n in zip(key + (slice(None),) * (self.ndim - len(key)), self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("pyramid keys take slices without a step")
                out.append(slice(start, max(start, stop)))
            else:
                k = int(k)
                if not -n <= k < n:
                    raise IndexError(f"index {k} is outside an axis of {n}")
                out.append(k % n)
        return tuple(out)

    def region_at(self, level: int, key: tuple) -> tuple[tuple, tuple[slice, slice]] | None:
        """(key at ``level``, (rows, cols) of the level-0 values it samples) for a full
        level-0 ``key``; None when no pixel of that level falls inside it."""
        fr, fc = self.factors[level]
        lh, lw = (int(s) for s in self.levels[level].shape[-2:])
        rows, cols = key[-2], key[-1]
        i0, i1 = -(-rows.start // fr), min(-(-rows.stop // fr), lh)
        j0, j1 = -(-cols.start // fc), min(-(-cols.stop // fc), lw)
        if i1 <= i0 or j1 <= j0:
            return None
        a, b = i0 * fr - rows.start, j0 * fc - cols.start
        take = (slice(a, a + (i1 - i0) * fr, fr), slice(b, b + (j1 - j0) * fc, fc))
        return key[:-2] + (slice(i0, i1), slice(j0, j1)), take

    # -- reading and writing -----------------------------------------------------------------
    def read(self, key=()) -> np.ndarray:
        """Level 0 at ``key`` as a NumPy array."""
        return np.asarray(self.levels[0][self.full_key(key)])

    def write(self, key, values) -> None:
        """Write ``values`` at level 0 over ``key`` and the same region of every lower
        level (stride sampling of the written values: nothing else is read)."""
        key = self.full_key(key)
        shape = tuple(s.stop - s.start for s in key if isinstance(s, slice))
        values = np.broadcast_to(np.asarray(values).astype(self.dtype, copy=False), shape)
        if not values.size:
            return
        self.levels[0][key] = values
        for k in range(1, len(self.levels)):
            where = self.region_at(k, key)
            if where is not None:
                lkey, (rows, cols) = where
                self.levels[k][lkey] = values[..., rows, cols]

    def __getitem__(self, key) -> np.ndarray:
        return self.read(key)

    def __setitem__(self, key, values) -> None:
        self.write(key, values)


class QueuedPyramid(Pyramid):
    """A :class:`Pyramid` whose writes run in order in one background thread, so the
    caller (napari's GUI thread) never waits for the disk; reads wait for them first.

    ``on_written(error)`` runs in the writer thread each time the queue empties
    (``error``: the first exception among those writes, else None); :meth:`wait` blocks
    until the queue is empty and raises that error when no ``on_written`` reported it.
    """

    def __init__(self, levels: Sequence, n_lead: int | None = None):
        super().__init__(levels, n_lead)
        self.on_written: Callable[[BaseException | None], None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._queued = 0
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        _QUEUED.add(self)

    @property
    def pending(self) -> bool:
        """Writes are queued or running."""
        return not self._idle.is_set()

    def write(self, key, values) -> None:
        """Queue the write of ``values`` over ``key`` (a copy of them: the caller may
        reuse its array); it lands at every level in submission order."""
        key = self.full_key(key)
        shape = tuple(s.stop - s.start for s in key if isinstance(s, slice))
        values = np.array(np.broadcast_to(np.asarray(values).astype(self.dtype, copy=False),
                                          shape))
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="napari-sam3-labels")
            self._queued += 1
            self._idle.clear()
        self._pool.submit(self._land, key, values)

    def _land(self, key, values) -> None:
        error = None
        try:
            Pyramid.write(self, key, values)
        except Exception as exc:  # reported through on_written and wait()
            error = exc
        with self._lock:
            self._queued -= 1
            if error is not None and self._error is None:
                self._error = error
            drained = self._queued == 0
            callback = self.on_written if drained else None
            report = self._error
            if callback is not None:
                self._error = None  # reported there, not raised again by wait()
            if drained:
                self._idle.set()
        if callback is not None:
            callback(report)

    def wait(self) -> None:
        """Block until every queued write has landed; raise the first that failed."""
        self._idle.wait()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise OSError(f"writing the labels failed: {error}") from error

    def read(self, key=()) -> np.ndarray:
        self.wait()
        return super().read(key)

    def close(self) -> None:
        """Let the queued writes land, then stop the writer thread."""
        self._idle.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_QUEUED: weakref.WeakSet[QueuedPyramid] = weakref.WeakSet()


def wait_for_writes() -> None:
    """Block until the queued writes of every :class:`QueuedPyramid` have landed (before
    anything reads their levels directly, e.g. a writer saving the layer); their errors
    stay with their own pyramid."""
    for pyramid in list(_QUEUED):
        pyramid._idle.wait()
