"""Hole filling, island removal and non-overlap, at exact area bounds."""

from __future__ import annotations

import numpy as np

from napari_sam3.core.postprocess import (
    Flush,
    PostProcessing,
    clean_mask,
    fill_holes,
    masks_to_labels,
    paste_object,
    paste_objects,
    remove_islands,
)


def ring_with_hole(hole_side: int) -> np.ndarray:
    m = np.zeros((40, 40), bool)
    m[5:5 + hole_side + 4, 5:5 + hole_side + 4] = True
    m[7:7 + hole_side, 7:7 + hole_side] = False
    return m


def test_fill_holes_at_bound():
    m = ring_with_hole(4)  # a 16-pixel hole
    assert fill_holes(m, 16)[8, 8]
    assert not fill_holes(m, 15)[8, 8]
    np.testing.assert_array_equal(fill_holes(m, 0), m)


def test_border_background_is_not_a_hole():
    m = np.ones((10, 10), bool)
    m[0:2, 0:2] = False  # 4 background pixels touching the border
    np.testing.assert_array_equal(fill_holes(m, 100), m)


def test_remove_islands_at_bound_keeps_largest():
    m = np.zeros((30, 30), bool)
    m[0:10, 0:10] = True  # 100 px main object
    m[20:23, 20:23] = True  # 9 px island
    m[25, 5] = True  # 1 px island
    out = remove_islands(m, 9)
    assert out[0:10, 0:10].all() and not out[20:23, 20:23].any() and not out[25, 5]
    out = remove_islands(m, 8)
    assert out[20:23, 20:23].all() and not out[25, 5]
    # an object made only of small pieces keeps its largest piece
    tiny = np.zeros((10, 10), bool)
    tiny[1, 1] = tiny[5:7, 5] = True
    expected = np.zeros((10, 10), bool)
    expected[5:7, 5] = True
    np.testing.assert_array_equal(remove_islands(tiny, 50), expected)


def test_clean_mask_combines():
    m = ring_with_hole(3)
    m[30, 30] = True
    out = clean_mask(m, max_hole_area=9, max_sprinkle_area=1)
    assert out[8, 8] and not out[30, 30]


def test_masks_to_labels_no_overlap_highest_logit_wins():
    a = np.full((4, 6), -1.0)
    b = np.full((4, 6), -1.0)
    a[:, :4] = 2.0
    b[:, 2:] = 1.0
    b[0, 2] = 5.0
    labels = masks_to_labels(np.stack([a, b]), ids=[3, 7])
    assert labels.dtype == np.int32
    expected = np.array([[3, 3, 7, 3, 7, 7]] + [[3, 3, 3, 3, 7, 7]] * 3)
    np.testing.assert_array_equal(labels, expected)


def test_paste_object_respects_other_labels():
    labels = np.zeros((5, 5), np.int32)
    labels[0, :] = 1  # another object
    labels[4, 4] = 2  # old pixel of the object being rewritten
    mask = np.zeros((5, 5), bool)
    mask[0:3, 0:3] = True
    idx, values = paste_object(labels, mask, 2)
    out = labels.copy()
    out[idx] = values
    assert (out[0, :] == 1).all() and (out[1:3, 0:3] == 2).all() and out[4, 4] == 0
    idx, values = paste_object(labels, mask, 2, overwrite=True)
    out = labels.copy()
    out[idx] = values
    assert (out[0:3, 0:3] == 2).all() and (out[0, 3:] == 1).all()


def test_defaults_are_positive():
    d = PostProcessing()
    assert d.max_hole_area > 0 and d.max_sprinkle_area > 0


def test_clean_mask_on_bounding_box_equals_whole_image():
    rng = np.random.default_rng(5)
    for _ in range(20):
        m = np.zeros((60, 80), bool)
        r, c = rng.integers(0, 50), rng.integers(0, 70)
        m[r:r + rng.integers(3, 20), c:c + rng.integers(3, 20)] = True
        m &= rng.random(m.shape) > 0.15  # holes and crumbs
        whole = remove_islands(fill_holes(m, 6), 3)
        np.testing.assert_array_equal(clean_mask(m, 6, 3), whole)


def _dense_reference(shape, objects, ids, areas, overwrite, out):
    """paste_objects by its rule, the slow way: each object cleaned on its own, then per
    pixel the highest logit (ties: the first object), written where allowed."""
    best = np.full(shape, -np.inf, np.float32)
    owner = np.full(shape, -1)
    for i, (region, lg) in enumerate(objects):
        full = np.full(shape, -1.0, np.float32)
        full[region] = lg
        m = clean_mask(full > 0, *areas)
        take = m & (full > best)
        best[take], owner[take] = full[take], i
    out = out.copy()
    covered = owner >= 0
    if not overwrite:
        covered &= out == 0
    labels = owner + 1 if ids is None else np.asarray(ids)[owner]
    out[covered] = labels[covered]
    return out


def test_paste_objects_one_or_many_with_flushes_equals_the_rule():
    """A lone object (written without blocks) and many objects (merged in blocks), with
    Flush items as tiles give them, equal the rule computed densely."""
    rng = np.random.default_rng(11)
    for trial in range(150):
        h, w = (int(v) for v in rng.integers(5, 70, 2))
        objects = []
        for _ in range(int(rng.integers(1, 4))):
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            r1, c1 = int(rng.integers(r0 + 1, h + 1)), int(rng.integers(c0 + 1, w + 1))
            lg = rng.normal(size=(r1 - r0, c1 - c0)).astype(np.float32)
            objects.append(((slice(r0, r1), slice(c0, c1)), lg))
        stream = []
        for k, (region, lg) in enumerate(objects):
            stream.append((region, lg, k))
            if rng.random() < 0.6:  # every later object lies inside the pending boxes
                stream.append(Flush(tuple((r.start, c.start, r.stop, c.stop)
                                          for (r, c), _ in objects[k + 1:])))
        ids = None if rng.random() < 0.5 else [int(v) for v in rng.integers(1, 9, len(objects))]
        areas = (int(rng.integers(0, 8)), int(rng.integers(0, 4)))
        overwrite = bool(rng.integers(0, 2))
        before = rng.integers(0, 3, (h, w)).astype(np.int32)
        out = before.copy()
        paste_objects(out, stream, ids, *areas, overwrite=overwrite)
        np.testing.assert_array_equal(
            out, _dense_reference((h, w), objects, ids, areas, overwrite, before), str(trial))
