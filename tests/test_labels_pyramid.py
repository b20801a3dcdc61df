"""Labels pyramids (core.pyramid) and their region history (widget.history), Qt-free:

- the levels: the image's own when they are stride samplings, else halvings to a small
  top level; none but level 0 wider than napari's texture;
- a pyramid of a 20,000^2 plane is made without allocating the plane;
- a write at level 0 updates that region at every level, exactly (level k is level 0
  sampled every f-th pixel), and only the chunks under the region are written;
- undo and redo of region steps restore every level exactly.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from napari_sam3.core.pyramid import Pyramid, level_shapes
from napari_sam3.widget import scratch_labels
from napari_sam3.widget.history import RecordedWrites, RegionHistory


def test_level_shapes_follow_the_image_or_halve_to_a_small_top():
    assert level_shapes((20000, 20000), 0) == [
        (20000, 20000), (10000, 10000), (5000, 5000), (2500, 2500), (1250, 1250), (625, 625)]
    # the image's own levels (stride samplings), then halvings; stacks keep their lead axes
    image = [(7, 20000, 30000), (7, 10000, 15000), (7, 2500, 3750)]
    assert level_shapes((7, 20000, 30000), 1, image) == [
        (7, 20000, 30000), (7, 10000, 15000), (7, 2500, 3750), (7, 1250, 1875), (7, 625, 938)]
    # a level that is no stride sampling ends the image's levels
    assert level_shapes((1000, 1000), 0, [(1000, 1000), (700, 700)], top=300) == [
        (1000, 1000), (500, 500), (250, 250)]
    # nothing but level 0 is wider than napari's texture
    assert level_shapes((40000, 40000), 0, top=10000)[:2] == [(40000, 40000), (10000, 10000)]
    assert level_shapes((500, 800), 0) == [(500, 800)]


def test_a_huge_pyramid_is_made_without_allocating_its_plane(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    tracemalloc.start()
    try:
        data, folder = scratch_labels.new_labels_data((20000, 20000), 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(data, Pyramid) and peak < 5 << 20, peak  # the plane: 1.6 GB of int32
    assert [lv.shape for lv in data.levels] == level_shapes((20000, 20000), 0)
    assert scratch_labels.is_ours(folder) and not scratch_labels.holds_labels(folder)
    data.write((slice(19990, 20000), slice(5, 9)), 7)
    data.wait()  # the widget's pyramid writes in the background
    assert scratch_labels.holds_labels(folder)
    assert (data.read((slice(19990, 20000), slice(5, 9))) == 7).all()
    reopened = Pyramid.open(folder / scratch_labels.ARRAY)
    assert [lv.shape for lv in reopened.levels] == [lv.shape for lv in data.levels]
    assert int(reopened.levels[3][19992 // 8, 8 // 8]) == 7  # level 3 samples (19992, 8)
    assert not np.asarray(reopened.levels[-1][-2:, :2]).any()  # level 5 samples none
    assert scratch_labels.remove(folder)


def _chunk_files(level_dir: Path) -> set[tuple[int, ...]]:
    return {tuple(int(p) for p in f.relative_to(level_dir / "c").parts)
            for f in (level_dir / "c").rglob("*") if f.is_file()} if (level_dir / "c").is_dir() else set()


def _expected_chunks(pyr: Pyramid, level: int, key: tuple) -> set[tuple[int, ...]]:
    where = pyr.region_at(level, pyr.full_key(key))
    if where is None:
        return set()
    lkey = where[0]
    chunks = pyr.levels[level].chunks
    ranges = []
    for k, c in zip(lkey, chunks, strict=True):
        ranges.append([k // c] if isinstance(k, int) else range(k.start // c, (k.stop - 1) // c + 1))
    import itertools

    return set(itertools.product(*ranges))


def _levels(pyr: Pyramid) -> list[np.ndarray]:
    return [np.asarray(lv[...]) for lv in pyr.levels]


def test_a_write_updates_its_region_at_every_level_and_only_its_chunks(tmp_path, monkeypatch):
    import napari_sam3.core.pyramid as pyramid_mod

    monkeypatch.setattr(pyramid_mod, "CHUNK", 256)
    pyr = Pyramid.create(tmp_path / "p.zarr", (3, 2100, 2900), 1)
    assert [lv.shape for lv in pyr.levels] == [(3, 2100, 2900), (3, 1050, 1450), (3, 525, 725)]
    assert pyr.factors == [(1, 1), (2, 2), (4, 4)]
    rng = np.random.default_rng(0)
    key = (1, slice(601, 1333), slice(1001, 1777))
    ids = rng.integers(0, 50, (732, 776)).astype(np.int32)
    pyr.write(key, ids)
    for k in range(3):
        assert _chunk_files(tmp_path / "p.zarr" / str(k)) == _expected_chunks(pyr, k, key)
    lv = _levels(pyr)
    for k, (fr, fc) in enumerate(pyr.factors):
        np.testing.assert_array_equal(lv[k], lv[0][:, ::fr, ::fc])  # exact ids at every zoom
    assert lv[0][1, 601:1333, 1001:1777].tolist() == ids.tolist() and lv[0][[0, 2]].max() == 0

    # a second write overlapping the first reads and writes nothing outside its region
    class Recorder:
        def __init__(self, arr):
            self.arr, self.shape, self.dtype, self.keys = arr, arr.shape, arr.dtype, []

        def __getitem__(self, key):
            raise AssertionError("a write reads nothing")

        def __setitem__(self, key, value):
            self.keys.append(key)
            self.arr[key] = value

    rec = Pyramid([Recorder(a) for a in pyr.levels], 1)
    rec.write((1, slice(1300, 1401), slice(7, 10)), 9)
    assert [r.keys for r in rec.levels] == [
        [(1, slice(1300, 1401), slice(7, 10))], [(1, slice(650, 701), slice(4, 5))],
        [(1, slice(325, 351), slice(2, 3))]]
    lv = _levels(pyr)
    for k, (fr, fc) in enumerate(pyr.factors):
        np.testing.assert_array_equal(lv[k], lv[0][:, ::fr, ::fc])


def test_region_undo_redo_restore_every_level_exactly(tmp_path):
    pyr = Pyramid.create(tmp_path / "p.zarr", (2, 300, 500), 1, [(2, 300, 500), (2, 150, 250),
                                                                  (2, 75, 125)])
    assert pyr.factors == [(1, 1), (2, 2), (4, 4)]
    refreshed = []
    history = RegionHistory(pyr, lambda: refreshed.append(1))
    rng = np.random.default_rng(1)
    states = [_levels(pyr)]
    # step 1: a commit-like write; step 2: two overlapping writes (a propagation)
    step = history.step()
    step.write((0, slice(10, 90), slice(20, 140)), rng.integers(0, 4, (80, 120)))
    states.append(_levels(pyr))
    step = history.step()
    view = RecordedWrites(pyr, step)
    view[1, 50:150, 100:300] = rng.integers(0, 4, (100, 200))
    view[1, 120:200, 250:400] = 5
    view[0, 0:40, 0:40] = 6
    states.append(_levels(pyr))
    assert len(history.undo_items) == 2

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    assert history.undo() and same(_levels(pyr), states[1])
    assert history.undo() and same(_levels(pyr), states[0]) and not history.undo()
    assert history.redo() and same(_levels(pyr), states[1])
    assert history.redo() and same(_levels(pyr), states[2]) and not history.redo()
    assert len(refreshed) == 4
    # a new write after an undo clears the redo; a step past its limit is dropped
    assert history.undo()
    history.step().write((0, slice(0, 2), slice(0, 2)), 8)
    assert not history.redo_items and len(history.undo_items) == 2
    big = history.step(max_pixels=10)
    big.write((1, slice(0, 5), slice(0, 5)), 3)
    assert big.too_large and len(history.undo_items) == 2
    assert (pyr.read((1, slice(0, 5), slice(0, 5))) == 3).all()  # the write stands


def test_queued_writes_land_in_order_in_the_background_and_reads_wait(tmp_path):
    import threading

    from napari_sam3.core.pyramid import QueuedPyramid, wait_for_writes

    base = QueuedPyramid.create(tmp_path / "q.zarr", (600, 800), 0)
    gate = threading.Event()

    class Gated:  # level 0 blocks its writes until the gate opens
        def __init__(self, arr):
            self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype

        def __getitem__(self, key):
            return self.arr[key]

        def __setitem__(self, key, value):
            assert gate.wait(10)
            self.arr[key] = value

    pyr = QueuedPyramid([Gated(base.levels[0])] + base.levels[1:], 0)
    landed = []
    pyr.on_written = landed.append
    ids = np.arange(200 * 300, dtype=np.int32).reshape(200, 300)
    pyr.write((slice(100, 300), slice(200, 500)), ids)  # returns while level 0 is blocked
    ids[:] = -1  # the caller may reuse its array: the queue has its own copy
    pyr.write((slice(0, 10), slice(0, 10)), 5)
    assert pyr.pending and landed == []
    assert not np.asarray(base.levels[0][100:300, 200:500]).any()  # nothing landed yet
    gate.set()
    got = pyr.read((slice(100, 300), slice(200, 500)))  # waits for both writes
    assert not pyr.pending and landed == [None]  # one call when the queue emptied
    assert got.tolist() == np.arange(200 * 300).reshape(200, 300).tolist()
    assert int(pyr.read((5, 5))) == 5
    for k, (fr, fc) in enumerate(pyr.factors):
        np.testing.assert_array_equal(np.asarray(base.levels[k][...]),
                                      np.asarray(base.levels[0][...])[::fr, ::fc])

    # a write that fails is reported once the queue empties (the widget's notification),
    # not again by later reads nor by waits for every pyramid (saving another layer)
    class Broken(Gated):
        def __setitem__(self, key, value):
            raise OSError("disk full")

    bad = QueuedPyramid([Broken(base.levels[0])] + base.levels[1:], 0)
    bad.on_written = landed.append
    bad.write((0, 0), 1)
    wait_for_writes()
    assert isinstance(landed[-1], OSError) and "disk full" in str(landed[-1])
    assert bad.read((1, 1)) is not None
    # without a callback the next read raises it, once
    silent = QueuedPyramid([Broken(base.levels[0])] + base.levels[1:], 0)
    silent.write((0, 0), 1)
    with pytest.raises(OSError, match="disk full"):
        silent.read((1, 1))
    assert silent.read((1, 1)) is not None
    for p in (pyr, bad, silent):
        p.close()


def test_stride_factors_are_checked():
    with pytest.raises(ValueError, match="stride sampling"):
        Pyramid([np.zeros((100, 100), np.int32), np.zeros((70, 70), np.int32)])


# -- in the viewer (real viewer under Xvfb, real keys) ---------------------------------------
@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video_pyramid"), seed=0)


def _blobs(shape, seed=3):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, 200.0)
    for r in range(40, shape[0], 70):
        for c in range(40, shape[1], 80):
            img += 600 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 150)
    return (img + rng.normal(0, 25, shape)).astype(np.float32)


def _consistent(levels, factors):
    for lv, (fr, fc) in zip(levels, factors, strict=True):
        np.testing.assert_array_equal(lv, levels[0][..., ::fr, ::fc])


def test_widget_pyramid_labels_commit_undo_redo_and_edit_window(
    make_napari_viewer, qtbot, video_dir, monkeypatch
):
    from gui import Notes, canvas_click, dock, key, load, press, unwrap, wait_idle

    import napari_sam3.core.pyramid as pyramid_mod
    from napari_sam3 import ObjectPrompt

    monkeypatch.setattr(scratch_labels, "PYRAMID_PIXELS", 50_000)
    monkeypatch.setattr(pyramid_mod, "TOP", 64)
    limits = (100.0, 900.0)
    pixels = _blobs((300, 400))
    viewer, widget = dock(make_napari_viewer)
    notes = Notes()
    seg = load(widget, qtbot, video_dir)
    image = viewer.add_image(pixels, name="cells", contrast_limits=limits)
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is image
                    and widget.binder.points_layer is not None
                    and widget.binder.labels_layer is not None, timeout=30_000)
    wait_idle(widget, qtbot)
    labels = unwrap(widget.binder.labels_layer)
    assert labels.multiscale and not labels.editable
    assert [tuple(lv.shape) for lv in labels.data] == [(300, 400), (150, 200), (75, 100),
                                                       (38, 50)]
    target = widget.binder.target(labels)
    factors = target.pyramid.factors
    folder = widget.binder.scratch.folder_of(labels)
    assert folder is not None and scratch_labels.is_ours(folder)

    def levels():  # what napari reads, once the background writes have landed
        target.pyramid.wait()
        return [np.asarray(lv[...]) for lv in labels.data]

    # a commit writes the object at full resolution and its region at every level
    points = unwrap(widget.binder.points_layer)
    obj_id = widget.session.object_id
    r, c = canvas_click(viewer, qtbot, points, 180, 200)
    wait_idle(widget, qtbot)
    want = seg.segment(pixels, [ObjectPrompt(points=[(r, c)])], limits=limits,
                       max_hole_area=widget.post_section.max_hole_area.value(),
                       max_sprinkle_area=widget.post_section.max_sprinkle_area.value())
    assert want.any()
    assert widget.object_section.commit()
    committed = levels()
    np.testing.assert_array_equal(committed[0], np.where(want > 0, obj_id, 0))
    _consistent(committed, factors)
    assert scratch_labels.holds_labels(folder)
    assert widget.session.object_id == obj_id + 1  # ids continue above the written ones

    # Ctrl+Z / Ctrl+Shift+Z on the labels layer: every level, exactly
    key(viewer, qtbot, labels, "Z", "Control")
    assert not any(lv.any() for lv in levels())
    key(viewer, qtbot, labels, "Z", "Control", "Shift")
    for got, exp in zip(levels(), committed, strict=True):
        np.testing.assert_array_equal(got, exp)

    # Edit region: an editable window of the view, applied back as one undo step
    viewer.reset_view()
    press(qtbot, widget.layers_section.edit_button)
    window = unwrap(widget.layers_section.edit_window.layer)
    assert window.editable and not window.multiscale and window.mode == "paint"
    assert window.data.shape == (300, 400)
    np.testing.assert_array_equal(window.data, committed[0])
    assert widget.binder.labels_layer is not None and unwrap(widget.binder.labels_layer) is labels
    rows, cols = np.mgrid[10:20, 30:45]
    window.data_setitem((rows.ravel(), cols.ravel()), 9)  # what the brush does
    window.undo()  # napari's undo works inside the window
    window.data_setitem((rows.ravel(), cols.ravel()), 9)
    press(qtbot, widget.layers_section.apply_edits_button)
    assert not any(unwrap(ly) is window for ly in viewer.layers)
    edited = levels()
    expect = committed[0].copy()
    expect[10:20, 30:45] = 9
    np.testing.assert_array_equal(edited[0], expect)
    _consistent(edited, factors)
    assert "150 px changed" in widget.status
    key(viewer, qtbot, labels, "Z", "Control")
    for got, exp in zip(levels(), committed, strict=True):
        np.testing.assert_array_equal(got, exp)
    assert not notes.since("error"), notes.since("error")


def test_widget_labels_of_a_huge_multiscale_image_take_its_levels_without_the_plane(
    make_napari_viewer, qtbot, tmp_path
):
    import zarr
    from gui import dock, unwrap, wait_idle

    shapes = [(20000, 20000), (10000, 10000), (5000, 5000), (2500, 2500)]
    levels = [zarr.create_array(tmp_path / f"img{k}.zarr", shape=s, chunks=(1024, 1024),
                                dtype="uint16", fill_value=0) for k, s in enumerate(shapes)]
    viewer, widget = dock(make_napari_viewer)
    tracemalloc.start()
    try:
        image = viewer.add_image(levels, multiscale=True, name="slide", contrast_limits=(0, 1))
        qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is unwrap(image)
                        and widget.binder.labels_layer is not None, timeout=30_000)
        wait_idle(widget, qtbot)
        qtbot.wait(200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    labels = unwrap(widget.binder.labels_layer)
    assert labels.multiscale
    assert [tuple(lv.shape) for lv in labels.data] == shapes + [(1250, 1250), (625, 625)]
    assert peak < 200 << 20, peak  # one int32 plane is 1.6 GB, the image's 800 MB
    folder = widget.binder.scratch.folder_of(labels)
    assert not scratch_labels.holds_labels(folder)
    # a write costs its region: one chunk per level
    target = widget.binder.target(labels)
    rows, cols = np.mgrid[15000:15040, 3000:3050]
    target.set_pixels((rows.ravel(), cols.ravel()), 4)
    target.wait()
    for k in range(len(labels.data)):
        assert len(_chunk_files(folder / scratch_labels.ARRAY / str(k))) == 1
    assert target.undo()
    target.wait()
    assert not scratch_labels.holds_labels(folder)


def test_widget_pyramid_stack_propagation_is_one_step_at_every_level(
    make_napari_viewer, qtbot, video_dir, monkeypatch
):
    from gui import canvas_click, dock, key, load, press, unwrap, wait_idle

    import napari_sam3.core.pyramid as pyramid_mod
    from napari_sam3 import ObjectPrompt

    monkeypatch.setattr(scratch_labels, "PYRAMID_PIXELS", 5000)
    monkeypatch.setattr(pyramid_mod, "TOP", 32)
    limits, depth = (100.0, 900.0), 8
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:80, 0:112]
    zstack = np.stack([
        200 + 600 * np.exp(-((rows - 35) ** 2 + (cols - 30 - 4 * z) ** 2) / 150)
        + 500 * np.exp(-((rows - 55) ** 2 + (cols - 85) ** 2) / 120)
        + rng.normal(0, 25, rows.shape) for z in range(depth)]).astype(np.float32)
    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, video_dir)
    image = viewer.add_image(zstack, name="cells", contrast_limits=limits)
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is image
                    and widget.binder.points_layer is not None
                    and widget.binder.points_layer.ndim == 3
                    and widget.binder.labels_layer is not None, timeout=30_000)
    wait_idle(widget, qtbot)
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)
    assert labels.multiscale
    assert [tuple(lv.shape) for lv in labels.data] == [(8, 80, 112), (8, 40, 56), (8, 20, 28)]
    pyramid = widget.binder.target(labels).pyramid
    factors = pyramid.factors
    pp = {"max_hole_area": widget.post_section.max_hole_area.value(),
          "max_sprinkle_area": widget.post_section.max_sprinkle_area.value()}

    def levels():  # what napari reads, once the background writes have landed
        pyramid.wait()
        return [np.asarray(lv[...]) for lv in labels.data]

    viewer.dims.set_current_step(0, 3)  # object 1, committed on slice 3
    canvas_click(viewer, qtbot, points, 35, 42)
    wait_idle(widget, qtbot)
    press(qtbot, widget.object_section.commit_button)
    committed = levels()
    assert (committed[0][3] == 1).any() and not np.delete(committed[0], 3, axis=0).any()

    viewer.dims.set_current_step(0, 5)  # object 2, propagated through the stack
    _, r2, c2 = canvas_click(viewer, qtbot, points, 55, 85)
    wait_idle(widget, qtbot)
    press(qtbot, widget.propagate_section.propagate_button)
    wait_idle(widget, qtbot)
    want = seg.propagate(zstack, {5: {2: ObjectPrompt(points=[(r2, c2)])}}, axis=0,
                         limits=limits, out=committed[0].copy(), **pp)
    propagated = levels()
    np.testing.assert_array_equal(propagated[0], want)
    _consistent(propagated, factors)
    assert len({k for k in range(depth) if (propagated[0][k] == 2).any()}) > 1
    assert "Ctrl+Z undoes it" in widget.status

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    key(viewer, qtbot, labels, "Z", "Control")  # undoes the propagation, not the commit
    assert same(levels(), committed)
    key(viewer, qtbot, labels, "Z", "Control", "Shift")
    assert same(levels(), propagated)
    key(viewer, qtbot, labels, "Z", "Control")
    key(viewer, qtbot, labels, "Z", "Control")
    assert not any(lv.any() for lv in levels())


def test_largest_label_reads_chunk_by_chunk(tmp_path):
    import dask.array as da
    import zarr

    from napari_sam3.core.planes import largest_label

    z = zarr.create_array(tmp_path / "l.zarr", shape=(3, 70, 90), chunks=(1, 32, 32),
                          dtype=np.int32, fill_value=0)
    z[2, 69, 89] = 17  # the very last chunk
    z[0, 3, 3] = 5
    steps = []
    assert largest_label(z, progress=lambda d, t: steps.append((d, t))) == 17
    assert steps[-1] == (27, 27) and len(steps) == 27  # 3 x 3 x 3 chunks, one read each
    assert largest_label(da.from_array(np.asarray(z[...]), chunks=(1, 40, 40))) == 17
    assert largest_label(np.full((4, 4), -3, np.int32)) == 0


def test_a_labels_box_is_found_chunk_by_chunk(tmp_path):
    """Delete, merge and refine find a label's box on a lazy plane one chunk at a time
    (any reading order gives the same box as NumPy's)."""
    import dask.array as da
    import zarr

    from napari_sam3.core.planes import iter_label_box, label_box
    from napari_sam3.core.postprocess import mask_box

    rng = np.random.default_rng(3)
    plane = np.zeros((70, 90), np.int32)
    plane[rng.integers(0, 70, 6), rng.integers(0, 90, 6)] = 9  # scattered over chunks
    plane[69, 0] = 9
    plane[10:20, 40:50] = 2
    z = zarr.create_array(tmp_path / "b.zarr", shape=plane.shape, chunks=(32, 32),
                          dtype=np.int32, fill_value=0)
    z[...] = plane
    for label in (9, 2):
        want = mask_box(plane == label)
        assert label_box(z, label) == want == label_box(plane, label)
        assert label_box(da.from_array(plane, chunks=(25, 40)), label) == want
    assert label_box(z, 5) is None and label_box(plane, 5) is None
    steps = iter_label_box(z, 2)
    assert [next(steps) for _ in range(9)][-1] == (9, 9)  # 3 x 3 chunks, one read each
    with pytest.raises(ValueError, match="2D"):
        label_box(np.zeros((2, 3, 4)), 1)
