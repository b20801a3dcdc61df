"""Lazy views of planes of nD arrays (NumPy, Zarr, dask), and pixel regions of a plane.

* :class:`PlaneView` / :func:`plane_of`: one 2D(+C) plane of a stack, read and written
  lazily (only what is indexed is read).
* :class:`AxisView`: a (depth, H, W) view along one leading axis, the others fixed.
* :class:`OffsetView`: a held crop of a plane, indexed in the plane's coordinates.
* Regions are (row0, col0, row1, col1), ends exclusive: :func:`region_of`,
  :func:`union_region`, :func:`region_slices`; :func:`digest` fingerprints an array.

NumPy only; no Qt, no napari.
"""

from __future__ import annotations

import hashlib

import numpy as np


class PlaneView:
    """One 2D(+C) plane of an nD array-like at the leading index ``lead``, read lazily:
    only what is indexed is read (and written, where the array is writable).

    Good for NumPy, Zarr and dask stacks alike; ``np.asarray`` reads the whole plane.
    """

    def __init__(self, data, lead: tuple):
        self.data, self.lead = data, tuple(int(v) for v in lead)
        self.shape = tuple(int(s) for s in data.shape[len(self.lead) :])
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return self.data[self.lead + key]

    def __setitem__(self, key, value) -> None:
        key = key if isinstance(key, tuple) else (key,)
        self.data[self.lead + key] = value

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self.data[self.lead])
        return out if dtype is None else out.astype(dtype)


def plane_of(data, lead: tuple):
    """The plane of ``data`` at ``lead`` (the array itself for a 2D image)."""
    return data if not lead else PlaneView(data, lead)


class AxisView:
    """(depth, H, W) view of an nD (*lead, H, W) labels array along ``axis`` of ``lead``,
    the other leading axes fixed: what ``propagation.write_slice`` writes into."""

    def __init__(self, data, axis: int, fixed: dict[int, int], n_lead: int):
        self.data, self.axis, self.fixed, self.n_lead = data, int(axis), dict(fixed), n_lead
        self.shape = (int(data.shape[axis]),) + tuple(int(s) for s in data.shape[n_lead:])
        self.dtype = data.dtype

    def lead(self, k: int) -> tuple:
        return tuple(int(k) if a == self.axis else int(self.fixed[a]) for a in range(self.n_lead))

    def full_key(self, key):
        """The key of the labels data that ``key`` (slice, rows, cols) of the view names."""
        key = key if isinstance(key, tuple) else (key,)
        return self.lead(key[0]) + tuple(key[1:])

    def __getitem__(self, key):
        return self.data[self.full_key(key)]

    def __setitem__(self, key, value) -> None:
        self.data[self.full_key(key)] = value


def region_of(corners, plane: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) pixels of a plane covered by the (row, col) ``corners``
    of a view (end exclusive, clipped to the plane); None when nothing is covered."""
    pts = np.asarray(corners, dtype=np.float64).reshape(-1, 2)
    h, w = plane
    r0 = int(np.clip(np.floor(pts[:, 0].min() + 0.5), 0, h))
    c0 = int(np.clip(np.floor(pts[:, 1].min() + 0.5), 0, w))
    r1 = int(np.clip(np.ceil(pts[:, 0].max() + 0.5), 0, h))
    c1 = int(np.clip(np.ceil(pts[:, 1].max() + 0.5), 0, w))
    if r1 <= r0 or c1 <= c0:
        return None
    return r0, c0, r1, c1


def union_region(boxes, plane: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) covering every (row0, col0, row1, col1) box (ends
    exclusive), clipped to the plane; None for no boxes or nothing inside."""
    arr = np.asarray(list(boxes), dtype=np.int64).reshape(-1, 4)
    if not len(arr):
        return None
    h, w = plane
    r0, c0 = max(int(arr[:, 0].min()), 0), max(int(arr[:, 1].min()), 0)
    r1, c1 = min(int(arr[:, 2].max()), h), min(int(arr[:, 3].max()), w)
    if r1 <= r0 or c1 <= c0:
        return None
    return r0, c0, r1, c1


def region_slices(region: tuple[int, int, int, int]) -> tuple[slice, slice]:
    r0, c0, r1, c1 = region
    return slice(r0, r1), slice(c0, c1)


class OffsetView:
    """A crop of a (H, W) plane, indexed in the plane's coordinates.

    What ``instances.paint_labels`` writes into when only the region its instances can
    reach is held in memory: ``shape`` is the plane's, ``view[rows, cols]`` reads and
    writes ``crop[rows - row0, cols - col0]``. Only slices inside the crop are allowed.
    """

    def __init__(self, crop: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]):
        self.crop = crop
        self.origin = (int(origin[0]), int(origin[1]))
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = crop.dtype
        self.ndim = 2

    def _key(self, key) -> tuple[slice, slice]:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise IndexError("OffsetView takes (row slice, col slice)")
        out = []
        for s, o, n in zip(key, self.origin, self.crop.shape, strict=True):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise IndexError("OffsetView takes (row slice, col slice)")
            start, stop = int(s.start) - o, int(s.stop) - o
            if start < 0 or stop > n:
                raise IndexError(f"rows/cols {s.start}-{s.stop} are outside the held region")
            out.append(slice(start, stop))
        return out[0], out[1]

    def __getitem__(self, key):
        return self.crop[self._key(key)]

    def __setitem__(self, key, value) -> None:
        self.crop[self._key(key)] = value

    def __array__(self, dtype=None, copy=None):
        raise TypeError("an OffsetView holds only a region of the plane")


def digest(arr) -> bytes:
    """A short fingerprint of an array's shape, dtype and values."""
    a = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.tobytes())
    return h.digest()


def largest_label(data, progress=None) -> int:
    """The largest value of a labels array of any size (NumPy, Zarr, dask), read chunk by
    chunk (blocks of ~64 MB for arrays without chunks); 0 for an empty or all-negative
    one. ``progress(done, total)`` after each block."""
    steps = iter_largest_label(data)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def _blocks(data) -> list[tuple[slice, ...]]:
    """Keys of the blocks a lazy array is read in: its chunks (whole chunks along every
    axis), else runs of rows of at most 64 MiB (at 4 bytes a pixel)."""
    import itertools

    shape = tuple(int(s) for s in data.shape)
    chunks = getattr(data, "chunks", None)
    if chunks and isinstance(chunks[0], tuple):  # dask: per-axis block sizes
        chunks = tuple(max(c) for c in chunks)
    if not chunks or len(chunks) != len(shape):
        rows = max(1, (64 << 20) // max(1, int(np.prod(shape[1:])) * 4))
        chunks = (min(rows, shape[0]),) + shape[1:]
    step = tuple(max(1, int(c)) for c in chunks)
    blocks = [range(0, s, c) for s, c in zip(shape, step, strict=True)]
    return [tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, step, shape, strict=True))
            for start in itertools.product(*blocks)]


def iter_largest_label(data):
    """:func:`largest_label` as a generator: yields ``(done, total)`` blocks, returns the
    largest value (a worker can stop it between blocks)."""
    shape = tuple(int(s) for s in data.shape)
    if not shape or 0 in shape:
        return 0
    if isinstance(data, np.ndarray):
        return max(int(data.max()), 0)
    keys = _blocks(data)
    top = 0
    for i, key in enumerate(keys, 1):
        block = np.asarray(data[key])
        if block.size:
            top = max(top, int(block.max()))
        yield i, len(keys)
    return top


def iter_label_box(plane, label: int):
    """The bounding box ``(row slice, col slice)`` of the pixels equal to ``label`` in a
    2D ``plane`` (NumPy, Zarr, dask or any array-like with ``shape`` and ``[key]``), read
    block by block: yields ``(done, total)`` blocks (a worker can stop it between them),
    returns the box, or None when no pixel has that label. Memory: one block."""
    from .postprocess import mask_box

    label = int(label)
    if len(plane.shape) != 2:
        raise ValueError(f"a plane is 2D, not {len(plane.shape)}D")
    if isinstance(plane, np.ndarray):
        rows, cols = mask_box(plane == label)
        return None if rows.stop == 0 else (rows, cols)
    keys = _blocks(plane) if 0 not in plane.shape else []
    r0 = c0 = None
    r1 = c1 = 0
    for i, (kr, kc) in enumerate(keys, 1):
        rows, cols = mask_box(np.asarray(plane[kr, kc]) == label)
        if rows.stop:
            top, left = kr.start + rows.start, kc.start + cols.start
            r0 = top if r0 is None else min(r0, top)
            c0 = left if c0 is None else min(c0, left)
            r1, c1 = max(r1, kr.start + rows.stop), max(c1, kc.start + cols.stop)
        yield i, len(keys)
    return None if r0 is None else (slice(r0, r1), slice(c0, c1))


def label_box(plane, label: int):
    """:func:`iter_label_box` run to its end."""
    steps = iter_label_box(plane, label)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
