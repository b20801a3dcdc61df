"""Cache-aware tile routing: a prompt held with enough margin by an encoded tile is decoded
there (no encoding); the tile each object was decoded in; the list of encoded tiles."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_sam3 import ObjectPrompt, Sam3Segmenter
from napari_sam3.core.embedding_store import EmbeddingStore
from napari_sam3.core.tiling import TileGrid

# Tiles 112 px (the tiny model's input), overlap 28 (reuse margin 7): column starts
# 0, 84, 168, 218. Tile A = columns 0-111, tile B = columns 84-195.
A = (0, 0, 112, 112)
B = (0, 84, 112, 196)
FIRST = (50, 40)  # best tile A (margin 61)
INSIDE_A = (50, 102)  # margin 9 in A (>= 7), 18 in B: best B, but A is encoded
NEAR_A_EDGE = (50, 106)  # margin 5 in A (< 7): B
LIMITS = (500, 1800)


@pytest.fixture(scope="module")
def base(tiny_tracker_dir):
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu")


def fresh(base, store=None) -> Sam3Segmenter:
    """A segmenter on the tiny model, tiled 112/28, with an empty memory cache, routing
    prompts to encoded tiles (as the widget's does)."""
    seg = Sam3Segmenter(base.model, base.processor, tile_size=112, overlap=28,
                        fingerprint=base.fingerprint, store=store)
    seg.reuse_encoded = True
    return seg


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:260, 0:330]
    img = 1000 + 800 * np.sin(rows / 9.0) * np.cos(cols / 13.0) + rng.normal(0, 50, rows.shape)
    return img.astype(np.uint16)


def box(tile):
    return tile.r0, tile.c0, tile.r1, tile.c1


def point(rc):
    return ObjectPrompt(points=[rc])


def in_tile(seg, image, tile_box, prompt):
    """The object decoded in the tile ``tile_box`` alone (the crop the model sees)."""
    grid = seg.tiles(image)
    tile = next(t for t in grid if box(t) == tile_box)
    crop = seg.tile_rgb(image, grid, tile, LIMITS)
    alone = Sam3Segmenter(seg.model, seg.processor, tile_size=4096)
    return alone.predict_objects(crop, [prompt.shifted(tile.r0, tile.c0)])[0]


def test_geometry_of_the_scenario():
    g = TileGrid((260, 330), 112, 28)
    assert g.reuse_margin == 7
    tiles = {box(t): t for t in g}
    assert g.margin(tiles[A], (*INSIDE_A, *INSIDE_A)) == 9
    assert g.margin(tiles[B], (*INSIDE_A, *INSIDE_A)) == 18
    assert box(g.route((*INSIDE_A, *INSIDE_A))) == B  # today's rule
    assert g.margin(tiles[A], (*NEAR_A_EDGE, *NEAR_A_EDGE)) == 5


def test_route_asks_best_first_then_only_tiles_with_margin():
    g = TileGrid((260, 330), 112, 28)
    asked = []

    def nothing_encoded(t):
        asked.append(box(t))
        return False

    assert box(g.route((*INSIDE_A, *INSIDE_A), nothing_encoded)) == B
    assert asked == [B, A]  # tiles not holding the point are never asked
    asked.clear()
    assert box(g.route((*INSIDE_A, *INSIDE_A), lambda t: asked.append(box(t)) or True)) == B
    assert asked == [B]  # the best tile is encoded: nothing else is asked
    assert box(g.route((*INSIDE_A, *INSIDE_A), lambda t: box(t) == A)) == A
    assert box(g.route((*INSIDE_A, *INSIDE_A), lambda t: box(t) == A, min_margin=10)) == B
    assert box(g.route((*NEAR_A_EDGE, *NEAR_A_EDGE), lambda t: box(t) == A)) == B


def test_second_click_inside_encoded_tile_encodes_nothing(base, image):
    seg = fresh(base)
    first = seg.predict_objects(image, [point(FIRST)], LIMITS)[0]
    assert seg.encoder_calls == 1 and first.tile == A
    obj = seg.predict_objects(image, [point(INSIDE_A)], LIMITS)[0]
    assert seg.encoder_calls == 1, "tile A holds the click with margin 9 >= 7: no encoding"
    assert obj.tile == A and obj.region == (slice(0, 112), slice(0, 112))
    expected = in_tile(seg, image, A, point(INSIDE_A))
    np.testing.assert_array_equal(obj.logits, expected.logits)
    # segment() routes the same way: its labels are that mask
    labels = seg.segment(image, [point(INSIDE_A)], limits=LIMITS, max_hole_area=0,
                         max_sprinkle_area=0)
    assert seg.encoder_calls == 1
    want = np.zeros(image.shape, np.int32)
    want[:112, :112] = expected.logits > 0
    np.testing.assert_array_equal(labels, want)


def test_click_too_close_to_the_edge_goes_to_its_best_tile(base, image):
    seg = fresh(base)
    seg.predict_objects(image, [point(FIRST)], LIMITS)
    obj = seg.predict_objects(image, [point(NEAR_A_EDGE)], LIMITS)[0]
    assert seg.encoder_calls == 2 and obj.tile == B
    np.testing.assert_array_equal(obj.logits, in_tile(seg, image, B, point(NEAR_A_EDGE)).logits)
    # once B is encoded too, the best tile wins again: the same mask as before
    again = seg.predict_objects(image, [point(INSIDE_A)], LIMITS)[0]
    assert seg.encoder_calls == 2 and again.tile == B


def test_without_reuse_todays_rule(base, image):
    seg = fresh(base)
    seg.reuse_encoded = False  # the API's default
    seg.predict_objects(image, [point(FIRST)], LIMITS)
    obj = seg.predict_objects(image, [point(INSIDE_A)], LIMITS)[0]
    assert seg.encoder_calls == 2 and obj.tile == B


def test_other_limits_are_another_encoding(base, image):
    seg = fresh(base)
    seg.predict_objects(image, [point(FIRST)], LIMITS)
    obj = seg.predict_objects(image, [point(INSIDE_A)], (400, 2000))[0]
    assert seg.encoder_calls == 2 and obj.tile == B


def test_encoded_tile_found_in_the_zarr_store(base, image, tmp_path):
    store = EmbeddingStore(tmp_path / "cache.zarr")
    seg = fresh(base, store)
    seg.predict_objects(image, [point(FIRST)], LIMITS)
    later = fresh(base, EmbeddingStore(tmp_path / "cache.zarr"))  # a new session
    obj = later.predict_objects(image, [point(INSIDE_A)], LIMITS)[0]
    assert later.encoder_calls == 0 and obj.tile == A
    assert later.store.disk_reads == 1


def test_numpy_edited_in_place_is_not_taken_for_encoded(base, image):
    img = image.copy()
    seg = fresh(base)
    seg.predict_objects(img, [point(FIRST)], LIMITS)
    img[60:70, 10:20] += 100  # tile A changes: its cached embedding is not of these pixels
    obj = seg.predict_objects(img, [point(INSIDE_A)], LIMITS)[0]
    assert seg.encoder_calls == 2 and obj.tile == B
    # another object with the same pixels finds the embedding of A by content
    seg.memory.clear()
    seg.predict_objects(img, [point(FIRST)], LIMITS)
    assert seg.encoder_calls == 3
    assert seg.predict_objects(img.copy(), [point(INSIDE_A)], LIMITS)[0].tile == A
    assert seg.encoder_calls == 3


class CountingArray:
    """A lazy array-like (like Zarr) that counts the pixels read from it."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.read = 0

    def __getitem__(self, key):
        out = self.data[key]
        self.read += out.size
        return out


def test_lazy_image_keys_are_remembered(base, image):
    lazy = CountingArray(image)
    seg = fresh(base)
    seg.predict_objects(lazy, [point(FIRST)], LIMITS)
    assert lazy.read == 112 * 112  # the one tile encoded
    seg.predict_objects(lazy, [point(FIRST)], LIMITS)
    assert lazy.read == 112 * 112, "a warm click reads nothing: the tile's key is remembered"
    obj = seg.predict_objects(lazy, [point(INSIDE_A)], LIMITS)[0]
    assert obj.tile == A and seg.encoder_calls == 1
    assert lazy.read == 2 * 112 * 112  # tile B read once, to learn it is not encoded
    seg.predict_objects(lazy, [point(INSIDE_A)], LIMITS)
    assert lazy.read == 2 * 112 * 112
    other = CountingArray(image)  # layer data replaced: new object, its keys are found anew
    assert seg.predict_objects(other, [point(INSIDE_A)], LIMITS)[0].tile == A
    assert other.read == 2 * 112 * 112


def test_encoded_tiles(base, image, tmp_path):
    lazy = CountingArray(image)
    seg = fresh(base, EmbeddingStore(tmp_path / "cache.zarr"))
    assert seg.encoded_tiles(lazy, LIMITS) == []
    seg.predict_objects(lazy, [point(FIRST)], LIMITS)
    region = (150, 200, 260, 330)  # the bottom right corner: 4 tiles
    for _ in seg.precompute(lazy, LIMITS, region):
        pass
    corner = [box(t) for t in seg.tiles(lazy).tiles_in(region)]
    assert len(corner) == 4
    read = lazy.read
    assert seg.encoded_tiles(lazy, LIMITS) == [A] + corner
    assert seg.encoded_tiles(lazy, LIMITS, region=(0, 0, 50, 50)) == [A]
    assert seg.encoded_tiles(lazy, (400, 2000)) == []
    assert lazy.read == read, "listing reads no pixels"
    seg.memory.clear()  # still in the store
    assert seg.encoded_tiles(lazy, LIMITS) == [A] + corner
    later = fresh(base, EmbeddingStore(tmp_path / "cache.zarr"))
    assert later.encoded_tiles(lazy, LIMITS) == []  # keys not known to this session yet
    assert later.encoded_tiles(lazy, LIMITS, read=True) == [A] + corner
    assert later.encoder_calls == 0
    # an untiled image: its one "tile" is the image
    small = image[:100, :100]
    assert later.encoded_tiles(small, LIMITS) == []
    later.predict_objects(small, [point((30, 30))], LIMITS)
    assert later.encoded_tiles(small, LIMITS) == [(0, 0, 100, 100)]


def test_objects_carry_their_tile(base, image):
    seg = fresh(base)
    objs = seg.predict_objects(image, [point(FIRST), point((240, 310))], LIMITS, crop=True)
    assert objs[0].tile == A and objs[1].tile == (148, 218, 260, 330)
    for _i, obj in seg.iter_objects(image, [point((240, 310))], LIMITS):
        assert obj.tile == (148, 218, 260, 330)
    small = Sam3Segmenter(base.model, base.processor, tile_size=1024)
    assert small.predict_objects(image, [point(FIRST)], LIMITS)[0].tile is None  # untiled


def test_zarr_image_routes_like_numpy(base, image, tmp_path):
    arr = zarr.create_array(tmp_path / "img.zarr", shape=image.shape, chunks=(64, 64),
                            dtype=image.dtype)
    arr[...] = image
    seg = fresh(base)
    seg.predict_objects(arr, [point(FIRST)], LIMITS)
    obj = seg.predict_objects(arr, [point(INSIDE_A)], LIMITS)[0]
    assert seg.encoder_calls == 1 and obj.tile == A


def test_a_warm_click_decodes_with_a_core_left_to_napari(base, image, monkeypatch):
    """The widget's click job: a prompt in an encoded tile is decoded with one torch
    thread fewer (napari's GUI thread draws meanwhile); an encoding click keeps them all;
    the process's thread count is restored either way."""
    import threading

    import torch

    from napari_sam3.widget import jobs

    seg = fresh(base)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # as on a 3-core machine
    set_threads = []
    monkeypatch.setattr(torch, "set_num_threads", set_threads.append)

    def click(point):
        req = jobs.ClickRequest(image=image, lead=(), spatial_shape=image.shape,
                                limits=LIMITS, prompt=ObjectPrompt(points=[point]), obj_id=4,
                                max_hole_area=0, max_sprinkle_area=0, image_layer=None,
                                ignored=0)
        steps = jobs.segment_job(seg, threading.Lock(), req)
        names = []
        try:
            while True:
                names.append(next(steps))
        except StopIteration as stop:
            obj, labels = stop.value
        return names, obj, labels

    names, obj, labels = click(FIRST)  # nothing encoded: the encoder runs, all threads
    assert "encoding" in names and seg.encoder_calls == 1 and set_threads == []
    names, obj, labels = click(FIRST)  # its tile is encoded: 2 threads, then 3 again
    assert "encoding" not in names and seg.encoder_calls == 1
    assert set_threads == [2, 3] and set(np.unique(labels)) <= {0, 4}
    assert jobs.decode_threads(2) == 1 and jobs.decode_threads(16) == 4
