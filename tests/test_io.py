"""Label writing/reading round-trips, image reading errors, npe2 writers, sample data."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from napari_sam3 import _writers
from napari_sam3._sample_data import make_cells_image, sample_cells
from napari_sam3.core import io


def _labels(shape, big: bool) -> np.ndarray:
    """Deterministic int32 labels with many ids; ``big`` adds ids above 65535."""
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 500, size=shape).astype(np.int32)
    lab[lab > 300] = 0
    if big:
        lab.flat[::7] = 65536
        lab.flat[3::11] = 2_000_000_000
    else:
        lab.flat[5] = 65535
    return lab


SHAPES = [(37, 53), (4, 29, 41)]


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".zarr"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("big", [False, True], ids=["u16ids", "bigids"])
def test_roundtrip_exact(tmp_path, suffix, shape, big):
    lab = _labels(shape, big)
    out = io.write_labels(tmp_path / f"lab{suffix}", lab)
    assert out == str(tmp_path / f"lab{suffix}")
    back = io.read_labels(out)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.int32
    assert back.shape == shape
    np.testing.assert_array_equal(back, lab)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_tif_imagej_when_ids_fit_uint16(tmp_path, shape):
    lab = _labels(shape, big=False)
    path = io.write_labels_tif(tmp_path / "lab.tif", lab)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == ("ZYX" if len(shape) == 3 else "YX")
        page = tif.pages[0]
        assert page.dtype == np.uint16
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        if len(shape) == 3:
            assert tif.imagej_metadata["slices"] == shape[0]
        np.testing.assert_array_equal(tif.asarray(), lab)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_tif_int32_when_ids_exceed_uint16(tmp_path, shape):
    lab = _labels(shape, big=True)
    path = io.write_labels_tif(tmp_path / "lab.tif", lab)
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_imagej
        assert tif.series[0].axes == ("ZYX" if len(shape) == 3 else "YX")
        assert tif.pages[0].dtype == np.int32
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    np.testing.assert_array_equal(tifffile.imread(path), lab)


def test_tif_is_compressed(tmp_path):
    lab = np.zeros((512, 512), np.int32)
    lab[100:200, 100:300] = 7
    path = io.write_labels_tif(tmp_path / "lab.tif", lab)
    assert (tmp_path / "lab.tif").stat().st_size < lab.nbytes // 50
    np.testing.assert_array_equal(io.read_labels(path), lab)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_zarr_ngff_metadata(tmp_path, shape):
    lab = _labels(shape, big=True)
    path = io.write_labels_zarr(tmp_path / "lab.zarr", lab, name="seg")
    group = zarr.open_group(path, mode="r")
    assert group.metadata.zarr_format == 3
    attrs = group.attrs.asdict()
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert ms["name"] == "seg"
    names = [a["name"] for a in ms["axes"]]
    assert names == (["z", "y", "x"] if len(shape) == 3 else ["y", "x"])
    assert all(a["type"] == "space" for a in ms["axes"])
    (ds,) = ms["datasets"]
    assert ds["path"] == "0"
    assert ds["coordinateTransformations"] == [{"type": "scale", "scale": [1.0] * len(shape)}]
    assert "image-label" in attrs
    assert attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    arr = group["0"]
    assert arr.dtype == np.int32
    assert arr.shape == shape
    assert arr.compressors, "array must be compressed"
    np.testing.assert_array_equal(arr[...], lab)


def test_zarr_default_and_custom_chunks(tmp_path):
    lab = np.zeros((3, 1500, 40), np.int32)
    group = zarr.open_group(io.write_labels_zarr(tmp_path / "a.zarr", lab), mode="r")
    assert group["0"].chunks == (1, 1024, 40)
    group = zarr.open_group(io.write_labels_zarr(tmp_path / "b.zarr", lab, chunks=16), mode="r")
    assert group["0"].chunks == (3, 16, 16)
    with pytest.raises(ValueError, match="chunks"):
        io.write_labels_zarr(tmp_path / "c.zarr", lab, chunks=(16, 16))


def test_zarr_scale_is_written(tmp_path):
    lab = _labels((4, 10, 12), big=False)
    path = io.write_labels_zarr(tmp_path / "s.zarr", lab, scale=(2.0, 0.5, 0.5))
    ms = zarr.open_group(path, mode="r").attrs["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 0.5, 0.5]


class _ChunkOnlyArray:
    """Array-like without ``__array__``: the writer may only read it by slicing."""

    def __init__(self, data: np.ndarray, max_elements: int):
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.max_elements = max_elements
        self.reads = 0

    def __getitem__(self, key):
        block = self._data[key]
        assert block.size <= self.max_elements, "writer read more than one chunk at once"
        self.reads += 1
        return block


def test_zarr_writes_lazy_input_chunk_by_chunk(tmp_path):
    lab = _labels((3, 70, 50), big=True)
    src = _ChunkOnlyArray(lab, max_elements=1 * 32 * 32)
    path = io.write_labels_zarr(tmp_path / "lazy.zarr", src, chunks=(1, 32, 32))
    assert src.reads == 3 * 3 * 2
    np.testing.assert_array_equal(io.read_labels(path), lab)


def test_zarr_from_zarr_and_dask_sources(tmp_path):
    da = pytest.importorskip("dask.array")
    lab = _labels((60, 45), big=True)
    z = zarr.create_array(tmp_path / "src.zarr", shape=lab.shape, dtype="int32", chunks=(20, 20))
    z[...] = lab
    np.testing.assert_array_equal(io.read_labels(io.write_labels(tmp_path / "z.zarr", z)), lab)
    d = da.from_array(lab, chunks=(16, 16))
    np.testing.assert_array_equal(io.read_labels(io.write_labels(tmp_path / "d.zarr", d)), lab)


def test_other_integer_dtypes_preserve_ids(tmp_path):
    lab16 = np.array([[0, 1], [65535, 3]], np.uint16)
    for suffix in (".tif", ".zarr"):
        back = io.read_labels(io.write_labels(tmp_path / f"u16{suffix}", lab16))
        assert back.dtype == np.int32
        np.testing.assert_array_equal(back, lab16)
    lab64 = np.array([[0, 1], [2**40, 3]], np.int64)
    for suffix in (".tif", ".zarr"):
        back = io.read_labels(io.write_labels(tmp_path / f"i64{suffix}", lab64))
        assert back.dtype == np.int64
        np.testing.assert_array_equal(back, lab64)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_refuses_to_overwrite(tmp_path, suffix):
    path = tmp_path / f"lab{suffix}"
    first = np.ones((8, 9), np.int32)
    io.write_labels(path, first)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.write_labels(path, first * 2)
    np.testing.assert_array_equal(io.read_labels(path), first)
    io.write_labels(path, first * 2, overwrite=True)
    np.testing.assert_array_equal(io.read_labels(path), first * 2)


def test_bad_suffix_and_bad_labels(tmp_path):
    lab = np.ones((4, 4), np.int32)
    with pytest.raises(ValueError, match=r"unsupported suffix '\.png'"):
        io.write_labels(tmp_path / "lab.png", lab)
    with pytest.raises(ValueError, match="unsupported suffix"):
        io.write_labels(tmp_path / "lab", lab)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="integer"):
        io.write_labels(tmp_path / "f.tif", lab.astype(np.float32))
    with pytest.raises(ValueError, match="2 to 5 dimensions"):  # 4D and 5D are written
        io.write_labels(tmp_path / "x.zarr", np.ones((2,) * 6, np.int32))


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_tzyx_and_tczyx_labels_round_trip_with_named_axes(tmp_path, suffix):
    import json

    rng = np.random.default_rng(0)
    tzyx = rng.integers(0, 5, (3, 4, 6, 7)).astype(np.int32)
    path = io.write_labels(tmp_path / f"tzyx{suffix}", tzyx)
    np.testing.assert_array_equal(io.read_labels(path), tzyx)
    tczyx = rng.integers(0, 5, (2, 3, 4, 6, 7)).astype(np.int32)
    out = tmp_path / f"tczyx{suffix}"
    if suffix == ".zarr":
        io.write_labels_zarr(out, tczyx, axes="tczyx")
        np.testing.assert_array_equal(io.read_labels(out), tczyx)
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]
        axes = attrs["multiscales"][0]["axes"]
        assert [a["name"] for a in axes] == list("tczyx")
        assert [a["type"] for a in axes] == ["time", "channel", "space", "space", "space"]
    else:
        io.write_labels_tif(out, tczyx, axes="tczyx")
        with tifffile.TiffFile(out) as tif:  # ImageJ's hyperstack order is T, Z, C
            assert tif.is_imagej and tif.series[0].axes == "TZCYX"
            np.testing.assert_array_equal(tif.asarray(), np.transpose(tczyx, (0, 2, 1, 3, 4)))
    assert io.label_axes(4, ("t", "z", "y", "x")) == "tzyx"
    assert io.label_axes(4, ("0", "1", "2", "3")) == "tzyx"  # napari's default labels
    assert io.label_axes(3, ("c", "y", "x")) == "cyx"
    assert io.label_axes(3, ("y", "z", "x")) == "zyx"  # not NGFF order: the default


def test_overwrite_replaces_only_labels_outputs_of_the_same_kind(tmp_path):
    lab = np.ones((4, 4), np.int32)
    image = tmp_path / "proj.zarr"  # someone's image Zarr, with other files in it
    (image / "raw").mkdir(parents=True)
    (image / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (image / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a labels output"):
        io.write_labels(image, lab, overwrite=True)
    assert (image / "notes.txt").read_text() == "keep me" and (image / "raw").is_dir()
    folder_tif = tmp_path / "X.tif"
    folder_tif.mkdir()
    (folder_tif / "data.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match="not a labels output"):
        io.write_labels(folder_tif, lab, overwrite=True)
    assert (folder_tif / "data.bin").exists()
    ours = io.write_labels(tmp_path / "ours.zarr", lab)
    io.write_labels(ours, lab * 2, overwrite=True)  # our own output: replaced
    np.testing.assert_array_equal(io.read_labels(ours), lab * 2)


# ------------------------------------------------------------------- read_image


def test_read_image_formats(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    img = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 7) % 4096
    tifffile.imwrite(tmp_path / "a.tif", img)
    np.save(tmp_path / "a.npy", img)
    rgb = np.stack([img % 256] * 3, axis=-1).astype(np.uint8)
    iio.imwrite(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.tif"), img)
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.npy"), img)
    np.testing.assert_array_equal(io.read_image(str(tmp_path / "a.png")), rgb)
    iio.imwrite(tmp_path / "a.jpg", rgb)
    assert io.read_image(tmp_path / "a.jpg").shape == rgb.shape


def test_read_image_zarr_is_lazy(tmp_path):
    img = np.random.default_rng(0).integers(0, 1000, (2, 40, 30)).astype(np.uint16)
    z = zarr.create_array(tmp_path / "plain.zarr", shape=img.shape, dtype=img.dtype)
    z[...] = img
    arr = io.read_image(tmp_path / "plain.zarr")
    assert isinstance(arr, zarr.Array)
    np.testing.assert_array_equal(arr[...], img)


def test_read_image_ngff_group_returns_full_resolution(tmp_path):
    lab = _labels((30, 40), big=True)
    path = io.write_labels_zarr(tmp_path / "g.zarr", lab)
    arr = io.read_image(path)
    assert isinstance(arr, zarr.Array)
    assert arr.shape == lab.shape
    np.testing.assert_array_equal(arr[...], lab)

    # a group whose multiscales point at a dataset other than "0", plus a lower level
    g = zarr.open_group(tmp_path / "ms.zarr", mode="w")
    g.create_array("s0", shape=(8, 10), dtype="uint8")[...] = 5
    g.create_array("s1", shape=(4, 5), dtype="uint8")
    g.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "s0"}, {"path": "s1"}]}]
    assert io.read_image(tmp_path / "ms.zarr").shape == (8, 10)


def test_read_image_errors(tmp_path):
    with pytest.raises(io.ImageReadError, match="missing.tif.*no such file"):
        io.read_image(tmp_path / "missing.tif")
    for name in ("garbage.tif", "garbage.png", "garbage.jpg", "garbage.npy"):
        (tmp_path / name).write_bytes(b"this is not an image\n" * 10)
        with pytest.raises(io.ImageReadError, match=name) as err:
            io.read_image(tmp_path / name)
        assert "\n" not in str(err.value)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(io.ImageReadError, match="empty.zarr"):
        io.read_image(tmp_path / "empty.zarr")
    zarr.open_group(tmp_path / "nodata.zarr", mode="w")
    with pytest.raises(io.ImageReadError, match="multiscales"):
        io.read_image(tmp_path / "nodata.zarr")
    (tmp_path / "a.bmpx").write_bytes(b"x")
    with pytest.raises(io.ImageReadError, match="unsupported suffix"):
        io.read_image(tmp_path / "a.bmpx")
    np.save(tmp_path / "vec.npy", np.arange(5))
    with pytest.raises(io.ImageReadError, match="2 dimensions"):
        io.read_image(tmp_path / "vec.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(io.ImageReadError, match="obj.npy"):
        io.read_image(tmp_path / "obj.npy")
    assert issubclass(io.ImageReadError, ValueError)


# ---------------------------------------------------------------- npe2 writers


def test_npe2_writers(tmp_path):
    lab = _labels((3, 20, 25), big=True)
    meta = {"name": "my labels", "scale": (2.0, 1.0, 1.0)}
    (tif,) = _writers.write_labels_tif(str(tmp_path / "w.tif"), lab, meta)
    (zpath,) = _writers.write_labels_zarr(str(tmp_path / "w.zarr"), lab, meta)
    np.testing.assert_array_equal(io.read_labels(tif), lab)
    np.testing.assert_array_equal(io.read_labels(zpath), lab)
    ms = zarr.open_group(zpath, mode="r").attrs["multiscales"][0]
    assert ms["name"] == "my labels"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 1.0, 1.0]
    # napari's save dialog already confirmed: the writers replace existing files
    assert _writers.write_labels_tif(str(tmp_path / "w.tif"), lab * 0, meta) == [tif]
    assert _writers.write_labels_zarr(str(tmp_path / "w.zarr"), lab * 0, meta) == [zpath]
    assert not io.read_labels(tif).any()
    assert not io.read_labels(zpath).any()


def test_npe2_writers_add_missing_suffix_and_take_level0(tmp_path):
    lab = _labels((20, 25), big=False)
    (out,) = _writers.write_labels_tif(str(tmp_path / "noext"), lab, {})
    assert out.endswith("noext.tif")
    np.testing.assert_array_equal(io.read_labels(out), lab)
    levels = [lab, lab[::2, ::2]]
    (out,) = _writers.write_labels_zarr(str(tmp_path / "ms"), levels, {"multiscale": True})
    assert out.endswith("ms.zarr")
    np.testing.assert_array_equal(io.read_labels(out), lab)


# ----------------------------------------------------------------- sample data


def test_make_cells_image():
    image, gt = make_cells_image()
    assert image.shape == gt.shape == (512, 768)
    assert image.dtype == np.uint16
    assert gt.dtype == np.int32
    ids = np.unique(gt)
    np.testing.assert_array_equal(ids, np.arange(41))  # background + 40 cells
    # cells are clearly brighter than the background, which has an offset and noise
    bg = image[gt == 0]
    assert image[gt > 0].mean() > 3 * bg.mean()
    assert 50 < np.median(bg) < 200
    assert bg.std() > 1


def test_make_cells_image_deterministic_and_configurable():
    a_img, a_gt = make_cells_image(seed=3)
    b_img, b_gt = make_cells_image(seed=3)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_gt, b_gt)
    c_img, _ = make_cells_image(seed=4)
    assert not np.array_equal(a_img, c_img)
    img, gt = make_cells_image(shape=(100, 150), n_cells=5, seed=0)
    assert img.shape == gt.shape == (100, 150)
    assert gt.max() == 5


def test_sample_cells_layer_tuple():
    ((data, meta, kind),) = sample_cells()
    assert kind == "image"
    assert meta["name"] == "cells"
    assert data.ndim == 2 and data.shape[0] != data.shape[1]
    lo, hi = meta["contrast_limits"]
    assert data.min() <= lo < hi <= data.max()
