"""The napari widget on z-stacks, time series and large lazy images, driven like a user.

Real viewer under Xvfb (see docs/headless-napari.md), real clicks, a tiny random
SAM3 video checkpoint (single-slice clicks load the image tracker from the same
folder). Expected results come from the core API on the widget's own segmenter.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from gui import Notes, dock, load, press, unwrap, wait_idle
from gui import canvas_click as click

from napari_sam3 import ObjectPrompt

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
LIMITS = (100.0, 900.0)
WAIT_MS = 60_000
DEPTH = 8


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video_widget"), seed=0)


def blobs(shape, centers, rng, noise=25.0):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, 200.0)
    for r, c, s in centers:
        img += 600 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / s)
    return (img + rng.normal(0, noise, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def zstack():
    """(Z, Y, X) float32: a blob that drifts right and a fixed one."""
    rng = np.random.default_rng(0)
    return np.stack(
        [blobs((80, 112), [(35, 30 + 4 * z, 150), (55, 85, 120)], rng) for z in range(DEPTH)]
    )


# -- helpers -----------------------------------------------------------------------------------
def add(viewer, widget, qtbot, data, name="cells", **kwargs):
    layer = viewer.add_image(data, name=name, **kwargs)
    widget.layers_section.image_combo.setCurrentIndex(widget.layers_section.image_combo.findText(layer.name))
    qtbot.waitUntil(
        lambda: (
            unwrap(widget.binder.image_layer) is layer
            and widget.binder.points_layer is not None
            and widget.binder.points_layer.ndim == layer.ndim
            and widget.binder.preview_layer is not None
            and widget.binder.preview_layer.ndim == layer.ndim
        ),
        timeout=WAIT_MS,
    )
    wait_idle(widget, qtbot)
    return layer


def settings(widget):
    return {
        "max_hole_area": widget.post_section.max_hole_area.value(),
        "max_sprinkle_area": widget.post_section.max_sprinkle_area.value(),
    }


# -- NumPy adapters (no GUI) ---------------------------------------------------------------
def test_prompts_belong_to_their_slice():
    from napari_sam3.widget import layer_data as _layers

    pts = np.array([[2, 10, 20], [5, 30, 40], [2, 12, 22], [2.4, 1, 1]])
    feats = {"object_id": [1, 1, 1, 2], "positive": [True, True, False, True]}
    rect = np.array([[5, 0, 0], [5, 0, 9], [5, 9, 9], [5, 9, 0]], float)
    got = _layers.prompts_by_slice(
        1,
        (50, 60),
        n_lead=1,
        points=pts,
        point_features=feats,
        shapes=[rect],
        shape_types=["rectangle"],
        shape_features={"object_id": [1]},
    )
    assert sorted(got) == [(2,), (5,)]
    p2, _ = got[(2,)]
    np.testing.assert_array_equal(p2.points, [[10, 20], [12, 22]])
    np.testing.assert_array_equal(p2.point_labels, [1, 0])
    assert p2.box is None
    p5, _ = got[(5,)]
    np.testing.assert_array_equal(p5.points, [[30, 40]])
    np.testing.assert_array_equal(p5.box, [0, 0, 9, 9])
    only = _layers.prompts_by_slice(
        1, (50, 60), n_lead=1, points=pts, point_features=feats, only=(5,)
    )
    assert list(only) == [(5,)]
    assert _layers.image_geometry((3, 4, 20, 30), rgb=False) == (2, (20, 30))
    assert _layers.image_geometry((4, 20, 30, 3), rgb=True) == (1, (20, 30))


def test_axis_view_and_visible_region():
    from napari_sam3.core import planes

    data = np.zeros((3, 4, 5, 6), np.int32)  # (T, Z, Y, X)
    view = planes.AxisView(data, axis=1, fixed={0: 2}, n_lead=2)
    assert view.shape == (4, 5, 6) and view.lead(3) == (2, 3)
    view[(3, slice(1, 3), slice(0, 2))] = 7
    assert data[2, 3, 1:3, 0:2].tolist() == [[7, 7], [7, 7]] and data.sum() == 28
    plane = planes.PlaneView(data, (2, 3))
    assert plane.shape == (5, 6) and np.asarray(plane).sum() == 28 and plane[1, 0] == 7
    assert planes.region_of([(-3.2, 10.2), (20.2, 50.6)], (100, 40)) == (0, 10, 21, 40)
    assert planes.region_of([(200, 5), (300, 6)], (100, 40)) is None


# -- z-stack: clicks per slice, commit, propagate, re-propagate, cancel ---------------------
def test_stack_slices_commit_propagate_repropagate_and_cancel(
    make_napari_viewer, qtbot, video_dir, zstack, tmp_path, monkeypatch
):
    viewer, widget = dock(make_napari_viewer)
    notes = Notes()

    # a cache location that cannot be used: one warning, work goes on in memory
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    seg = load(widget, qtbot, video_dir, cache=not_a_folder)
    qtbot.waitUntil(lambda: bool(notes.since("warning")), timeout=5000)
    assert any("embedding cache" in m for m in notes.since("warning")), notes.since()
    assert seg.store.path is None
    assert (widget.cache_section.tile_spin.value(), widget.cache_section.overlap_spin.value()) == (112, 28)  # model defaults

    image = add(viewer, widget, qtbot, zstack, contrast_limits=LIMITS)
    points, labels, preview = (
        unwrap(widget.binder.points_layer),
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
    )
    assert unwrap(widget.binder.image_layer) is image
    assert points.ndim == 3 and labels.data.shape == zstack.shape and preview.ndim == 3
    assert "axis 0" in widget.propagate_section.axis_label.text()
    assert (widget.propagate_section.start_spin.value(), widget.propagate_section.stop_spin.value()) == (0, DEPTH - 1)
    pp = settings(widget)

    def on_slice(k, prompt):
        return seg.segment(zstack[k], [prompt], limits=LIMITS, **pp)

    # a click on slice 2 segments slice 2 with the stack's limits; the preview sits there
    viewer.dims.set_current_step(0, 2)
    z, r, c = click(viewer, qtbot, points, 35, 40)
    assert z == 2
    wait_idle(widget, qtbot)
    p2 = ObjectPrompt(points=[(r, c)])
    want2 = on_slice(2, p2)
    assert want2.any()
    assert preview.data.shape == (1, 80, 112)
    np.testing.assert_allclose(preview.translate, (2, 0, 0))
    np.testing.assert_array_equal(preview.data[0], want2)
    assert widget.object_section.preview_region == ((2,), (slice(0, 80), slice(0, 112)))

    # a prompt of the same object on slice 5 does not leak into slice 2
    points.add([[5, 55, 85]])
    wait_idle(widget, qtbot)
    np.testing.assert_allclose(preview.translate, (2, 0, 0))
    np.testing.assert_array_equal(preview.data[0], want2)
    # ... and stepping to slice 5 shows slice 5's own object
    viewer.dims.set_current_step(0, 5)
    wait_idle(widget, qtbot)
    np.testing.assert_allclose(preview.translate, (5, 0, 0))
    np.testing.assert_array_equal(preview.data[0], on_slice(5, ObjectPrompt(points=[(55, 85)])))
    viewer.dims.set_current_step(0, 2)
    wait_idle(widget, qtbot)
    np.testing.assert_array_equal(preview.data[0], want2)

    # commit writes slice 2 only and removes slice 2's prompts only
    press(qtbot, widget.object_section.commit_button)
    np.testing.assert_array_equal(labels.data[2], want2)
    assert not np.delete(labels.data, 2, axis=0).any()
    assert points.data[:, 0].tolist() == [5.0] and widget.session.object_id == 2
    labels.undo()
    assert not labels.data.any()
    labels.redo()
    np.testing.assert_array_equal(labels.data[2], want2)

    # propagate object 2 (prompted on slice 3) through the whole stack, both directions
    viewer.dims.set_current_step(0, 3)
    _, r3, c3 = click(viewer, qtbot, points, 55, 85)
    wait_idle(widget, qtbot)
    before = labels.data.copy()
    progress = []
    widget.progress_bar.valueChanged.connect(
        lambda v: progress.append((v, widget.progress_bar.maximum()))
    )
    press(qtbot, widget.propagate_section.propagate_button)
    assert widget.runner.task_worker is not None
    wait_idle(widget, qtbot)
    prompts = {3: {2: ObjectPrompt(points=[(r3, c3)])}}
    common = {"axis": 0, "limits": LIMITS, "stop_after": 3, **pp}
    want = seg.propagate(zstack, prompts, direction="both", out=before.copy(), **common)
    np.testing.assert_array_equal(labels.data, want)
    assert {k for k in range(DEPTH) if (want[k] == 2).any()} - {3}, "nothing propagated"
    assert (labels.data[2] == 1).any()  # the committed object stays
    assert any(m == DEPTH and v > 0 for v, m in progress), progress
    assert "Propagated object 2" in widget.status

    # a correction on slice 5, re-propagated forward from there: slices < 5 unchanged
    viewer.dims.set_current_step(0, 5)
    widget.session.object_id = 2
    points.add([[5, 40, 20]])
    wait_idle(widget, qtbot)
    press(qtbot, widget.propagate_section.start_here_button)
    assert widget.propagate_section.start_spin.value() == 5
    widget.propagate_section.direction_combo.setCurrentText("forward")
    before = labels.data.copy()
    press(qtbot, widget.propagate_section.propagate_button)
    wait_idle(widget, qtbot)
    prompts[5] = {2: ObjectPrompt(points=[(40, 20)])}
    want = seg.propagate(zstack, prompts, direction="forward", start=5, out=before.copy(), **common)
    np.testing.assert_array_equal(labels.data[:5], before[:5])
    np.testing.assert_array_equal(labels.data, want)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "widget-stack.png"
    viewer.screenshot(str(shot), canvas_only=False, flash=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # cancel: slices done stay, the rest is untouched (the tracker is gated at slice 3)
    widget.object_section.new_object()
    assert widget.session.object_id == 3
    viewer.dims.set_current_step(0, 0)
    _, r0, c0 = click(viewer, qtbot, points, 35, 30)
    wait_idle(widget, qtbot)
    widget.propagate_section.start_spin.setValue(0)
    widget.propagate_section.stop_after_spin.setValue(1000)
    engine = seg.video_tracker()
    real_forward = engine.model.forward
    calls, started, release = [0], threading.Event(), threading.Event()

    def gated(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # 1 conditioning step, then slices 0, 1, 2 pass
            started.set()
            assert release.wait(30)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", gated)
    before = labels.data.copy()
    press(qtbot, widget.propagate_section.propagate_button)
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.runner.task is not None and widget.runner.task.done == 3, timeout=WAIT_MS)
    press(qtbot, widget.object_section.cancel_button)
    release.set()
    wait_idle(widget, qtbot)
    assert "cancelled" in widget.status and "3 slice(s)" in widget.status
    monkeypatch.setattr(engine.model, "forward", real_forward)
    prompts = {0: {3: ObjectPrompt(points=[(r0, c0)])}}
    want = seg.propagate(
        zstack, prompts, direction="forward", out=before.copy(), **{**common, "stop_after": 1000}
    )
    np.testing.assert_array_equal(labels.data[:3], want[:3])
    np.testing.assert_array_equal(labels.data[3:], before[3:])
    assert (labels.data[:3] == 3).any()
    assert not notes.since("error"), notes.since("error")


# -- t and z: propagation along the stepped axis, the other one fixed; RGB stacks ------------
def test_tzyx_propagates_along_the_stepped_axis_and_rgb_stack_clicks(
    make_napari_viewer, qtbot, video_dir
):
    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, video_dir)
    rng = np.random.default_rng(3)
    series = np.stack(
        [
            np.stack([blobs((48, 64), [(20 + 2 * t, 20 + 3 * z, 90)], rng) for z in range(4)])
            for t in range(3)
        ]
    )
    import dask.array as da

    lazy = da.from_array(series, chunks=(1, 1, 48, 64))  # a lazy (T, Z, Y, X) series
    add(viewer, widget, qtbot, lazy, contrast_limits=LIMITS)
    points, labels, preview = (
        unwrap(widget.binder.points_layer),
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
    )
    assert labels.data.shape == series.shape
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 2)
    viewer.dims.last_used = 1  # the user steps through z
    assert widget.binder.propagation_axis() == (1, {0: 1})
    assert "axis 1" in widget.propagate_section.axis_label.text() and "axis 0 stays at 1" in widget.propagate_section.axis_label.text()
    assert (widget.propagate_section.start_spin.value(), widget.propagate_section.stop_spin.value()) == (0, 3)
    # precompute every z of t = 1: clicks and propagation there need no encoder
    widget.cache_section.precompute_combo.setCurrentText("all slices")
    press(qtbot, widget.cache_section.precompute_button)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == 4 and "Precomputed 4 tiles (4 encoded" in widget.status
    t, z, r, c = click(viewer, qtbot, points, 22, 26)
    assert (t, z) == (1, 2)
    wait_idle(widget, qtbot)
    pp = settings(widget)
    prompt = ObjectPrompt(points=[(r, c)])
    np.testing.assert_allclose(preview.translate, (1, 2, 0, 0))
    np.testing.assert_array_equal(
        preview.data[0, 0], seg.segment(series[1, 2], [prompt], limits=LIMITS, **pp)
    )
    points.add([[0, 1, 30, 40]])  # same object at another time point: not used
    wait_idle(widget, qtbot)
    press(qtbot, widget.propagate_section.propagate_button)
    wait_idle(widget, qtbot)
    want = seg.propagate(
        series, {2: {1: prompt}}, axis=1, fixed={0: 1}, direction="both", limits=LIMITS, **pp
    )
    np.testing.assert_array_equal(labels.data[1], want)
    assert want.any() and not labels.data[[0, 2]].any()
    assert seg.encoder_calls == 4

    # an RGB stack (Z, Y, X, 3): uint8 goes to the model unchanged
    viewer.layers.clear()
    rgb = np.clip(np.repeat(series[0][..., None], 3, axis=-1) / 4, 0, 255).astype(np.uint8)
    add(viewer, widget, qtbot, rgb, name="rgb")
    points, preview = unwrap(widget.binder.points_layer), unwrap(widget.binder.preview_layer)
    assert points.ndim == 3 and unwrap(widget.binder.labels_layer).data.shape == rgb.shape[:3]
    viewer.dims.set_current_step(0, 3)
    z, r, c = click(viewer, qtbot, points, 20, 30)
    wait_idle(widget, qtbot)
    np.testing.assert_allclose(preview.translate, (3, 0, 0))
    np.testing.assert_array_equal(
        preview.data[0], seg.segment(rgb[3], [ObjectPrompt(points=[(r, c)])], **pp)
    )


# -- a large lazy 2D image: tiles, crop preview, precompute with progress and Cancel ---------
# background threads that fingerprint the image's content (provenance, sessions): they read
# it whole (plane by plane) once, never on the GUI thread and never for a click
FINGERPRINT_THREADS = ("napari-sam3 fingerprint", "napari-sam3-session")


class Recorder:
    """An array-like over a Zarr array that records which regions are read, and from which
    thread (napari's own display reads come from the GUI thread; the fingerprint threads'
    reads are kept apart)."""

    def __init__(self, arr):
        self.arr = arr
        self.shape, self.dtype, self.ndim, self.size = arr.shape, arr.dtype, arr.ndim, arr.size
        self.worker_reads = []
        self.fingerprint_reads = []

    def __getitem__(self, key):
        out = np.asarray(self.arr[key])
        thread = threading.current_thread()
        if thread.name.startswith(FINGERPRINT_THREADS):
            self.fingerprint_reads.append(out.shape)
        elif thread is not threading.main_thread():
            self.worker_reads.append(out.shape)
        return out

    def __len__(self):
        return self.shape[0]


def test_large_zarr_multiscale_image_tiles_precompute_and_zarr_labels(
    make_napari_viewer, qtbot, video_dir, tmp_path, monkeypatch
):
    import zarr

    from napari_sam3.widget import scratch_labels

    rng = np.random.default_rng(5)
    centers = [(r, c, 150) for r in range(40, 400, 70) for c in range(40, 600, 80)]
    pixels = blobs((400, 600), centers, rng)
    store = zarr.create_array(
        tmp_path / "img.zarr", shape=pixels.shape, chunks=(100, 100), dtype="float32"
    )
    store[...] = pixels
    level0 = Recorder(store)

    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, video_dir, cache=tmp_path / "emb.zarr")
    assert seg.store.path is not None and seg.tile_size == 112 and seg.overlap == 28
    add(viewer, widget, qtbot, [level0, pixels[::2, ::2]], multiscale=True, contrast_limits=LIMITS)
    points, labels, preview = (
        unwrap(widget.binder.points_layer),
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
    )
    assert labels.data.shape == pixels.shape and isinstance(labels.data, np.ndarray)
    grid = seg.tiles(pixels)
    assert len(grid) == 35
    pp = settings(widget)

    # a click encodes one tile, reads only tiles, and the preview is that tile's crop
    r, c = click(viewer, qtbot, points, 200, 300)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == 1
    assert level0.worker_reads and all(h * w <= 112 * 112 for h, w in level0.worker_reads)
    prompt = ObjectPrompt(points=[(r, c)])
    (obj,) = seg.predict_objects(pixels, [prompt], LIMITS)
    rows, cols = obj.region
    want = seg.segment(pixels, [prompt], limits=LIMITS, **pp)
    assert seg.encoder_calls == 1 and want.any()
    assert preview.data.shape == (rows.stop - rows.start, cols.stop - cols.start)
    np.testing.assert_allclose(preview.translate, (rows.start, cols.start))
    np.testing.assert_array_equal(preview.data, want[obj.region])
    outside = want.copy()
    outside[obj.region] = 0
    assert not outside.any()

    press(qtbot, widget.object_section.commit_button)
    np.testing.assert_array_equal(labels.data, want)
    labels.undo()
    assert not labels.data.any()

    # precompute the field of view: progress done/total, tiles on disk, then a free click
    cam = (viewer.camera if getattr(viewer, "scene", None) is None else viewer.scene.camera)
    cam.center = (0.0, 100.0, 150.0)
    cam.zoom = 4.0
    qtbot.wait(50)
    h, w = viewer.canvas.size if hasattr(viewer, "canvas") else viewer._canvas_size
    fov = widget.binder.field_of_view()
    expect = np.clip((100 - h / 8, 150 - w / 8, 100 + h / 8, 150 + w / 8), 0, [400, 600] * 2)
    assert np.allclose(fov, expect, atol=1.5), (fov, expect)
    n_fov = len(grid.tiles_in(fov))
    assert 0 < n_fov < len(grid)
    new_fov = n_fov - (obj.region in [t.slices for t in grid.tiles_in(fov)])
    progress = []
    widget.progress_bar.valueChanged.connect(
        lambda v: progress.append((v, widget.progress_bar.maximum()))
    )
    widget.cache_section.precompute_combo.setCurrentText("field of view")
    press(qtbot, widget.cache_section.precompute_button)
    wait_idle(widget, qtbot)
    assert (n_fov, n_fov) in progress, progress
    assert seg.encoder_calls == 1 + new_fov
    assert f"Precomputed {n_fov} tiles ({new_fov} encoded" in widget.status
    assert len(seg.store.disk_entries()) == 1 + new_fov
    calls = seg.encoder_calls
    click(viewer, qtbot, points, 90, 140)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == calls and preview.data.any()

    # whole image, cancelled after two more tiles: finished tiles stay cached
    started, release = threading.Event(), threading.Event()
    real_encode = seg.encode_rgb
    new = [0]

    def gated(rgb, key=""):
        new[0] += 1
        if new[0] == 3:
            started.set()
            assert release.wait(30)
        return real_encode(rgb, key)

    monkeypatch.setattr(seg, "encode_rgb", gated)
    widget.cache_section.precompute_combo.setCurrentText("whole image")
    press(qtbot, widget.cache_section.precompute_button)
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    press(qtbot, widget.object_section.cancel_button)
    release.set()
    wait_idle(widget, qtbot)
    assert "cancelled" in widget.status
    cached = len(seg.store.disk_entries())
    assert cached == 1 + new_fov + 3
    assert widget.cache_section.precompute()
    wait_idle(widget, qtbot)
    assert f"Precomputed 35 tiles ({35 - cached} encoded" in widget.status

    # above LARGE_PIXELS the labels layer the widget creates is Zarr; commit is undoable
    monkeypatch.setattr(scratch_labels, "LARGE_PIXELS", 100_000)
    small = pixels[:300, :500].copy()
    cam.zoom = 1.0
    add(viewer, widget, qtbot, small, name="big", contrast_limits=LIMITS)
    labels, points, preview = (
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.points_layer),
        unwrap(widget.binder.preview_layer),
    )
    assert isinstance(labels.data, zarr.Array) and labels.data.shape == small.shape
    viewer.reset_view()
    points.selected_data = set(range(len(points.data)))  # the prompt layer is shared
    points.remove_selected()
    wait_idle(widget, qtbot)
    obj_id = widget.session.object_id
    r, c = click(viewer, qtbot, points, 150, 250)
    wait_idle(widget, qtbot)
    want = seg.segment(small, [ObjectPrompt(points=[(r, c)])], limits=LIMITS, **pp)
    assert widget.object_section.commit()
    np.testing.assert_array_equal(np.asarray(labels.data[...]), np.where(want > 0, obj_id, 0))
    labels.undo()
    assert not np.asarray(labels.data[...]).any()
