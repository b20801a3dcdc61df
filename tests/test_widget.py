"""The napari widget, driven like a user: real viewer, real clicks, tiny real model.

Run under Xvfb (see docs/headless-napari.md); no part of our own code is stubbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from gui import Notes, press, unwrap

from napari_sam3 import ObjectPrompt, PromptError
from napari_sam3.core.postprocess import PostProcessing
from napari_sam3.widget import layer_data as _layers

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
LIMITS = (150.0, 900.0)
WAIT_MS = 30_000
DEBOUNCE_WAIT_MS = 400


# -- pure adapters (no GUI) ----------------------------------------------------------------
def test_points_for_object_keeps_row_col_and_filters_by_id():
    data = np.array([[5.0, 30.0], [10.0, 2.0], [7.0, 8.0]])
    feats = {"object_id": np.array([1, 2, 1]), "positive": np.array([True, True, False])}
    rc, labels = _layers.points_for_object(data, feats, 1, image_shape=(20, 40))
    np.testing.assert_array_equal(rc, [[5.0, 30.0], [7.0, 8.0]])  # (row, col), never swapped
    np.testing.assert_array_equal(labels, [1, 0])
    rc2, labels2 = _layers.points_for_object(data, feats, 2)
    np.testing.assert_array_equal(rc2, [[10.0, 2.0]])
    np.testing.assert_array_equal(labels2, [1])


def test_point_outside_image_is_a_clear_error_and_border_half_pixel_is_inside():
    feats = {"object_id": np.array([1]), "positive": np.array([True])}
    with pytest.raises(PromptError, match=r"outside the 20x40 image"):
        _layers.points_for_object([[25.0, 3.0]], feats, 1, image_shape=(20, 40))
    with pytest.raises(PromptError, match=r"outside"):
        _layers.points_for_object([[3.0, -1.0]], feats, 1, image_shape=(20, 40))
    rc, _ = _layers.points_for_object([[-0.4, 39.4]], feats, 1, image_shape=(20, 40))
    np.testing.assert_array_equal(rc, [[0.0, 39.0]])


def test_last_rectangle_wins_and_other_shapes_are_counted():
    rect_a = np.array([[1, 2], [1, 12], [9, 12], [9, 2]], float)
    ellipse = np.array([[0, 0], [0, 5], [5, 5], [5, 0]], float)
    rect_b = np.array([[15, 30], [15, 4], [3, 4], [3, 30]], float)  # corners in any order
    feats = {"object_id": np.array([1, 1, 1, 2])}
    box, ignored = _layers.box_for_object(
        [rect_a, ellipse, rect_b, rect_a],
        ["rectangle", "ellipse", "rectangle", "rectangle"],
        feats,
        1,
        image_shape=(20, 40),
    )
    np.testing.assert_array_equal(box, [3, 4, 15, 30])  # (min row, min col, max row, max col)
    assert ignored == 1
    prompt, ignored = _layers.object_prompt(
        1,
        (20, 40),
        shapes=[ellipse],
        shape_types=["ellipse"],
        shape_features={"object_id": np.array([1])},
    )
    assert prompt is None and ignored == 1
    with pytest.raises(PromptError, match="outside"):
        _layers.box_for_object(
            [rect_a + 100], ["rectangle"], {"object_id": [1]}, 1, image_shape=(20, 40)
        )


def test_object_prompt_ids_and_colors():
    feats = {"object_id": np.array([3, 3]), "positive": np.array([True, False])}
    prompt, ignored = _layers.object_prompt(
        3,
        (20, 40),
        points=[[1, 2], [3, 4]],
        point_features=feats,
        shapes=[np.array([[0, 0], [0, 9], [9, 9], [9, 0]], float)],
        shape_types=["rectangle"],
        shape_features={"object_id": np.array([3])},
    )
    assert isinstance(prompt, ObjectPrompt) and ignored == 0
    np.testing.assert_array_equal(prompt.point_labels, [1, 0])
    np.testing.assert_array_equal(prompt.box, [0, 0, 9, 9])
    assert _layers.prompt_ids((feats, 2), ({"object_id": np.array([7])}, 1)) == {3, 7}
    assert _layers.next_object_id(5, {3, 7}) == 8
    assert _layers.next_object_id(0, set()) == 1
    colors = _layers.polarity_colors([True, False])
    assert colors[0, 1] > colors[0, 0] and colors[1, 0] > colors[1, 1]
    with pytest.raises(_layers.LayerError, match="2D"):
        _layers.image_shape_2d((4, 20, 30), rgb=False)
    assert _layers.image_shape_2d((20, 30, 3), rgb=True) == (20, 30)


def test_to_image_coords_follows_layer_transforms():
    from napari.layers import Image, Points

    image = Image(np.zeros((10, 20)), scale=(2, 2), translate=(10, 0))
    same = Points([[1, 2]], scale=(2, 2), translate=(10, 0))
    np.testing.assert_allclose(_layers.to_image_coords(same, image, same.data), [[1, 2]])
    world = Points([[14, 8]])  # world (14, 8) is image pixel (2, 4)
    np.testing.assert_allclose(_layers.to_image_coords(world, image, world.data), [[2, 4]])


def test_widget_module_does_not_import_torch():
    code = (
        "import sys, napari_sam3.widget.dock; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- GUI helpers -----------------------------------------------------------------------------
@pytest.fixture
def gray_image():
    """Non-square float image with two blobs; contrast limits LIMITS are set on the layer."""
    rows, cols = np.mgrid[0:72, 0:120]
    img = (
        200
        + 600 * np.exp(-((rows - 30) ** 2 + (cols - 40) ** 2) / 200)
        + 500 * np.exp(-((rows - 45) ** 2 + (cols - 85) ** 2) / 150)
    )
    img = img + np.random.default_rng(0).normal(0, 30, img.shape)
    return img.astype(np.float32)



@pytest.fixture
def docked(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    yield viewer, widget
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def load_tiny(widget, qtbot, folder):

    widget.model_section.model_edit.setText(str(folder))
    widget.model_section.device_combo.setCurrentText("cpu")
    widget.cache_section.cache_edit.setText("")  # memory only and untiled, as tiny_segmenter
    widget.cache_section.tile_spin.setValue(1024)
    press(qtbot, widget.model_section.load_button)
    qtbot.waitUntil(lambda: widget.model_section.load_worker is None, timeout=WAIT_MS)
    assert widget.session.segmenter is not None, widget.status


def add_image(viewer, widget, qtbot, img, **kwargs):
    layer = viewer.add_image(img, name="cells", contrast_limits=LIMITS, **kwargs)
    qtbot.waitUntil(
        lambda: (
            widget.binder.points_layer is not None
            and widget.binder.points_layer.name == "SAM3 points"
            and widget.binder.preview_layer is not None
        ),
        timeout=WAIT_MS,
    )
    assert unwrap(widget.binder.image_layer) is layer
    return layer




def wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def canvas_point(viewer, row, col):
    """Canvas pixel of image pixel (row, col) for a 2D view (scale 1)."""
    from qtpy.QtCore import QPoint

    native = viewer.window._qt_viewer.canvas.native
    cam = (viewer.camera if getattr(viewer, "scene", None) is None else viewer.scene.camera)
    cy, cx = cam.center[-2:]
    x = (col - cx) * cam.zoom + native.width() / 2
    y = (row - cy) * cam.zoom + native.height() / 2
    return QPoint(round(x), round(y))


def click(viewer, qtbot, layer, row, col):
    from qtpy.QtCore import Qt

    viewer.layers.selection.active = layer
    layer.mode = "add"
    n = len(layer.data)
    qtbot.mouseClick(
        viewer.window._qt_viewer.canvas.native,
        Qt.MouseButton.LeftButton,
        pos=canvas_point(viewer, row, col),
    )
    qtbot.waitUntil(lambda: len(layer.data) == n + 1, timeout=5000)
    got = layer.data[-1]
    assert abs(got[0] - row) < 1.0 and abs(got[1] - col) < 1.0, (got, row, col)
    return got


def core_labels(segmenter, img, prompt, widget=None):
    """The direct core result with the widget's post-processing settings."""
    pp = PostProcessing()
    hole = pp.max_hole_area if widget is None else widget.post_section.max_hole_area.value()
    sprinkle = pp.max_sprinkle_area if widget is None else widget.post_section.max_sprinkle_area.value()
    return segmenter.segment(
        img, [prompt], max_hole_area=hole, max_sprinkle_area=sprinkle, limits=LIMITS
    )


# -- GUI tests -------------------------------------------------------------------------------
def test_click_preview_commit_second_object_undo_screenshot(
    docked, qtbot, tiny_tracker_dir, tiny_segmenter, gray_image
):

    from napari_sam3.widget.dock import Sam3Widget

    viewer, widget = docked
    assert isinstance(widget, Sam3Widget)
    assert widget.model_section.model_edit.text() == "facebook/sam3"
    assert widget.post_section.max_hole_area.value() == PostProcessing().max_hole_area
    assert widget.post_section.max_sprinkle_area.value() == PostProcessing().max_sprinkle_area
    assert widget.object_section.live_checkbox.isChecked() and not widget.post_section.overwrite_checkbox.isChecked()
    assert widget.session.segmenter is None
    notes = Notes()

    load_tiny(widget, qtbot, tiny_tracker_dir)
    image = add_image(viewer, widget, qtbot, gray_image)
    assert unwrap(widget.binder.image_layer) is image
    assert {ly.name for ly in viewer.layers} >= {
        "SAM3 points",
        "SAM3 boxes",
        "SAM3 preview",
        "SAM3 labels",
    }
    points, labels, preview = (
        unwrap(widget.binder.points_layer),
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
    )
    assert labels.name == "SAM3 labels" and labels.data.shape == gray_image.shape
    assert widget.session.object_id == 1

    # object 1: a real click on the canvas; the live preview follows
    r1, c1 = click(viewer, qtbot, points, 30, 40)
    wait_idle(widget, qtbot)
    assert points.features["object_id"].tolist() == [1]
    assert points.features["positive"].tolist() == [True]
    expected1 = core_labels(
        tiny_segmenter, gray_image, ObjectPrompt(points=[(r1, c1)], point_labels=[1]), widget
    )
    mask1 = expected1 > 0
    assert 0 < mask1.sum() < mask1.size
    np.testing.assert_array_equal(preview.data, np.where(mask1, 1, 0))
    assert "Object 1" in widget.status

    press(qtbot, widget.object_section.commit_button)
    after_first = labels.data.copy()
    np.testing.assert_array_equal(after_first, np.where(mask1, 1, 0))
    assert len(points.data) == 0 and not preview.data.any()
    assert widget.session.object_id == 2  # New object: max(label ids, prompt ids) + 1

    # object 2 overlaps object 1: the commit must not take object 1's pixels
    candidates = [(r, c) for r in range(8, 72, 8) for c in range(8, 120, 8)]
    r2 = c2 = mask2 = None
    for r, c in candidates:
        m = core_labels(tiny_segmenter, gray_image, ObjectPrompt(points=[(r, c)]), widget) > 0
        if (m & mask1).sum() > 20 and (m & ~mask1).sum() > 20:
            r2, c2, mask2 = r, c, m
            break
    assert mask2 is not None, "no overlapping second object found"
    points.add([[r2, c2]])  # same event path as a click
    wait_idle(widget, qtbot)
    assert points.features["object_id"].tolist() == [2]
    np.testing.assert_array_equal(preview.data, np.where(mask2, 2, 0))

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "widget.png"
    arr = viewer.screenshot(str(shot), canvas_only=False, flash=False)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert arr.shape[0] > 300 and arr.shape[1] > 500 and arr[..., :3].std() > 10

    assert widget.object_section.commit()
    np.testing.assert_array_equal(labels.data[mask1], 1)  # object 1 untouched
    np.testing.assert_array_equal(labels.data == 2, mask2 & ~mask1)
    assert widget.session.object_id == 3

    labels.undo()  # napari's undo reverts the second commit ...
    np.testing.assert_array_equal(labels.data, after_first)
    labels.undo()  # ... and the first
    assert not labels.data.any()
    assert not notes.since("error"), notes.since("error")


def test_overwrite_and_refine_selected_label(
    docked, qtbot, tiny_tracker_dir, tiny_segmenter, gray_image
):
    viewer, widget = docked
    load_tiny(widget, qtbot, tiny_tracker_dir)
    add_image(viewer, widget, qtbot, gray_image)
    labels, preview, points = (
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
        unwrap(widget.binder.points_layer),
    )
    labels.data_setitem(np.nonzero(np.ones(gray_image.shape, bool)), 9)  # everything is 9

    points.add([[40, 60]])
    wait_idle(widget, qtbot)
    mask = core_labels(tiny_segmenter, gray_image, ObjectPrompt(points=[(40, 60)])) > 0
    widget.post_section.overwrite_checkbox.setChecked(True)
    assert widget.object_section.commit()
    np.testing.assert_array_equal(labels.data == 1, mask)
    np.testing.assert_array_equal(labels.data[~mask], 9)
    assert widget.session.object_id == 10

    # the committed object is the layer's selected label: refine takes it, not object 10
    assert labels.selected_label == 1
    assert widget.object_section.refine_selected()
    assert widget.session.object_id == 1
    wait_idle(widget, qtbot)
    expected = core_labels(tiny_segmenter, gray_image, ObjectPrompt(mask=mask)) > 0
    np.testing.assert_array_equal(preview.data, np.where(expected, 1, 0))


def test_polarity_key_changes_feature_colour_and_prompt(
    docked, qtbot, tiny_tracker_dir, tiny_segmenter, gray_image
):
    from qtpy.QtCore import Qt

    viewer, widget = docked
    load_tiny(widget, qtbot, tiny_tracker_dir)
    add_image(viewer, widget, qtbot, gray_image)
    points, preview = unwrap(widget.binder.points_layer), unwrap(widget.binder.preview_layer)
    canvas = viewer.window._qt_viewer.canvas.native

    a = click(viewer, qtbot, points, 20, 30)
    assert widget.object_section.positive and points.features["positive"].tolist() == [True]
    assert points.face_color[0, 1] > points.face_color[0, 0]  # green
    b = click(viewer, qtbot, points, 50, 90)
    assert points.selected_data == {1}
    qtbot.keyClick(canvas, Qt.Key.Key_T)  # the new point and later points become negative
    assert not widget.object_section.positive
    assert points.features["positive"].tolist() == [True, False]
    assert points.face_color[1, 0] > points.face_color[1, 1]  # red
    assert points.face_color[0, 1] > points.face_color[0, 0]  # unchanged
    assert bool(points.feature_defaults["positive"][0]) is False
    wait_idle(widget, qtbot)
    expected = core_labels(
        tiny_segmenter, gray_image, ObjectPrompt(points=[a, b], point_labels=[1, 0])
    )
    np.testing.assert_array_equal(preview.data, np.where(expected > 0, 1, 0))

    points.selected_data = set()
    click(viewer, qtbot, points, 10, 100)  # added negative
    assert points.features["positive"].tolist() == [True, False, False]
    assert points.face_color[2, 0] > points.face_color[2, 1]
    points.selected_data = set()
    qtbot.keyClick(canvas, Qt.Key.Key_T)
    assert widget.object_section.positive and points.features["positive"].tolist() == [True, False, False]
    wait_idle(widget, qtbot)


def test_box_prompt_and_ignored_non_rectangle(
    docked, qtbot, tiny_tracker_dir, tiny_segmenter, gray_image
):
    viewer, widget = docked
    load_tiny(widget, qtbot, tiny_tracker_dir)
    add_image(viewer, widget, qtbot, gray_image)
    shapes, preview = unwrap(widget.binder.shapes_layer), unwrap(widget.binder.preview_layer)
    notes = Notes()

    shapes.add(np.array([[10, 10], [10, 40], [40, 40], [40, 10]], float), shape_type="ellipse")
    wait_idle(widget, qtbot)
    infos = notes.since("info")
    assert any("ignored" in m for m in infos), infos
    assert "ignored" in widget.status
    assert not preview.data.any()  # an ellipse is not a prompt

    shapes.add(np.array([[20, 30], [20, 90], [60, 90], [60, 30]], float), shape_type="rectangle")
    wait_idle(widget, qtbot)
    assert shapes.features["object_id"].tolist() == [1, 1]
    expected = core_labels(tiny_segmenter, gray_image, ObjectPrompt(box=(20, 30, 60, 90)))
    np.testing.assert_array_equal(preview.data, np.where(expected > 0, 1, 0))
    assert "1 non-rectangle shape(s) ignored" in widget.status
    assert not notes.since("error")


def test_cancel_drops_the_running_job(docked, qtbot, tiny_tracker_dir, gray_image, monkeypatch):

    viewer, widget = docked
    load_tiny(widget, qtbot, tiny_tracker_dir)
    add_image(viewer, widget, qtbot, gray_image)
    seg = widget.session.segmenter
    started, release = threading.Event(), threading.Event()
    real_encode = seg.encode_rgb

    def gated_encode(rgb, key=""):
        started.set()
        assert release.wait(30)
        return real_encode(rgb, key)  # the real encoder still runs

    monkeypatch.setattr(seg, "encode_rgb", gated_encode)
    labels, preview, points = (
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
        unwrap(widget.binder.points_layer),
    )
    points.add([[30, 40]])
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    worker = widget.runner.current_worker
    assert worker is not None
    press(qtbot, widget.object_section.cancel_button)
    release.set()
    qtbot.waitUntil(lambda: widget.runner.current_worker is None, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    assert "cancelled" in widget.status.lower()
    assert not preview.data.any() and not labels.data.any()
    assert widget.object_section.preview_mask is None
    assert not widget.object_section.commit()  # nothing to commit
    assert not labels.data.any()

    # the next request works (and reuses the embedding the cancelled job computed)
    calls = seg.encoder_calls
    assert widget.object_section.segment_current()
    wait_idle(widget, qtbot)
    assert preview.data.any() and seg.encoder_calls == calls


def test_bad_inputs_notify_and_change_nothing(
    docked, qtbot, tiny_tracker_dir, gray_image, tmp_path
):

    viewer, widget = docked
    notes = Notes()
    add_image(viewer, widget, qtbot, gray_image)
    labels, preview, points = (
        unwrap(widget.binder.labels_layer),
        unwrap(widget.binder.preview_layer),
        unwrap(widget.binder.points_layer),
    )

    # segmenting without a model
    points.add([[30, 40]])
    wait_idle(widget, qtbot)
    press(qtbot, widget.object_section.segment_button)
    errors = notes.since("error")
    assert any("no SAM3 model loaded" in m for m in errors), errors
    assert "model" in widget.status and not preview.data.any()

    # a model folder that does not exist
    notes.reset()
    widget.model_section.model_edit.setText(str(tmp_path / "missing" / "sam3"))
    press(qtbot, widget.model_section.load_button)
    qtbot.waitUntil(lambda: widget.model_section.load_worker is None, timeout=WAIT_MS)
    errors = notes.since("error")
    assert any("no such folder" in m for m in errors), errors
    assert widget.session.segmenter is None and widget.model_section.load_button.isEnabled()
    assert len(errors[0].splitlines()) == 1

    # a good model, then a failing load keeps it
    load_tiny(widget, qtbot, tiny_tracker_dir)
    good = widget.session.segmenter
    wait_idle(widget, qtbot)
    assert preview.data.any()  # the pending point is segmented once the model is there
    before = preview.data.copy()
    notes.reset()
    widget.model_section.model_edit.setText(str(tmp_path))  # exists, but no config.json
    widget.model_section.load_model(blocking=True)
    assert widget.session.segmenter is good
    assert any("config.json" in m for m in notes.since("error"))

    # a point outside the image
    notes.reset()
    points.add([[-20, 50]])
    wait_idle(widget, qtbot)
    errors = notes.since("error")
    assert any("outside the 72x120 image" in m for m in errors), errors
    np.testing.assert_array_equal(preview.data, before)
    assert not labels.data.any()

    # a stack: its own 3D prompt layers; Segment on a slice without prompts says so
    notes.reset()
    stack = viewer.add_image(np.zeros((3, 72, 120), np.float32), name="stack")
    widget.layers_section.image_combo.setCurrentIndex(widget.layers_section.image_combo.findText("stack"))
    assert unwrap(widget.binder.image_layer) is stack
    wait_idle(widget, qtbot)
    assert widget.binder.points_layer.ndim == 3 and widget.binder.labels_layer.data.shape == (3, 72, 120)
    press(qtbot, widget.object_section.segment_button)
    msgs = notes.since("error")
    assert any("no prompt on slice 0" in m for m in msgs), msgs
    assert not labels.data.any() and not widget.binder.labels_layer.data.any()


def test_rgb_image_and_a_user_points_layer_with_its_own_transform(
    make_napari_viewer, qtbot, tiny_tracker_dir, tiny_segmenter, asym_image
):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    try:
        load_tiny(widget, qtbot, tiny_tracker_dir)
        image = viewer.add_image(asym_image, name="rgb")
        assert image.rgb
        qtbot.waitUntil(lambda: widget.binder.preview_layer is not None, timeout=WAIT_MS)
        preview = unwrap(widget.binder.preview_layer)
        assert preview.data.shape == asym_image.shape[:2]

        mine = viewer.add_points(ndim=2, name="mine", translate=(10, 20))  # no features
        assert unwrap(widget.binder.points_layer).name == "SAM3 points"  # the choice is kept
        widget.layers_section.points_combo.setCurrentIndex(widget.layers_section.points_combo.findText("mine"))
        assert unwrap(widget.binder.points_layer) is mine
        assert set(mine.features.columns) >= {"object_id", "positive"}
        mine.add([[40 - 10, 70 - 20]])  # world (40, 70) = image pixel (40, 70)
        wait_idle(widget, qtbot)
        assert mine.features["object_id"].tolist() == [1]
        pp = PostProcessing()
        expected = tiny_segmenter.segment(
            asym_image,
            [ObjectPrompt(points=[(40, 70)])],
            max_hole_area=pp.max_hole_area,
            max_sprinkle_area=pp.max_sprinkle_area,
        )  # raw RGB
        assert expected.any()
        np.testing.assert_array_equal(preview.data, np.where(expected > 0, 1, 0))
    finally:
        qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def test_closing_the_dock_detaches_the_widget(make_napari_viewer, qtbot, gray_image):
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    add_image(viewer, widget, qtbot, gray_image)
    n_layers = len(viewer.layers)
    notes = Notes()
    dock.destroyOnClose()  # napari's X button on the dock
    qtbot.wait(50)
    viewer.add_image(gray_image, name="another")  # no new SAM3 layers for it
    viewer.layers["SAM3 points"].add([[10, 10]])  # no live job, no notification
    qtbot.wait(DEBOUNCE_WAIT_MS)
    assert len(viewer.layers) == n_layers + 1
    assert widget.runner.current_worker is None and not notes.since()
