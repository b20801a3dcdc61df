"""Live clicks that feel instant: the first change of a burst is segmented at once, later
changes within the debounce window are coalesced into one request (issue 10)."""

from __future__ import annotations

import numpy as np
import pytest
from gui import dock, load, unwrap, wait_idle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_first_change_starts_at_once_and_a_burst_is_coalesced(
    make_napari_viewer, qtbot, tiny_tracker_dir, monkeypatch
):
    from napari_sam3.widget import clicks

    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, tiny_tracker_dir)
    assert seg.reuse_encoded  # the widget routes clicks to encoded tiles (the API does not)
    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((64, 96)).astype(np.float32), name="cells")
    qtbot.waitUntil(lambda: widget.binder.points_layer is not None, timeout=5000)
    wait_idle(widget, qtbot)
    points = unwrap(widget.binder.points_layer)
    requests = []
    real_click = widget.runner.click
    monkeypatch.setattr(widget.runner, "click",
                        lambda req, done: (requests.append(len(req.prompt.points)),
                                           real_click(req, done)))

    points.add([[20.0, 30.0]])  # the first change: a request at once, no debounce wait
    assert requests == [1] and widget.runner.current_worker is not None
    points.add([[22.0, 34.0]])  # within the window: coalesced ...
    points.add([[25.0, 40.0]])
    assert requests == [1] and widget.object_section.clicks.busy
    wait_idle(widget, qtbot)
    assert requests == [1, 3]  # ... into one request with the latest prompts
    assert widget.object_section.preview_mask is not None

    qtbot.wait(clicks.DEBOUNCE_MS + 100)  # a quiet pause ends the burst
    points.add([[40.0, 60.0]])
    assert requests == [1, 3, 4]
    wait_idle(widget, qtbot)
    assert requests == [1, 3, 4]  # nothing left to coalesce: no extra request


def test_encoded_tiles_are_outlined_and_clicks_reuse_them(
    make_napari_viewer, qtbot, tiny_tracker_dir
):
    from gui import canvas_click

    from napari_sam3.widget.encoded_overlay import ENCODED_NAME

    viewer, widget = dock(make_napari_viewer)
    widget.cache_section.tile_spin.setValue(112)  # the tiny model's input: 3 x 3 tiles
    widget.cache_section.overlap_spin.setValue(28)
    seg = load(widget, qtbot, tiny_tracker_dir)
    rng = np.random.default_rng(1)
    image = viewer.add_image((rng.random((200, 260)) * 1000).astype(np.uint16), name="tiled")
    qtbot.waitUntil(lambda: widget.binder.points_layer is not None, timeout=5000)
    wait_idle(widget, qtbot)
    points = unwrap(widget.binder.points_layer)
    assert ENCODED_NAME not in viewer.layers  # nothing encoded yet: no outline

    canvas_click(viewer, qtbot, points, 40, 40)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == 1
    overlay = viewer.layers[ENCODED_NAME]
    limits = tuple(float(v) for v in image.contrast_limits)
    boxes = seg.encoded_tiles(image.data, limits)
    assert len(boxes) == 1 and len(overlay.data) == 1
    (r0, c0, r1, c1), = boxes
    np.testing.assert_allclose(np.sort(overlay.data[0], axis=0)[[0, -1]], [[r0, c0], [r1, c1]])
    assert viewer.layers.selection.active is points  # the user's layer stays active
    assert overlay not in widget.binder.candidates("shapes")

    # a second object inside the encoded tile (but nearer another tile's centre) reuses it
    widget.object_section.new_object()
    canvas_click(viewer, qtbot, points, 40, 103)  # tile 0..112: margin 9; tile 84..196: 19
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == 1 and widget.object_section.preview_mask.any()
    assert len(overlay.data) == 1

    # an outline the user deletes stays deleted, though more tiles get encoded
    viewer.layers.remove(overlay)
    widget.object_section.new_object()
    canvas_click(viewer, qtbot, points, 160, 220)  # a tile not encoded yet
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == 2 and ENCODED_NAME not in viewer.layers


def test_the_raw_mask_shows_first_and_the_cleaned_one_is_committed(
    make_napari_viewer, qtbot, tiny_tracker_dir, asym_image
):
    """With a clean-up set, a click shows the decoder's raw mask as soon as it is decoded,
    then the cleaned mask replaces it in the same job; a commit writes the cleaned one,
    also when it is pressed while the raw mask is shown (issue 13: the clean-up is off
    the click's latency)."""
    from gui import canvas_click

    from napari_sam3.core.postprocess import clean_mask

    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, tiny_tracker_dir)
    widget.post_section.max_hole_area.setValue(40)
    widget.post_section.max_sprinkle_area.setValue(15)
    viewer.add_image(asym_image, name="rgb", rgb=True)
    qtbot.waitUntil(lambda: widget.binder.points_layer is not None, timeout=5000)
    wait_idle(widget, qtbot)
    clicks = widget.object_section.clicks
    shown, committed, armed = [], [], []
    real_show = clicks.show

    def show(st):
        shown.append((st, st.labels.copy(), widget.runner.click_step))
        real_show(st)
        if armed and widget.runner.click_step == "cleaning":
            armed.clear()  # a commit pressed while the raw mask is being cleaned
            committed.append(widget.object_section.commit())

    clicks.show = show
    points = unwrap(widget.binder.points_layer)
    canvas_click(viewer, qtbot, points, 20, 95)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == 1 and len(shown) == 2
    (st, first, step), (st2, last, _) = shown
    obj_id = st.obj_id
    raw = st.result.logits > 0
    cleaned = clean_mask(raw, 40, 15)
    assert not np.array_equal(raw, cleaned)
    assert step == "cleaning"  # shown while the job went on cleaning it
    np.testing.assert_array_equal(first, np.where(raw, obj_id, 0))
    np.testing.assert_array_equal(last, np.where(cleaned, obj_id, 0))
    preview = unwrap(widget.binder.preview_layer)
    np.testing.assert_array_equal(np.asarray(preview.data).reshape(cleaned.shape) == obj_id,
                                  cleaned)
    # a second click, committed while its raw mask is shown: the cleaned mask is written
    shown.clear()
    armed.append(True)
    canvas_click(viewer, qtbot, points, 20, 95)
    wait_idle(widget, qtbot)
    # (the job's own cleaned result then belongs to a finished object: not shown)
    assert len(shown) == 1 and shown[0][2] == "cleaning" and committed == [True]
    assert clicks.preview is None
    st = shown[0][0]  # (two points now: another mask)
    raw = st.result.logits > 0
    np.testing.assert_array_equal(shown[0][1], np.where(raw, obj_id, 0))
    cleaned = clean_mask(raw, 40, 15)
    assert not np.array_equal(raw, cleaned)
    labels = np.asarray(unwrap(widget.binder.labels_layer).data)
    expected = np.zeros(labels.shape, bool)
    expected[st.region] = cleaned
    np.testing.assert_array_equal(labels == obj_id, expected)
    assert widget.session.object_id == obj_id + 1 and len(points.data) == 0
