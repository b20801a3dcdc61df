"""Tiling: grid geometry, routing, seams, lazy reads and region-by-region output."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_sam3 import ObjectPrompt, Sam3Segmenter
from napari_sam3.core.tiling import TileGrid


@pytest.fixture(scope="module")
def tiled(tiny_tracker_dir):
    """Tiny model (input 112) with 112 px tiles overlapping by 48 px."""
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                         overlap=48)


@pytest.fixture(scope="module")
def big_image():
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:260, 0:330]
    img = 1000 + 800 * np.sin(rows / 9.0) * np.cos(cols / 13.0) + rng.normal(0, 50, rows.shape)
    return img.astype(np.uint16)


def test_grid_covers_image_with_overlap():
    g = TileGrid((260, 330), 112, 48)
    assert g.grid_shape == (4, 5)
    cover = np.zeros((260, 330), int)
    for t in g:
        assert t.shape == (112, 112)
        cover[t.slices] += 1
    assert cover.min() >= 1
    starts = sorted({t.c0 for t in g})
    assert starts == [0, 64, 128, 192, 218]  # stride 64, last tile flush with the edge
    assert TileGrid((100, 90), 112, 48).single


def test_grid_pads_short_axis():
    g = TileGrid((60, 500), 112, 16)
    assert not g.single and all(t.shape == (60, 112) for t in g)
    assert g.padded_shape(g.tiles[0]) == (112, 112)


def test_bad_settings():
    with pytest.raises(ValueError, match="overlap"):
        TileGrid((10, 10), 112, 112)


def test_route_prefers_margin():
    g = TileGrid((260, 330), 112, 48)
    # a point at col 100: tile starting at 0 (seam at 111) has margin 11; tile at 64: 36
    tile = g.route((50, 100, 50, 100))
    assert (tile.c0, tile.c1) == (64, 176)
    # near the image border no seam counts, the first tile wins
    assert g.route((2, 2, 2, 2)).index == (0, 0)


def test_one_tile_image_same_tiled_and_untiled(tiny_tracker_dir, tiny_segmenter):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    one_tile = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                             overlap=16)
    assert one_tile.tiles(img).single
    prompts = [ObjectPrompt(points=[(30, 80)]), ObjectPrompt(box=(10, 10, 60, 50))]
    np.testing.assert_array_equal(one_tile.segment(img, prompts),
                                  tiny_segmenter.segment(img, prompts))


def test_object_on_seam_comes_out_whole(tiled, big_image):
    """A box over the seam between tiles is segmented in the tile holding it whole."""
    grid = tiled.tiles(big_image)
    box = (30, 95, 70, 140)  # crosses column 111, the right edge of the first tile
    prompt = ObjectPrompt(box=box)
    labels = tiled.segment(big_image, [prompt], max_hole_area=0, max_sprinkle_area=0)
    tile = grid.route(box)
    assert tile.c0 <= 95 and tile.c1 > 140 and grid.margin(tile, box) > 0
    # exactly the mask of the tile alone, pasted back at the tile's offset
    limits = tiled.resolve_limits(big_image)
    crop = tiled.tile_rgb(big_image, grid, tile, limits)
    alone = Sam3Segmenter(tiled.model, tiled.processor, tile_size=4096).segment(
        crop, [prompt.shifted(tile.r0, tile.c0)], max_hole_area=0, max_sprinkle_area=0)
    expected = np.zeros_like(labels)
    expected[tile.slices] = alone[: tile.shape[0], : tile.shape[1]]
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 1}
    cols = np.nonzero((labels == 1).any(axis=0))[0]
    assert cols.min() <= 111 < cols.max(), "the object spans the seam at column 111"


def test_objects_in_different_tiles_keep_ids(tiled, big_image):
    prompts = [ObjectPrompt(points=[(20, 20)]), ObjectPrompt(points=[(240, 310)]),
               ObjectPrompt(box=(120, 150, 160, 200))]
    labels = tiled.segment(big_image, prompts, max_hole_area=0, max_sprinkle_area=0)
    for i, p in enumerate(prompts, 1):
        obj = tiled.predict_objects(big_image, [p])[0]
        assert ((labels[obj.region] == i) <= (obj.logits > 0)).all()
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and {1, 2} <= set(np.unique(labels))


class RecordingArray:
    """An array-like that records every region read from it (like a lazy Zarr array)."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, key):
        out = self.data[key]
        self.reads.append(out.size)
        return out


def test_lazy_input_reads_only_needed_tiles(tiny_tracker_dir, big_image):
    seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                        overlap=48)
    lazy = RecordingArray(big_image)
    prompts = [ObjectPrompt(points=[(200, 300)])]
    limits = (500, 1800)
    labels = seg.segment(lazy, prompts, limits=limits)
    assert seg.encoder_calls == 1
    assert max(lazy.reads) <= 112 * 112 and sum(lazy.reads) < big_image.size / 4
    np.testing.assert_array_equal(labels, seg.segment(big_image, prompts, limits=limits))


def test_segment_into_zarr_output(tiled, big_image, tmp_path):
    prompts = [ObjectPrompt(points=[(20, 20)]), ObjectPrompt(box=(120, 150, 160, 200))]
    out = zarr.create_array(tmp_path / "labels.zarr", shape=big_image.shape, chunks=(64, 64),
                            dtype="int32", fill_value=0)
    tiled.segment(big_image, prompts, out=out)
    np.testing.assert_array_equal(out[...], tiled.segment(big_image, prompts))


def test_limits_of_a_lazy_image_are_sampled_once(tiled, big_image, tmp_path, monkeypatch):
    import napari_sam3.core.segmenter as segmenter_module

    arr = zarr.create_array(tmp_path / "img.zarr", shape=big_image.shape, chunks=(64, 64),
                            dtype=big_image.dtype)
    arr[...] = big_image
    calls = []
    real = segmenter_module.image_limits
    monkeypatch.setattr(segmenter_module, "image_limits",
                        lambda *a: calls.append(a) or real(*a))
    first = tiled.resolve_limits(arr)
    assert tiled.resolve_limits(arr) == first and len(calls) == 1
    assert first == real(big_image)  # the same limits as sampling the data in memory
    tiled.resolve_limits(big_image)
    tiled.resolve_limits(big_image)
    assert len(calls) == 3  # NumPy arrays are sampled every time (edited in place)
