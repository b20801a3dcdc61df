"""Lazy multiscale pyramids of large images, so napari never reads a whole plane.

napari draws a single-resolution image by reading all of its current plane (a
20,000^2 uint16 TIFF: 7.7 s and +3 GB); given a pyramid it reads only the level and
the part in view. :func:`lazy_pyramid` makes one without reading a pixel: level 0 is
the file read lazily (a dask array over the TIFF's memory map or Zarr store, or over
the Zarr array), level k takes every 2^k-th pixel along Y and X (``[::2, ::2]`` of the
level before; each chunk of a level is one dask task reading the strided pixels from
the file, so only they outlive it), down to a level whose longer side is at most
``smallest``. Nothing is computed until napari asks for a region. Leading axes (Z, T)
and RGB channels are never subsampled. A file with its own pyramid (OME-Zarr
``multiscales``, a pyramidal TIFF) gives its own levels instead.

Striding keeps the dtype and exact pixel values (like napari's labels pyramids); a
zoomed-out level shows every 2^k-th pixel, not an average.

No napari or Qt; dask, tifffile and zarr are imported when used.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Planes with more pixels than this open as a pyramid (about napari's comfort limit).
LAZY_PIXELS = 4096 * 4096
#: napari draws one texture per plane; a side over this is always too large.
MAX_TEXTURE = 16384
#: The coarsest level has no side longer than this.
SMALLEST = 2048
#: Target dask chunk side along Y and X at level 0 (rounded up to whole file chunks).
CHUNK = 1024

__all__ = ["LAZY_PIXELS", "MAX_TEXTURE", "SMALLEST", "is_rgb", "needs_pyramid",
           "open_lazy", "lazy_pyramid"]


def is_rgb(shape) -> bool:
    """napari's guess: a last axis of 3 or 4 is colour (RGB/RGBA)."""
    return len(shape) >= 3 and int(shape[-1]) in (3, 4)


def _yx(shape, rgb: bool | None) -> tuple[int, int]:
    rgb = is_rgb(shape) if rgb is None else rgb
    return (len(shape) - 3, len(shape) - 2) if rgb else (len(shape) - 2, len(shape) - 1)


def needs_pyramid(shape, rgb: bool | None = None, threshold: int = LAZY_PIXELS) -> bool:
    """Whether an image of ``shape`` is too large a plane for napari to read whole:
    more than ``threshold`` pixels per plane, or a side over :data:`MAX_TEXTURE`."""
    y, x = (int(shape[a]) for a in _yx(shape, rgb))
    return y * x > threshold or max(y, x) > MAX_TEXTURE


def _zarr_levels(node) -> list | None:
    """The arrays of a Zarr group's pyramid (OME-NGFF ``multiscales`` or arrays
    "0", "1", ... as tifffile writes them), coarsest last; None if it has none."""
    import zarr

    if isinstance(node, zarr.Array):
        return None
    attrs = dict(node.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    paths = [d["path"] for d in ms[0]["datasets"]] if ms else []
    if not paths:
        n = 0
        while str(n) in node:
            n += 1
        paths = [str(i) for i in range(n)]
    levels = [node[p] for p in paths if p in node]
    return levels if levels and all(isinstance(a, zarr.Array) for a in levels) else None


def open_lazy(path) -> list:
    """The levels of the image at ``path`` (TIFF or Zarr), read lazily: one array (a
    memory map of an uncompressed TIFF, else a Zarr array), or the file's own pyramid.
    Reads metadata only. Raises what the readers raise."""
    import zarr

    p = Path(path)
    if p.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(p) as tf:
            pyramidal = len(tf.series[0].levels) > 1
        if not pyramidal:
            try:
                return [tifffile.memmap(p, mode="r")]  # uncompressed: the OS reads pages
            except ValueError:  # compressed or not contiguous: chunk by chunk
                pass
        node = zarr.open(tifffile.imread(p, aszarr=True), mode="r")
    elif p.suffix.lower() == ".zarr":
        node = zarr.open(p, mode="r")
    else:
        raise ValueError(f"cannot open {os.fspath(p)!r} lazily: use a TIFF or Zarr file")
    if isinstance(node, zarr.Array):
        return [node]
    levels = _zarr_levels(node)
    if levels is None:
        raise ValueError("Zarr group has no 'multiscales' metadata and no array '0'")
    return levels


class _Reader:
    """What dask wraps: reads only what is indexed (``from_array`` would copy a NumPy
    array: for a memory map, read the whole file), every ``step``-th pixel along the
    axes ``yx``, so a coarse level's chunk is read in one task and only its pixels
    outlive it (napari's dask cache then holds small chunks, not the file's)."""

    def __init__(self, data, yx=(), step: int = 1):
        self.data, self.yx, self.step = data, tuple(yx), int(step)
        self.shape = tuple(-(-int(n) // self.step) if a in self.yx else int(n)
                           for a, n in enumerate(data.shape))
        self.dtype, self.ndim = data.dtype, len(self.shape)

    def __getitem__(self, key):
        import numpy as np

        key = key if isinstance(key, tuple) else (key,)
        if self.step > 1:
            key = tuple(slice((k.start or 0) * self.step,
                              None if k.stop is None else k.stop * self.step, self.step)
                        if a in self.yx else k for a, k in enumerate(key))
        return np.asarray(self.data[key])


def _chunks(data, yx, step: int) -> tuple:
    """Dask chunks of a level: one leading index, whole channels, and along Y and X
    :data:`CHUNK` pixels of the file (in whole chunks of it) at level 0, and at least
    256 pixels at coarser levels."""
    stored = getattr(data, "chunks", None)
    stored = stored if isinstance(stored, tuple) and len(stored) == data.ndim else None
    chunks = []
    for a, n in enumerate(data.shape):
        if a in yx:
            c = int(stored[a]) if stored and isinstance(stored[a], int) else 1
            side = min(int(n), c * max(1, -(-CHUNK // c)))
            chunks.append(max(1, min(-(-int(n) // step), max(256, side // step))))
        elif a < yx[0]:
            chunks.append(1)
        else:
            chunks.append(int(n))  # channels
    return tuple(chunks)


def lazy_pyramid(source, *, rgb: bool | None = None, smallest: int | None = None) -> list:
    """The levels of a lazy pyramid of ``source``, finest first, for
    ``viewer.add_image(levels, multiscale=True)``.

    ``source``: a TIFF/Zarr path (see :func:`open_lazy`), an array (NumPy, Zarr, dask)
    or a list of levels (used as they are, as dask arrays). Level 0 is a dask array
    over the data; each next level is ``[::2, ::2]`` of the one before along Y and X
    (the last two axes, or the two before the channels when ``rgb``; default: napari's
    guess), until the longer side is at most ``smallest`` (default :data:`SMALLEST`).
    Nothing is read here."""
    import dask.array as da

    levels = open_lazy(source) if isinstance(source, str | os.PathLike) else source
    if isinstance(levels, list | tuple) and len(levels) > 1:
        return [lvl if isinstance(lvl, da.Array) else _level(lvl, _yx(lvl.shape, rgb), 1)
                for lvl in levels]
    data = levels[0] if isinstance(levels, list | tuple) else levels
    yx = _yx(data.shape, rgb)
    smallest = max(1, int(SMALLEST if smallest is None else smallest))
    if isinstance(data, da.Array):  # a graph already: stride it
        out = [data]
        step = tuple(slice(None, None, 2) if a in yx else slice(None) for a in range(data.ndim))
        while max(out[-1].shape[a] for a in yx) > smallest:
            out.append(out[-1][step])
        return out
    out = [_level(data, yx, 1)]
    while max(out[-1].shape[a] for a in yx) > smallest:
        out.append(_level(data, yx, 2 ** len(out)))
    return out


def _level(data, yx, step: int):
    import dask.array as da
    import numpy as np

    reader = _Reader(data, yx, step)
    return da.from_array(reader, chunks=_chunks(data, yx, step), name=False, fancy=False,
                         meta=np.empty((0,) * reader.ndim, reader.dtype))
