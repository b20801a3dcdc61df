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
