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
