"""The rebuilt dock widget as a user meets it (issue 9), in a real viewer under Xvfb.

- each image has its own managed layers; switching images re-selects them, adds none,
  and the object id continues after that image's labels;
- the Propagate section is off on a 2D image; Commit, then Propagate, follows the
  committed object through a z-stack; Commit with nothing pending says so;
- two image layers as the model's channels, each with its own contrast limits;
- the annotation loop's keys work on the canvas and are in the tooltips;
- at 1366x768 every section is reachable and the everyday loop stays in view;
- sections build and work without a viewer;
- the Plugins menu entry and the view after docking.
"""

from __future__ import annotations

import numpy as np
import pytest
from gui import Notes, canvas_click, dock, key, load, press, unwrap, wait_idle

from napari_sam3 import ObjectPrompt

LIMITS = (100.0, 900.0)
DEPTH = 4


def blobs(shape, centers, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, 200.0)
    for r, c, s in centers:
        img += 600 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / s)
    return (img + rng.normal(0, 25, shape)).astype(np.float32)


def choose_image(widget, qtbot, layer):
    """Pick ``layer`` in the Image combo as a user does; wait for its managed layers."""
    combo = widget.layers_section.image_combo
    index = combo.findText(layer.name)
    assert index >= 0, [combo.itemText(i) for i in range(combo.count())]
    combo.setCurrentIndex(index)
    qtbot.waitUntil(
        lambda: unwrap(widget.binder.image_layer) is layer
        and widget.binder.points_layer is not None
        and widget.binder.points_layer.ndim == layer.ndim
        and widget.binder.labels_layer is not None
        and tuple(widget.binder.labels_layer.data.shape) == layer.data.shape,
        timeout=30_000,
    )
    wait_idle(widget, qtbot)


def managed(widget):
    b = widget.binder
    return tuple(unwrap(ly) for ly in (b.points_layer, b.shapes_layer, b.labels_layer,
                                        b.preview_layer))


def camera(viewer):
    scene = getattr(viewer, "scene", None)  # napari < 0.9: viewer.camera
    return viewer.camera if scene is None else scene.camera


def post(widget):
    return {"max_hole_area": widget.post_section.max_hole_area.value(),
            "max_sprinkle_area": widget.post_section.max_sprinkle_area.value()}


def torch_safely():
    """The tiny checkpoints import torch: once a viewer has drawn (Mesa's LLVM mapped),
    that needs the preload *Load model* does (core.torch_import), or triton crashes."""
    from napari_sam3.core.torch_import import prepare_torch_import

    prepare_torch_import()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """One tiny video checkpoint for the file (clicks load its image tracker)."""
    from napari_sam3.testing import save_random_video_tracker

    torch_safely()
    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video_sections"), seed=0)


# -- 1, 2: managed layers per image; the Propagate section on 2D images and stacks -----------
def test_each_image_has_its_own_layers_and_the_id_follows_its_labels(make_napari_viewer, qtbot):
    from napari_sam3.widget.binder import TAG, image_key

    viewer, widget = dock(make_napari_viewer)
    a = viewer.add_image(blobs((40, 60), [(20, 20, 80)]), name="A", contrast_limits=LIMITS)
    choose_image(widget, qtbot, a)
    set_a = managed(widget)
    assert [ly.name for ly in set_a] == ["SAM3 points", "SAM3 boxes", "SAM3 labels",
                                         "SAM3 preview"]
    assert len(viewer.layers) == 5
    set_a[2].data[5:10, 5:10] = 2  # A's labels hold objects 1 and 2
    set_a[2].data[0, 0] = 1
    widget.session.object_id = 3
    assert widget.object_section.object_id_spin.value() == 3

    b = viewer.add_image(blobs((30, 50), [(15, 25, 60)], seed=1), name="B",
                         contrast_limits=LIMITS)
    wait_idle(widget, qtbot)
    assert unwrap(widget.binder.image_layer) is a and managed(widget) == set_a
    choose_image(widget, qtbot, b)
    set_b = managed(widget)
    assert [ly.name for ly in set_b] == ["SAM3 points (B)", "SAM3 boxes (B)",
                                         "SAM3 labels (B)", "SAM3 preview (B)"]
    assert all(ly.metadata[TAG]["image"] == image_key(b) for ly in set_b)
    assert all(ly.metadata[TAG]["image"] == image_key(a) for ly in set_a)
    assert set_b[2].data.shape == (30, 50) and not set_b[2].data.any()
    assert len(viewer.layers) == 10
    assert widget.session.object_id == 1  # B's labels are empty: A's id 3 is not carried
    assert widget.object_section.object_id_spin.value() == 1
    assert widget.layers_section.labels_combo.currentText() == "SAM3 labels (B)"
    assert widget.layers_section.points_combo.currentText() == "SAM3 points (B)"

    set_b[2].data[3:6, 3:6] = 4  # B's labels hold label 4
    choose_image(widget, qtbot, a)
    assert managed(widget) == set_a and len(viewer.layers) == 10
    assert widget.session.object_id == 3  # A's labels max (2) + 1
    assert widget.layers_section.labels_combo.currentText() == "SAM3 labels"
    choose_image(widget, qtbot, b)
    assert managed(widget) == set_b and len(viewer.layers) == 10
    assert widget.session.object_id == 5  # B's labels max (4) + 1
    assert [ly.name for ly in viewer.layers].count("SAM3 labels (B)") == 1


def test_propagate_section_is_off_on_a_2d_image_and_on_for_a_stack(make_napari_viewer, qtbot):
    viewer, widget = dock(make_napari_viewer)
    section = widget.propagate_section
    controls = (section.propagate_button, section.start_spin, section.stop_spin,
                section.start_here_button, section.stop_after_spin, section.direction_combo)
    flat = viewer.add_image(blobs((40, 60), [(20, 20, 80)]), name="flat")
    choose_image(widget, qtbot, flat)
    assert [c.isEnabled() for c in controls] == [False] * len(controls)
    assert "2D image" in section.axis_label.text()
    assert "0 to 0" not in section.axis_label.text()

    stack = viewer.add_image(np.stack([blobs((40, 60), [(20, 20 + z, 80)], z)
                                       for z in range(DEPTH)]), name="stack")
    choose_image(widget, qtbot, stack)
    assert [c.isEnabled() for c in controls] == [True] * len(controls)
    assert section.axis_label.text() == f"Along axis 0 of 'stack' ({DEPTH} slices)"
    assert (section.start_spin.value(), section.stop_spin.value()) == (0, DEPTH - 1)

    choose_image(widget, qtbot, flat)
    assert [c.isEnabled() for c in controls] == [False] * len(controls)
    assert "2D image" in section.axis_label.text()


# -- 3: Commit, then Propagate, on a z-stack ------------------------------------------------
def test_commit_then_propagate_follows_the_committed_object(make_napari_viewer, qtbot,
                                                            video_dir):
    viewer, widget = dock(make_napari_viewer)
    notes = Notes()
    seg = load(widget, qtbot, video_dir)
    zstack = np.stack([blobs((80, 112), [(35, 30 + 4 * z, 150), (55, 85, 120)], z)
                       for z in range(DEPTH)])
    image = viewer.add_image(zstack, name="cells", contrast_limits=LIMITS)
    choose_image(widget, qtbot, image)
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)

    viewer.dims.set_current_step(0, 2)
    z, _, _ = canvas_click(viewer, qtbot, points, 35, 38)
    assert z == 2
    wait_idle(widget, qtbot)
    assert widget.object_section.preview_mask is not None
    press(qtbot, widget.object_section.commit_button)
    committed = labels.data.copy()
    mask = committed[2] == 1
    assert mask.any() and not np.delete(committed, 2, axis=0).any()
    assert widget.session.object_id == 2 and labels.selected_label == 1
    assert len(points.data) == 0

    section = widget.propagate_section
    press(qtbot, section.propagate_button)
    wait_idle(widget, qtbot)
    want = seg.propagate(
        zstack, {2: {1: ObjectPrompt(mask=mask)}}, axis=0,
        direction=section.direction_combo.currentText(), limits=LIMITS,
        stop_after=section.stop_after_spin.value(), out=committed.copy(), **post(widget))
    np.testing.assert_array_equal(labels.data, want)
    assert len({k for k in range(DEPTH) if (labels.data[k] == 1).any()}) > 1
    assert not (labels.data == 2).any()
    assert "Propagated object 1 (label 1 from its mask" in widget.status, widget.status
    assert not notes.since("error"), notes.since("error")

    press(qtbot, widget.object_section.commit_button)  # nothing pending now
    assert "nothing to commit" in widget.status
    assert any("nothing to commit" in m for m in notes.since()), notes.since()
    np.testing.assert_array_equal(labels.data, want)


# -- 4: two layers as the model's channels ----------------------------------------------------
def test_two_layers_as_channels_with_their_own_limits(make_napari_viewer, qtbot,
                                                      video_dir):
    from napari_sam3.core.channels import composite_from

    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, video_dir)
    nuclei_px = blobs((72, 100), [(30, 30, 120), (50, 70, 90)], 0)
    membrane_px = (blobs((72, 100), [(30, 40, 300)], 1) * 3).astype(np.float32)
    nuclei = viewer.add_image(nuclei_px, name="nuclei", contrast_limits=LIMITS)
    membrane = viewer.add_image(membrane_px, name="membrane", contrast_limits=(500.0, 2500.0))
    choose_image(widget, qtbot, nuclei)
    combo = widget.layers_section.channel_combos[0]
    assert combo.itemText(0) == "(none)" and combo.findText("membrane") > 0
    combo.setCurrentIndex(combo.findText("membrane"))
    assert [unwrap(ly) for ly in widget.binder.channels] == [nuclei, membrane]
    assert "nuclei + membrane as channels 1-2" in widget.status
    points, preview = unwrap(widget.binder.points_layer), unwrap(widget.binder.preview_layer)

    def composite():
        return composite_from([nuclei_px, membrane_px],
                              [nuclei.contrast_limits, membrane.contrast_limits])

    before = seg.encoder_calls
    r1, c1 = canvas_click(viewer, qtbot, points, 30, 30)
    wait_idle(widget, qtbot)
    first = seg.encoder_calls
    assert first > before
    prompt = ObjectPrompt(points=[(r1, c1)])
    want = seg.segment(composite(), [prompt], **post(widget))
    assert seg.encoder_calls == first  # the widget encoded exactly this composite
    assert want.any()
    np.testing.assert_array_equal(preview.data, want)

    r2, c2 = canvas_click(viewer, qtbot, points, 32, 34)  # same limits: cached
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == first
    membrane.contrast_limits = (800.0, 1800.0)  # other limits: another cache key
    r3, c3 = canvas_click(viewer, qtbot, points, 50, 70)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == first + 1
    prompt = ObjectPrompt(points=[(r1, c1), (r2, c2), (r3, c3)], point_labels=[1, 1, 1])
    want = seg.segment(composite(), [prompt], **post(widget))
    assert seg.encoder_calls == first + 1
    np.testing.assert_array_equal(preview.data, want)

    combo.setCurrentIndex(0)  # (none): the image alone again
    assert widget.binder.channels is None
    # the preview follows: the same prompts segmented on the image alone
    wait_idle(widget, qtbot)
    alone = seg.segment(nuclei_px, [prompt], limits=tuple(nuclei.contrast_limits),
                        **post(widget))
    assert not np.array_equal(alone, want)  # the channels made a difference
    np.testing.assert_array_equal(preview.data, alone)


# -- 5: the annotation loop's keys -------------------------------------------------------------
def test_loop_keys_work_on_the_canvas_and_are_in_the_tooltips(make_napari_viewer, qtbot,
                                                              video_dir):
    from napari_sam3.widget.sections.object import SHORTCUTS

    viewer, widget = dock(make_napari_viewer)
    section = widget.object_section
    assert SHORTCUTS == {"segment": "Shift-S", "commit": "Shift-C", "new_object": "Shift-N",
                         "toggle_polarity": "Shift-T", "cancel": "Shift-X"}
    for control, shortcut in ((section.segment_button, "Shift-S"),
                              (section.commit_button, "Shift-C"),
                              (section.new_object_button, "Shift-N"),
                              (section.positive_checkbox, "Shift-T"),
                              (section.cancel_button, "Shift-X")):
        assert control.toolTip().endswith(f"[{shortcut}]"), control.toolTip()

    seg = load(widget, qtbot, video_dir)
    img = blobs((72, 100), [(30, 30, 120), (50, 70, 90)])
    image = viewer.add_image(img, name="cells", contrast_limits=LIMITS)
    choose_image(widget, qtbot, image)
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)
    preview = unwrap(widget.binder.preview_layer)
    section.live_checkbox.setChecked(False)  # only Shift-S segments
    r, c = canvas_click(viewer, qtbot, points, 30, 30)
    wait_idle(widget, qtbot)
    assert section.preview_mask is None and not preview.data.any()

    key(viewer, qtbot, points, "S", "Shift")
    wait_idle(widget, qtbot)
    want = seg.segment(img, [ObjectPrompt(points=[(r, c)])], limits=LIMITS, **post(widget))
    assert want.any()
    np.testing.assert_array_equal(preview.data, want)

    key(viewer, qtbot, points, "C", "Shift")
    np.testing.assert_array_equal(labels.data, want)
    assert widget.session.object_id == 2 and len(points.data) == 0

    key(viewer, qtbot, points, "T", "Shift")
    assert not section.positive_checkbox.isChecked()
    canvas_click(viewer, qtbot, points, 50, 70)
    assert points.features["positive"].tolist() == [False]
    assert points.features["object_id"].tolist() == [2]
    key(viewer, qtbot, points, "T", "Shift")
    assert section.positive_checkbox.isChecked()

    key(viewer, qtbot, points, "N", "Shift")  # labels hold 1, a prompt holds 2
    assert widget.session.object_id == 3 and section.object_id_spin.value() == 3

    key(viewer, qtbot, points, "X", "Shift")
    assert widget.status == "Nothing to cancel"
    np.testing.assert_array_equal(labels.data, want)  # none of the keys wrote anything else


# -- 6: a laptop screen -----------------------------------------------------------------------
def test_usable_at_1366x768(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtCore import QPoint, QRect

    viewer, widget = dock(make_napari_viewer)
    viewer.add_image(blobs((200, 300), [(100, 150, 900)]), name="cells")
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(1366, 768)
    for box in widget.collapsibles.values():  # the tallest widget: every section open
        box.expand(animate=False)
    qtbot.waitUntil(lambda: (window.width(), window.height()) == (1366, 768), timeout=5000)
    qtbot.wait(100)
    assert window.minimumSizeHint().height() <= 768, window.minimumSizeHint()
    assert window.height() == 768

    def global_rect(w):
        return QRect(w.mapToGlobal(QPoint(0, 0)), w.size())

    dock_widget = widget.parentWidget()
    while dock_widget is not None and not dock_widget.inherits("QDockWidget"):
        dock_widget = dock_widget.parentWidget()
    assert dock_widget is not None and dock_widget.isVisible()
    shown = global_rect(dock_widget) & global_rect(window)

    scroll = widget.scroll_area
    viewport = scroll.viewport()
    scroll_sections = [a for a in widget.collapsibles if a != "object_section"]
    assert scroll_sections == ["model_section", "layers_section", "session_section",
                               "cache_section",
                               "propagate_section", "instances_section", "post_section"]
    assert scroll.verticalScrollBar().maximum() > 0  # all open: it does need scrolling
    assert scroll.horizontalScrollBar().maximum() == 0, (  # nothing cut off on the right
        viewport.width(), scroll.widget().minimumSizeHint().width())
    for attr in scroll_sections:
        header = widget.collapsibles[attr].toggleButton()
        scroll.ensureWidgetVisible(header)
        qtbot.wait(10)
        at = QRect(header.mapTo(viewport, QPoint(0, 0)), header.size())
        assert viewport.rect().contains(at), (attr, at, viewport.rect())
        assert shown.contains(global_rect(viewport)), (attr, global_rect(viewport), shown)

    # the everyday loop is outside the scroll area: always in view
    for w in (widget.object_section.commit_button, widget.object_section.segment_button,
              widget.status_label):
        assert w.isVisible() and w.height() > 0
        assert shown.contains(global_rect(w)), (w, global_rect(w), shown)
        assert not scroll.isAncestorOf(w)

    shot = tmp_path / "widget-1366x768.png"
    arr = viewer.screenshot(str(shot), canvas_only=False, flash=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert arr.shape[:2] == (768, 1366), arr.shape
    assert arr[..., :3].std() > 10


# -- 7: sections without a viewer --------------------------------------------------------------
def test_sections_work_without_a_viewer(qtbot, video_dir):
    from napari_sam3.core.postprocess import DEFAULTS
    from napari_sam3.widget.runner import JobRunner
    from napari_sam3.widget.sections.model import ModelSection
    from napari_sam3.widget.sections.post import PostSection
    from napari_sam3.widget.session import PostSettings, Session

    session = Session(viewer=None)
    runner = JobRunner(session)
    model = ModelSection(session, runner)
    qtbot.addWidget(model)
    model.model_edit.setText(str(video_dir))
    model.device_combo.setCurrentText("cpu")
    with qtbot.waitSignal(session.model_changed, timeout=60_000) as blocker:
        assert model.load_model(blocking=True) is None
    assert session.segmenter is not None and blocker.args == [session.segmenter]
    assert session.segmenter.device == "cpu"

    post_section = PostSection(session)
    qtbot.addWidget(post_section)
    assert session.post == PostSettings(DEFAULTS.max_hole_area, DEFAULTS.max_sprinkle_area,
                                        False)
    with qtbot.waitSignal(session.settings_changed, timeout=1000):
        post_section.max_hole_area.setValue(DEFAULTS.max_hole_area + 7)
    with qtbot.waitSignal(session.settings_changed, timeout=1000):
        post_section.max_sprinkle_area.setValue(3)
    with qtbot.waitSignal(session.settings_changed, timeout=1000):
        post_section.overwrite_checkbox.setChecked(True)
    assert session.post == PostSettings(DEFAULTS.max_hole_area + 7, 3, True)
    with qtbot.assertNotEmitted(session.settings_changed):
        post_section.max_sprinkle_area.setValue(3)  # no change, no signal


# -- 8, 9: napari's menu entry; the view after docking ----------------------------------------
def test_plugins_menu_entry_names_the_widget_once(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)

    def actions(menu):
        for action in menu.actions():
            if action.menu() is not None:
                yield from actions(action.menu())
            elif action.text():
                yield action

    ours = [a for a in actions(viewer.window.plugins_menu) if "SAM3" in a.text()]
    assert len(ours) == 1, [a.text() for a in actions(viewer.window.plugins_menu)]
    text = ours[0].text().replace("&&", "&")
    assert text != "SAM3 segmentation (SAM3 segmentation)"
    assert text.startswith("SAM3 segmentation")
    if text.endswith(")"):  # "<widget> (<plugin>)": two different names
        widget_name, _, plugin_name = text[:-1].partition(" (")
        assert widget_name != plugin_name, text
    assert text == "SAM3 segmentation (napari-sam3)"
    ours[0].trigger()  # the menu entry docks our widget under that name
    from napari_sam3.widget.dock import Sam3Widget

    def docked():
        public = getattr(viewer.window, "dock_widgets", None)  # napari >= 0.6: inner widgets
        if public is not None:
            return public.get(text)
        wrapper = viewer.window._dock_widgets.get(text)
        return None if wrapper is None else wrapper.widget()

    qtbot.waitUntil(lambda: docked() is not None, timeout=5000)
    assert isinstance(docked(), Sam3Widget)


def test_docking_fits_the_image_into_the_smaller_canvas(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(1366, 768)
    qtbot.waitUntil(lambda: window.width() == 1366, timeout=5000)
    h, w = 100, 1000  # wide: docking narrows the canvas, so a stale zoom crops both sides
    viewer.add_image(blobs((h, w), [(50, 500, 400)]), name="wide")
    qtbot.wait(50)
    native = viewer.window._qt_viewer.canvas.native
    width_before = native.width()
    zoom_before = float(camera(viewer).zoom)
    viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    qtbot.waitUntil(lambda: native.width() < width_before, timeout=5000)
    qtbot.wait(200)
    zoom, center = float(camera(viewer).zoom), tuple(camera(viewer).center)
    assert zoom < zoom_before  # refitted, not left as before
    # the whole image is on the canvas: its extent (pixel edges) fits at this zoom
    assert w * zoom <= native.width() + 1 and h * zoom <= native.height() + 1
    assert center[-2:] == pytest.approx(((h - 1) / 2, (w - 1) / 2), abs=0.6)
    viewer.reset_view()  # what napari's own fit gives now
    assert float(camera(viewer).zoom) == pytest.approx(zoom, rel=1e-3)
    assert tuple(camera(viewer).center) == pytest.approx(center, abs=1e-3)


def test_choosing_a_labels_layer_continues_above_its_ids_and_bad_channels_are_one_line(
    make_napari_viewer, qtbot
):
    viewer, widget = dock(make_napari_viewer)
    image = viewer.add_image(np.zeros((40, 60), np.float32), name="cells")
    choose_image(widget, qtbot, image)
    assert widget.session.object_id == 1
    mine = np.zeros((40, 60), np.int32)
    mine[5:9, 5:9], mine[20:25, 30:40] = 7, 12
    nuclei = viewer.add_labels(mine, name="nuclei")
    combo = widget.layers_section.labels_combo
    combo.setCurrentIndex(combo.findText("nuclei"))
    assert unwrap(widget.binder.labels_layer) is nuclei
    assert widget.session.object_id == 13  # never an id the chosen layer already has

    notes = Notes()
    other = viewer.add_image(np.zeros((40, 61), np.float32), name="membrane")
    channel = widget.layers_section.channel_combos[0]
    channel.setCurrentIndex(channel.findText("membrane"))
    from napari_sam3.widget.layer_data import LayerError

    with pytest.raises(LayerError, match="channel 2 'membrane' has shape"):  # one line
        widget.binder.source()
    assert not notes.since("error")
    choose_image(widget, qtbot, other)  # another image: its channels start empty again
    assert widget.binder.channels is None and channel.currentIndex() == 0


def test_a_large_lazy_labels_layer_is_scanned_for_its_largest_id_before_ids_are_given(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    import zarr

    from napari_sam3.widget import scratch_labels

    monkeypatch.setattr(scratch_labels, "LARGE_PIXELS", 1000)  # 40 x 60 counts as large
    viewer, widget = dock(make_napari_viewer)
    image = viewer.add_image(np.zeros((40, 60), np.float32), name="cells")
    choose_image(widget, qtbot, image)
    wait_idle(widget, qtbot)
    # a Zarr label image from elsewhere (say, Cellpose), its largest id in the last chunk
    store = zarr.create_array(tmp_path / "cellpose.zarr", shape=(40, 60), chunks=(16, 16),
                              dtype=np.int32, fill_value=0)
    store[2:5, 2:5] = 3
    store[35:39, 50:58] = 41
    theirs = viewer.add_labels(store, name="cellpose")
    combo = widget.layers_section.labels_combo
    combo.setCurrentIndex(combo.findText("cellpose"))
    assert unwrap(widget.binder.labels_layer) is theirs
    wait_idle(widget, qtbot)  # the scan ran in a worker
    assert widget.binder.largest.known(theirs) == 41
    assert widget.session.object_id == 42  # above every id the layer holds
    assert "Largest id in 'cellpose': 41" in widget.status
