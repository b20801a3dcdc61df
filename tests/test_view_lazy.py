"""Huge images open lazily in ``napari-sam3 view``: a dask pyramid built without reading
pixels, whose levels are exact subsamples; napari then reads only the level in view."""

from __future__ import annotations

import gc
import os
import tracemalloc

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_sam3._cli import view
from napari_sam3.core.lazy_pyramid import lazy_pyramid, needs_pyramid

SIDE = 3000  # a "huge" image for tests: the threshold is lowered below 3000^2
LOW = 2000 * 2000


class CountingArray:
    """A lazy array-like (like a Zarr array) that counts the pixels read from it."""

    def __init__(self, data, chunks=None):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.chunks = chunks
        self.read = 0
        self.largest = 0

    def __getitem__(self, key):
        out = np.asarray(self.data[key])
        self.read += out.size
        self.largest = max(self.largest, out.size)
        return out


@pytest.fixture(scope="module")
def plane():
    rng = np.random.default_rng(3)
    return rng.integers(0, 4000, (SIDE, SIDE), dtype=np.uint16)


def test_needs_pyramid():
    assert not needs_pyramid((4096, 4096))
    assert needs_pyramid((4097, 4096))
    assert needs_pyramid((100, 16385))  # wider than napari's texture limit
    assert needs_pyramid((5, 3000, 3000), threshold=LOW)  # per plane, not per stack
    assert not needs_pyramid((3000, 3000, 3), threshold=3000 * 3000)  # RGB: Y, X only
    assert not needs_pyramid((2, 3000, 1000), threshold=LOW)


def test_pyramid_reads_nothing_and_levels_are_strides(plane):
    lazy = CountingArray(plane, chunks=(256, 256))
    levels = lazy_pyramid(lazy, smallest=1024)
    assert lazy.read == 0, "building the pyramid reads no pixel"
    assert all(isinstance(lv, da.Array) for lv in levels)
    assert [lv.shape for lv in levels] == [(3000, 3000), (1500, 1500), (750, 750)]
    assert levels[0].chunks[0][:2] == (1024, 1024)  # whole file chunks of 256: 4 x 256
    np.testing.assert_array_equal(np.asarray(levels[2]), plane[::4, ::4])
    assert lazy.largest <= 1024 * 1024, "read chunk by chunk, never the whole plane"
    lazy.read = 0
    np.testing.assert_array_equal(np.asarray(levels[0][100:200, 2900:3000]),
                                  plane[100:200, 2900:3000])
    assert lazy.read == 1024 * (3000 - 2048), "one chunk read for a small region"
    assert len(lazy_pyramid(plane)) == 2  # default: down to a side <= 2048


def test_stack_and_rgb_pyramids_keep_leading_axes_and_channels(plane):
    stack = CountingArray(np.stack([plane[:1200, :1600], plane[1200:2400, :1600]]))
    levels = lazy_pyramid(stack, smallest=500)
    assert [lv.shape for lv in levels] == [(2, 1200, 1600), (2, 600, 800), (2, 300, 400)]
    assert levels[0].chunks[0] == (1, 1)  # one slice per chunk
    np.testing.assert_array_equal(np.asarray(levels[1][1]), stack.data[1, ::2, ::2])
    rgb = np.stack([plane[:1200, :1000]] * 3, axis=-1)
    levels = lazy_pyramid(rgb, smallest=400)
    assert [lv.shape for lv in levels] == [(1200, 1000, 3), (600, 500, 3), (300, 250, 3)]
    np.testing.assert_array_equal(np.asarray(levels[2]), rgb[::4, ::4])


@pytest.fixture(scope="module")
def files(plane, tmp_path_factory):
    """The plane as an uncompressed TIFF (memory-mapped), a compressed tiled TIFF (read
    through its Zarr store), a Zarr array and an OME-Zarr with its own pyramid."""
    d = tmp_path_factory.mktemp("huge")
    tifffile.imwrite(d / "plain.tif", plane)
    tifffile.imwrite(d / "tiled.tif", plane, tile=(256, 256), compression="zlib")
    arr = zarr.create_array(d / "plain.zarr", shape=plane.shape, chunks=(512, 512),
                            dtype=plane.dtype)
    arr[...] = plane
    group = zarr.open_group(d / "pyramid.ome.zarr", mode="w")
    for k in range(3):
        level = plane[:: 2**k, :: 2**k]
        a = group.create_array(str(k), shape=level.shape, chunks=(512, 512), dtype=level.dtype)
        a[...] = level
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}],
                                   "datasets": [{"path": str(k)} for k in range(3)]}]
    return d


@pytest.mark.parametrize("name", ["plain.tif", "tiled.tif", "plain.zarr", "pyramid.ome.zarr"])
def test_open_image_is_lazy(files, plane, name):
    path = str(files / name)
    tracemalloc.start()
    data, multiscale = view.open_image(path, threshold=LOW)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert multiscale and all(isinstance(lv, da.Array) for lv in data)
    assert [lv.shape for lv in data][:2] == [(3000, 3000), (1500, 1500)]
    assert peak < plane.nbytes / 20, f"opening allocated {peak} bytes"
    np.testing.assert_array_equal(np.asarray(data[1][700:800, 10:20]), plane[1400:1600:2, 20:40:2])


def test_small_images_open_as_before(files, plane):
    data, multiscale = view.open_image(str(files / "plain.tif"))  # 3000^2 < 4096^2
    assert not multiscale and isinstance(data, np.ndarray)
    np.testing.assert_array_equal(data, plane)
    data, multiscale = view.open_image(str(files / "plain.zarr"))
    assert not multiscale and isinstance(data, zarr.Array)
    data, multiscale = view.open_image(str(files / "pyramid.ome.zarr"))
    assert multiscale and len(data) == 3  # its own pyramid is always used


@pytest.fixture(scope="module")
def huge_files(tmp_path_factory):
    """A 6000^2 uint16 plane (72 MB) as an uncompressed TIFF and a Zarr array."""
    d = tmp_path_factory.mktemp("huger")
    rows = np.arange(6000, dtype=np.uint16)[:, None]
    big = (rows * 7 + np.arange(6000, dtype=np.uint16)[None, :]) % 4000
    tifffile.imwrite(d / "plain.tif", big)
    # chunks of 512^2: Zarr decodes up to ~10 chunks at once per read (its concurrency)
    arr = zarr.create_array(d / "plain.zarr", shape=big.shape, chunks=(512, 512),
                            dtype=big.dtype)
    arr[...] = big
    return d, big.nbytes


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (make test: xvfb-run)")
@pytest.mark.parametrize("name", ["plain.tif", "plain.zarr"])
def test_viewer_reads_only_the_level_in_view(make_napari_viewer, huge_files, name, monkeypatch):
    from qtpy.QtWidgets import QApplication

    import napari_sam3.core.lazy_pyramid as lazy_pyramid_module

    folder, plane_bytes = huge_files
    monkeypatch.setattr(view, "LAZY_PIXELS", LOW)
    monkeypatch.setattr(lazy_pyramid_module, "SMALLEST", 512)  # levels 6000 ... 375
    viewer = make_napari_viewer(show=True)
    # napari's first (multiscale, dask) layer imports modules: not counted
    viewer.add_image(lazy_pyramid(np.zeros((64, 64), np.uint16), smallest=16), multiscale=True)
    viewer.reset_view()
    for _ in range(5):
        QApplication.processEvents()
    viewer.layers.clear()
    for _ in range(5):
        QApplication.processEvents()
    gc.collect()
    tracemalloc.start()
    layer = view.add_image(viewer, str(folder / name))
    viewer.reset_view()
    for _ in range(5):
        QApplication.processEvents()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert layer.multiscale and [lv.shape[0] for lv in layer.data] == [6000, 3000, 1500, 750, 375]
    assert all(isinstance(lv, da.Array) for lv in layer.data)
    assert layer.data_level > 0  # the whole image in view: a coarse level is drawn
    assert peak < plane_bytes / 3, f"showing it allocated {peak} bytes"
