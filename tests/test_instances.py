"""Instance merging across tiles and writing labels, on hand-made masks (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam3.core.instances import (
    Instance,
    box_iou,
    clean_instances,
    mask_iou,
    merge_tiles,
    nms,
    paint_labels,
    seam_margin,
    touches_seam,
)
from napari_sam3.core.tiling import TileGrid

SHAPE = (196, 196)  # tile 112, overlap 28: tiles start at 0 and 84 on each axis


@pytest.fixture
def grid():
    g = TileGrid(SHAPE, tile_size=112, overlap=28)
    assert len(g) == 4 and [(t.r0, t.c0) for t in g] == [(0, 0), (0, 84), (84, 0), (84, 84)]
    return g


def disc(center, radius, shape=SHAPE):
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius ** 2


def rect(r0, c0, r1, c1, shape=SHAPE):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def seen_by(mask, grid, k, score=0.9, **extra):
    """What tile k sees of an object: the mask cut to the tile, as a tile would output it."""
    t = grid.tiles[k]
    return Instance.from_mask(mask[t.slices], score, (t.r0, t.c0), k, **extra)


def test_instance_crop_and_geometry():
    m = rect(10, 20, 15, 30)
    inst = Instance.from_mask(m, 0.5, tile=2)
    assert inst.bbox == (10, 20, 15, 30) and inst.area == 50 and inst.tile == 2
    assert (inst.full(SHAPE) == m).all()
    assert Instance.from_mask(np.zeros((5, 5)), 1.0) is None
    shifted = Instance.from_mask(np.ones((2, 3)), 0.1, offset=(7, 8))
    assert shifted.bbox == (7, 8, 9, 11)
    assert box_iou((0, 0, 10, 10), (0, 5, 10, 15)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    a = Instance.from_mask(rect(0, 0, 10, 10), 1.0)
    b = Instance.from_mask(rect(0, 5, 10, 15), 1.0)
    assert mask_iou(a, b) == pytest.approx(50 / 150)
    assert mask_iou(a, b, region=(0, 5, 10, 10)) == 1.0  # identical inside the region


def test_seams_ignore_image_borders(grid):
    t0 = grid.tiles[0]  # top-left: seams only at the bottom and on the right
    at_border = Instance.from_mask(rect(0, 0, 10, 10)[t0.slices], 1.0)
    assert not touches_seam(at_border, t0, SHAPE)
    assert seam_margin(at_border, t0, SHAPE) == 102
    at_seam = Instance.from_mask(rect(50, 100, 60, 112)[t0.slices], 1.0)
    assert touches_seam(at_seam, t0, SHAPE)
    assert seam_margin(at_seam, t0, SHAPE) == 0
    one = TileGrid((50, 50), 112, 28)
    inst = Instance.from_mask(rect(0, 0, 50, 50, (50, 50)), 1.0)
    assert not touches_seam(inst, one.tiles[0], (50, 50))
    assert seam_margin(inst, one.tiles[0], (50, 50)) == float("inf")


def test_object_on_a_seam_comes_from_the_tile_holding_it_whole(grid):
    obj = disc((50, 110), 8)  # cols 102-118: cut by tile 0's right edge (112), whole in tile 1
    cut, whole = seen_by(obj, grid, 0, score=0.99), seen_by(obj, grid, 1, score=0.5)
    assert touches_seam(cut, grid.tiles[0], SHAPE) and not touches_seam(whole, grid.tiles[1], SHAPE)
    merged = merge_tiles([cut, whole], grid)
    assert len(merged) == 1
    assert merged[0] is whole  # even though the cut copy scored higher
    assert (merged[0].full(SHAPE) == obj).all()


def test_whole_in_two_tiles_keeps_the_copy_farthest_from_a_seam(grid):
    obj = disc((50, 98), 5)  # cols 93-103 in the overlap: 8 px from tile 0's seam, 9 from 1's
    a, b = seen_by(obj, grid, 0, score=0.9), seen_by(obj, grid, 1, score=0.8)
    assert seam_margin(a, grid.tiles[0], SHAPE) < seam_margin(b, grid.tiles[1], SHAPE)
    assert merge_tiles([a, b], grid) == [b]


def test_object_at_the_four_tile_corner_appears_once(grid):
    obj = disc((98, 98), 10)  # whole in all four tiles; farthest from seams in tile 3
    copies = [seen_by(obj, grid, k, score=0.5 + k / 10) for k in range(4)]
    merged = merge_tiles(copies, grid)
    assert len(merged) == 1 and merged[0].tile == 3


def test_object_larger_than_the_overlap_is_stitched(grid):
    obj = rect(140, 60, 160, 140)  # 80 px wide, overlap 28: cut in tiles 2 and 3
    left, right = seen_by(obj, grid, 2, score=0.7), seen_by(obj, grid, 3, score=0.8)
    assert left.bbox[3] == 112 and right.bbox[1] == 84
    merged = merge_tiles([left, right], grid)
    assert len(merged) == 1
    assert (merged[0].full(SHAPE) == obj).all()
    assert merged[0].score == 0.8


def test_object_spanning_three_tiles_is_stitched_once(grid):
    obj = rect(20, 60, 180, 100)  # cut by tile 0 (bottom) and tile 2 (top), whole in none
    pieces = [seen_by(obj, grid, k) for k in range(4)]
    merged = merge_tiles(pieces, grid)
    assert len(merged) == 1
    assert (merged[0].full(SHAPE) == obj).all()


def test_different_objects_are_never_merged(grid):
    a = seen_by(disc((20, 20), 6), grid, 0, 0.9)
    b = seen_by(disc((180, 180), 6), grid, 3, 0.8)
    # two neighbours in the overlap strip, one seen by each tile
    c = seen_by(disc((50, 92), 4), grid, 0, 0.7)
    d = seen_by(disc((50, 104), 4), grid, 1, 0.6)
    # overlapping objects of one tile stay (NMS within a tile is the caller's job)
    e = seen_by(rect(150, 10, 170, 30), grid, 2, 0.5)
    f = seen_by(rect(150, 10, 170, 30), grid, 2, 0.4)
    merged = merge_tiles([a, b, c, d, e, f], grid)
    assert [x.score for x in merged] == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def test_cut_object_nobody_holds_whole_is_kept(grid):
    piece = seen_by(disc((50, 110), 8), grid, 0)  # the neighbouring tile missed it
    assert merge_tiles([piece], grid) == [piece]


def test_many_cells_on_seams_come_out_once_and_whole(grid):
    rng = np.random.default_rng(3)
    centers = [(int(r), int(c)) for r, c in rng.integers(12, 184, size=(40, 2))]
    objects = []
    taken = np.zeros(SHAPE, dtype=bool)
    for ctr in centers:  # non-touching discs of radius 6 (fit in the 28 px overlap)
        m = disc(ctr, 6)
        grown = disc(ctr, 8)
        if not (grown & taken).any():
            objects.append(m)
            taken |= grown
    found = []
    for i, m in enumerate(objects):
        for k, t in enumerate(grid.tiles):
            if m[t.slices].any():
                found.append(seen_by(m, grid, k, score=0.5 + i / 100))
    assert len(found) > len(objects)  # many objects were seen by several tiles
    merged = merge_tiles(found, grid)
    assert len(merged) == len(objects)
    wholes = sorted(tuple(np.argwhere(x.full(SHAPE))[0]) for x in merged)
    assert wholes == sorted(tuple(np.argwhere(m)[0]) for m in objects)
    for x in merged:
        assert any((x.full(SHAPE) == m).all() for m in objects)
    labels, painted = paint_labels(merged, SHAPE)
    assert labels.max() == len(objects) and len(painted.ids) == len(objects)


def test_nms_by_mask_and_box():
    big = Instance.from_mask(rect(0, 0, 20, 20, (40, 40)), 0.9)
    near = Instance.from_mask(rect(0, 0, 20, 18, (40, 40)), 0.8)
    other = Instance.from_mask(rect(25, 25, 35, 35, (40, 40)), 0.95)
    assert nms([big, near, other], 0.7) == [other, big]
    assert nms([big, near, other], 0.95) == [other, big, near]
    assert nms([big, near, other], 0.7, by="box") == [other, big]


def test_clean_instances_removes_small_and_fills_holes():
    ring = rect(0, 0, 10, 10, (30, 30)) & ~rect(4, 4, 6, 6, (30, 30))
    speck = rect(20, 20, 22, 22, (30, 30))
    a = Instance.from_mask(ring, 0.9)
    b = Instance.from_mask(speck, 0.8)
    out = clean_instances([a, b], min_area=5, max_hole_area=10)
    assert len(out) == 1 and out[0].area == 100
    assert len(clean_instances([a, b])) == 2


def test_paint_labels_order_overlaps_and_existing_labels():
    shape = (20, 20)
    low = Instance.from_mask(rect(0, 0, 10, 10, shape), 0.3)
    high = Instance.from_mask(rect(5, 5, 15, 15, shape), 0.9)
    tiny = Instance.from_mask(rect(6, 6, 8, 8, shape), 0.5)  # hidden under "high"
    labels, painted = paint_labels([low, high, tiny], shape)
    assert labels.dtype == np.int32
    assert painted.ids == [1, 2] and painted.instances == [high, low]  # tiny: nothing visible
    assert (labels[5:15, 5:15] == 1).all() and labels[0, 0] == 2
    assert painted.areas == [100, 75]
    table = painted.features()
    assert list(table["index"]) == [1, 2] and table["score"][0] == pytest.approx(0.9)

    existing = np.zeros(shape, dtype=np.int32)
    existing[0:3, 0:3] = 7
    out, painted = paint_labels([low, high], out=existing.copy())
    assert (out[0:3, 0:3] == 7).all()  # kept
    assert painted.ids == [8, 9]  # above the existing maximum
    assert (out[5:15, 5:15] == 8).all()
    out, _ = paint_labels([low, high], out=existing.copy(), overwrite=True)
    assert (out[0:3, 0:3] == 9).all() and (out[5:15, 5:15] == 8).all()

    _, painted = paint_labels([low, high], shape, min_area=80)
    assert painted.ids == [1]  # "low" keeps only 75 visible pixels
    with pytest.raises(ValueError):
        paint_labels([low])


def test_paint_labels_into_zarr(tmp_path):
    zarr = pytest.importorskip("zarr")
    z = zarr.create_array(tmp_path / "l.zarr", shape=(30, 30), chunks=(8, 8), dtype="int32")
    z[0:2, 0:2] = 3
    inst = Instance.from_mask(rect(0, 0, 10, 10, (30, 30)), 0.5)
    paint_labels([inst], out=z)
    arr = z[...]
    assert (arr[0:2, 0:2] == 3).all() and (arr[2:10, 0:10] == 4).all() and arr[10:].sum() == 0


# -- one result protocol, ids continuing across slices -----------------------------------------
def _results(shape=(30, 30)):
    """A concept result (two candidates, one below 0.5) and an everything result, by hand."""
    from napari_sam3.core.concept import ConceptResult
    from napari_sam3.core.everything import EverythingResult, EverythingSettings

    a = Instance.from_mask(rect(2, 2, 8, 8, shape), 0.9, presence=0.7)
    b = Instance.from_mask(rect(20, 20, 26, 26, shape), 0.3, presence=0.7)
    concept = ConceptResult(shape, TileGrid(shape, 112, 28), [a, b], min_score=0.05,
                            max_hole_area=0, max_sprinkle_area=0)
    c = Instance.from_mask(rect(10, 10, 16, 16, shape), 0.8, iou_score=0.8,
                           stability_score=0.9)
    everything = EverythingResult(shape, [c], EverythingSettings(min_area=0))
    return concept, everything


def test_results_share_one_protocol():
    from napari_sam3.core.instances import InstanceResult

    concept, everything = _results()
    assert isinstance(concept, InstanceResult) and isinstance(everything, InstanceResult)
    assert concept.items is concept.candidates and everything.items is everything.instances
    assert concept.min_score == 0.05 and everything.min_score == 0.0
    low = concept.paint(threshold=0.2)
    assert sorted(np.unique(low).tolist()) == [0, 1, 2] and concept.threshold == 0.2
    high = concept.paint()  # the threshold last used
    np.testing.assert_array_equal(high, low)
    np.testing.assert_array_equal(concept.paint(threshold=0.5), (low == 1).astype(np.int32))
    assert list(concept.features["index"]) == [1] and "presence" in concept.features
    labels = everything.paint(threshold=0.99)  # no threshold for everything: all painted
    assert (labels[10:16, 10:16] == 1).all() and labels.sum() == 36
    assert set(everything.features) >= {"index", "score", "area", "iou_score", "stability_score"}


def test_paint_in_sequence_continues_ids():
    from napari_sam3.core.instances import paint_in_sequence
    from napari_sam3.core.planes import OffsetView

    concept, everything = _results()
    first, second, third = (np.zeros((30, 30), np.int32) for _ in range(3))
    second[0:2, 0:2] = 40  # an existing label: kept, not counted
    empty = type(everything)((30, 30), [], everything.settings)
    nxt = paint_in_sequence([(concept, first), (empty, third), (everything, second)],
                            start_id=5, threshold=0.2)
    assert nxt == 8
    assert (first[2:8, 2:8] == 5).all() and (first[20:26, 20:26] == 6).all()
    assert not third.any()
    assert (second[10:16, 10:16] == 7).all() and (second[0:2, 0:2] == 40).all()
    assert paint_in_sequence([(empty, third)], start_id=3) == 3
    # overwrite, into an OffsetView of a plane (what the widget paints into)
    plane = np.full((30, 30), 2, np.int32)
    crop = plane[8:18, 8:18].copy()
    assert paint_in_sequence([(everything, OffsetView(crop, (8, 8), (30, 30)))], start_id=3,
                             overwrite=True) == 4
    assert (crop[2:8, 2:8] == 3).all() and (crop == 3).sum() == 36


def test_segment_stack_ids_continue_from_existing_labels():
    from napari_sam3.core.everything import segment_stack

    _, everything = _results()
    stack = np.zeros((3, 30, 30), np.uint8)
    out = np.zeros((3, 30, 30), np.int32)
    out[1, 0:2, 0:2] = 9
    seen = []

    def detect(plane):
        seen.append(plane.shape)
        return everything

    segment_stack(detect, stack, out)
    assert seen == [(30, 30)] * 3
    assert [int(out[z, 12, 12]) for z in range(3)] == [10, 11, 12]
    assert (out[1, 0:2, 0:2] == 9).all()
    with pytest.raises(ValueError):
        segment_stack(detect, stack, np.zeros((2, 30, 30), np.int32))
