"""The widget's "Segment everything / concepts" section, driven like a user.

Real viewer under Xvfb (see docs/headless-napari.md), real buttons, tiny random
checkpoints: a Sam3Tracker (clicks, segment everything) and a Sam3Model (concepts).
Expected results come from the core API (``ConceptSegmenter.detect(...).paint``,
``segment_everything``) on the same image, limits and settings.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from gui import Notes, press, unwrap

from napari_sam3 import PromptError
from napari_sam3.core import planes
from napari_sam3.core.instances import Instance, paint_labels
from napari_sam3.widget import layer_data as _layers

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
LIMITS = (150.0, 900.0)
WAIT_MS = 30_000


# -- pure helpers (no GUI) -----------------------------------------------------------------
def test_exemplar_boxes_by_slice_polarity_clipping_and_ignored():
    rect = np.array([[40, 60], [10, 60], [10, 20], [40, 20]], float)  # corners in any order
    part_out = np.array([[-3, 100], [-3, 130], [20, 130], [20, 100]], float)
    ellipse = np.array([[0, 0], [0, 5], [5, 5], [5, 0]], float)
    by_slice, ignored = _layers.exemplar_boxes_by_slice(
        [rect, ellipse, part_out],
        ["rectangle", "ellipse", "rectangle"],
        {"positive": np.array([True, True, False])},
        (72, 120),
    )
    assert ignored == 1 and set(by_slice) == {()}
    boxes, labels = by_slice[()]
    np.testing.assert_array_equal(boxes, [[10, 20, 40, 60], [0, 100, 20, 119]])
    np.testing.assert_array_equal(labels, [1, 0])
    with pytest.raises(PromptError, match="outside"):
        _layers.exemplar_boxes_by_slice([rect + 200], ["rectangle"], None, (72, 120))
    # stacks: the leading coordinate says which slice a rectangle is on
    on2 = np.c_[np.full(4, 2.0), rect]
    on5 = np.c_[np.full(4, 5.0), rect + 1]
    by_slice, _ = _layers.exemplar_boxes_by_slice(
        [on2, on5], ["rectangle"] * 2, None, (72, 120), n_lead=1
    )
    assert set(by_slice) == {(2,), (5,)}
    picks = _layers.exemplars_for_slices(by_slice, [(k,) for k in range(8)])
    assert [p is by_slice[(2,)] for p in picks] == [True] * 4 + [False] * 4  # 3: tie -> lower
    assert all(p is by_slice[(5,)] for p in picks[4:])
    assert _layers.exemplars_for_slices({}, [(0,), (1,)]) == [None, None]
    assert _layers.exemplars_for_slices({(0, 1): 1}, [(0, 2), (3, 1)], axis=0) == [None, 1]


def test_offset_view_paints_like_the_full_plane():
    rng = np.random.default_rng(0)
    full = np.zeros((40, 50), np.int32)
    full[5:15, 5:15] = 3
    insts = []
    for k in range(6):
        mask = rng.random((12, 14)) > 0.3
        insts.append(Instance(mask, (10 + 3 * k, 8 + 2 * k), 1.0 - 0.1 * k))
    expected, _ = paint_labels(insts, out=full.copy(), start_id=4)
    region = planes.union_region([x.bbox for x in insts], full.shape)
    crop = full[planes.region_slices(region)].copy()
    view = planes.OffsetView(crop, region[:2], full.shape)
    paint_labels(insts, out=view, start_id=4)
    got = full.copy()
    got[planes.region_slices(region)] = crop
    np.testing.assert_array_equal(got, expected)
    assert planes.union_region([], (5, 5)) is None
    with pytest.raises(IndexError):
        view[0:5, 0:5]
    assert planes.digest(got) == planes.digest(got.copy()) != planes.digest(full)


# -- GUI helpers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    from napari_sam3.testing_concept import save_random_concept_model

    return save_random_concept_model(tmp_path_factory.mktemp("tiny_concept_widget"), seed=0)


@pytest.fixture(scope="module")
def reference(concept_dir):
    """An independent ConceptSegmenter on the same checkpoint (untiled, as the widget's)."""
    from napari_sam3.core.concept import ConceptSegmenter

    return ConceptSegmenter.from_pretrained(str(concept_dir), device="cpu", tile_size=1024)


def blobs(shape=(72, 120), seed=0, shift=0):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = (
        200
        + 600 * np.exp(-((rows - 30) ** 2 + (cols - 40 - shift) ** 2) / 200)
        + 500 * np.exp(-((rows - 45) ** 2 + (cols - 85) ** 2) / 150)
    )
    img = img + np.random.default_rng(seed).normal(0, 30, img.shape)
    return img.astype(np.float32)


@pytest.fixture
def gray_image():
    return blobs()



@pytest.fixture
def docked(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    yield viewer, widget
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)




def wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def click(qtbot, button):

    press(qtbot, button)


def load_tiny(widget, qtbot, tracker_dir, concept_dir=None):
    widget.model_section.model_edit.setText(str(tracker_dir))
    widget.model_section.device_combo.setCurrentText("cpu")
    widget.cache_section.cache_edit.setText("")  # memory only, untiled
    widget.cache_section.tile_spin.setValue(1024)
    click(qtbot, widget.model_section.load_button)
    qtbot.waitUntil(lambda: widget.model_section.load_worker is None, timeout=WAIT_MS)
    assert widget.session.segmenter is not None, widget.status
    if concept_dir is not None:
        widget.instances_section.concept_model_edit.setText(str(concept_dir))


def add_image(viewer, widget, qtbot, img, name="cells"):
    layer = viewer.add_image(img, name=name, contrast_limits=LIMITS)
    widget.layers_section.image_combo.setCurrentIndex(widget.layers_section.image_combo.findText(name))  # a second image
    qtbot.waitUntil(
        lambda: (
            widget.binder.labels_layer is not None and tuple(widget.binder.labels_layer.data.shape) == img.shape
        ),
        timeout=WAIT_MS,
    )
    assert unwrap(widget.binder.image_layer) is layer
    wait_idle(widget, qtbot)
    return layer


def post(widget):
    return {
        "max_hole_area": widget.post_section.max_hole_area.value(),
        "max_sprinkle_area": widget.post_section.max_sprinkle_area.value(),
    }


def set_threshold(widget, qtbot, value):
    """Move the slider (as a user drags it) and wait for the debounced re-filter."""
    widget.instances_section.threshold_slider.setValue(round(value * 1000))
    assert widget.instances_section.threshold == pytest.approx(value, abs=1e-9)
    wait_idle(widget, qtbot)


def thresholds(result):
    """Two thresholds (3 decimals, as the slider) keeping different numbers of instances."""
    scores = sorted(x.score for x in result.candidates)
    low = math.floor(scores[1] * 1000) / 1000
    high = math.floor(scores[-2] * 1000) / 1000
    assert len(result.instances(low)) > len(result.instances(high)) > 0
    return low, high


# -- GUI tests -------------------------------------------------------------------------------
def test_find_concept_threshold_features_overwrite_clear_undo_screenshot(
    docked, qtbot, tiny_tracker_dir, concept_dir, reference, gray_image
):
    viewer, widget = docked
    notes = Notes()
    assert widget.instances_section.threshold == 0.5 and widget.instances_section.threshold_slider.value() == 500
    assert widget.instances_section.concept_model_edit.text() == "" and widget.session.concept is None
    assert not widget.instances_section.scope_combo.isEnabled()  # no stack yet
    load_tiny(widget, qtbot, tiny_tracker_dir, concept_dir)
    add_image(viewer, widget, qtbot, gray_image)
    labels = unwrap(widget.binder.labels_layer)
    existing = np.zeros(gray_image.shape, np.int32)
    existing[5:20, 5:25] = 7
    labels.data_setitem(np.nonzero(existing), 7)

    opts = dict(limits=LIMITS, **post(widget))
    ref = reference.detect(gray_image, "nucleus", **opts)
    low, high = thresholds(ref)
    widget.instances_section.concept_text_edit.setText("nucleus")
    set_threshold(widget, qtbot, low)  # no result yet: only remembered
    click(qtbot, widget.instances_section.find_concept_button)
    assert widget.runner.task is not None and not widget.instances_section.find_concept_button.isEnabled()
    wait_idle(widget, qtbot)
    assert not notes.since("error"), notes.since("error")
    concept = widget.session.concept
    assert concept is not None and concept.encoder_calls == 1
    expected = ref.paint(threshold=low, out=existing.copy())
    np.testing.assert_array_equal(labels.data, expected)
    assert (labels.data[5:20, 5:25] == 7).all()  # existing labels kept
    new_ids = sorted(set(np.unique(labels.data)) - {0, 7})
    assert new_ids[0] == 8  # above the largest existing id

    feats = labels.features
    assert list(feats["index"]) == list(range(8, 8 + len(feats))) == new_ids
    assert (feats["score"] > low).all() and (np.diff(feats["score"]) <= 0).all()
    np.testing.assert_allclose(feats["score"], ref.features["score"])
    np.testing.assert_array_equal(feats["area"], [np.sum(labels.data == i) for i in new_ids])
    assert {"presence", "source"} <= set(feats.columns)
    assert set(feats["source"]) == {"concept 'nucleus'"}
    assert f"{len(new_ids)} instance(s)" in widget.status
    assert widget.session.object_id not in new_ids  # a click never joins a found instance

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "widget-concept.png"
    arr = viewer.screenshot(str(shot), canvas_only=False, flash=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and arr[..., :3].std() > 10

    # moving the threshold re-filters the kept candidates: no model call at all
    calls = (concept.encoder_calls, concept.decoder_calls, widget.session.segmenter.encoder_calls)
    after_low = labels.data.copy()
    set_threshold(widget, qtbot, high)
    assert (concept.encoder_calls, concept.decoder_calls) == calls[:2]
    assert widget.session.segmenter.encoder_calls == calls[2]
    np.testing.assert_array_equal(labels.data, ref.paint(threshold=high, out=existing.copy()))
    assert len(labels.features) == len(ref.features["index"]) < len(new_ids)
    assert (labels.features["score"] > high).all()

    # napari's undo reverts a threshold change in one step
    labels.undo()
    np.testing.assert_array_equal(labels.data, after_low)
    labels.redo()

    # overwrite: the same result may now take the existing object's pixels
    widget.post_section.overwrite_checkbox.setChecked(True)
    set_threshold(widget, qtbot, low)
    over = ref.paint(threshold=low, out=existing.copy(), overwrite=True)
    np.testing.assert_array_equal(labels.data, over)
    assert (labels.data == 7).sum() < (existing == 7).sum()
    assert (concept.encoder_calls, concept.decoder_calls) == calls[:2]

    # Clear last result restores the labels under it
    click(qtbot, widget.instances_section.clear_result_button)
    np.testing.assert_array_equal(labels.data, existing)
    assert len(labels.features) == 0 and widget.session.last_run is None
    widget.post_section.overwrite_checkbox.setChecked(False)

    # a second run reuses the cached image features; edits after it end re-thresholding
    click(qtbot, widget.instances_section.find_concept_button)
    wait_idle(widget, qtbot)
    assert concept.encoder_calls == calls[0]
    np.testing.assert_array_equal(labels.data, expected)
    labels.data_setitem((np.array([0]), np.array([0])), 99)  # the user paints
    edited = labels.data.copy()
    notes.reset()
    set_threshold(widget, qtbot, high)
    assert any("edited" in m for m in notes.since("warning")), notes.since()
    np.testing.assert_array_equal(labels.data, edited)
    assert widget.session.last_run is None and not notes.since("error")


def test_exemplar_layer_polarity_key_and_exemplar_only_concept(
    docked, qtbot, tiny_tracker_dir, concept_dir, reference, gray_image, monkeypatch
):
    from qtpy.QtCore import Qt

    viewer, widget = docked
    notes = Notes()
    load_tiny(widget, qtbot, tiny_tracker_dir, concept_dir)
    add_image(viewer, widget, qtbot, gray_image)
    assert widget.binder.exemplars_layer is None  # created on demand
    click(qtbot, widget.instances_section.draw_exemplars_button)
    ex = unwrap(widget.binder.exemplars_layer)
    assert ex is not None and ex.name == "SAM3 exemplars"
    assert unwrap(viewer.layers.selection.active) is ex and ex.mode == "add_rectangle"

    ex.add(np.array([[10, 20], [10, 60], [40, 60], [40, 20]], float), shape_type="rectangle")
    ex.selected_data = set()
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_T)
    assert not widget.instances_section.exemplar_positive and ex.mode == "add_rectangle"  # t is ours here
    ex.add(np.array([[40, 70], [40, 110], [60, 110], [60, 70]], float), shape_type="rectangle")
    assert ex.features["positive"].tolist() == [True, False]
    assert ex.edge_color[0, 1] > ex.edge_color[0, 0]  # green
    assert ex.edge_color[1, 0] > ex.edge_color[1, 1]  # red
    ex.selected_data = {1}
    qtbot.keyClick(canvas, Qt.Key.Key_T)  # flips the selected exemplar too
    assert widget.instances_section.exemplar_positive and ex.features["positive"].tolist() == [True, True]
    ex.selected_data = {1}
    qtbot.keyClick(canvas, Qt.Key.Key_T)
    assert ex.features["positive"].tolist() == [True, False]
    ex.add(np.array([[0, 0], [0, 5], [5, 5], [5, 0]], float), shape_type="ellipse")
    assert any("ignored" in m for m in notes.since("info"))

    labels = unwrap(widget.binder.labels_layer)
    widget.instances_section.threshold_spin.setValue(0.2)
    assert widget.instances_section.concept_text_edit.text() == ""
    assert widget.instances_section.find_concept()
    wait_idle(widget, qtbot)
    assert not notes.since("error"), notes.since("error")
    res = reference.detect(
        gray_image,
        None,
        [[10, 20, 40, 60], [40, 70, 60, 110]],
        exemplar_labels=[1, 0],
        threshold=0.2,
        limits=LIMITS,
        **post(widget),
    )
    expected = res.paint(threshold=0.2)
    assert expected.max() > 0
    np.testing.assert_array_equal(labels.data, expected)
    assert set(labels.features["source"]) == {"exemplars"}

    # a larger image in tiles of 112 px (the tiny model's input) overlapping by 28 px, whose
    # labels layer is a Zarr array (as for a large image)
    from napari_sam3.core.concept import ConceptSegmenter
    from napari_sam3.widget import scratch_labels

    monkeypatch.setattr(scratch_labels, "LARGE_PIXELS", 20_000)
    big = np.tile(gray_image, (3, 2))[:200, :230]
    add_image(viewer, widget, qtbot, big, name="big")
    widget.instances_section.exemplars_combo.setCurrentIndex(0)  # "(none)": text only
    widget.cache_section.tile_spin.setValue(112)
    widget.cache_section.overlap_spin.setValue(28)
    widget.instances_section.concept_text_edit.setText("nucleus")
    assert widget.instances_section.find_concept()
    wait_idle(widget, qtbot)
    assert widget.binder.exemplars_layer is None  # the choice stuck through new layers
    assert (widget.session.concept.tile_size, widget.session.concept.overlap) == (112, 28)
    tiled = ConceptSegmenter.from_pretrained(
        str(concept_dir), device="cpu", tile_size=112, overlap=28
    )
    res = tiled.detect(big, "nucleus", threshold=0.2, limits=LIMITS, **post(widget))
    n_tiles = len(res.grid)
    assert n_tiles == 9 and widget.session.concept.encoder_calls == 1 + n_tiles  # 3 x 3 tiles
    big_labels = unwrap(widget.binder.labels_layer)
    assert big_labels.data.shape == big.shape and not isinstance(big_labels.data, np.ndarray)
    # lazy labels are not scanned: the ids the widget wrote into this layer count, and
    # this image's new labels layer has none (the earlier ids went to the first image's)
    start = widget.session.last_run.start_id
    assert start == 1 and expected.max() > 1
    np.testing.assert_array_equal(big_labels.data[:], res.paint(threshold=0.2, start_id=start))
    set_threshold(widget, qtbot, 0.25)
    np.testing.assert_array_equal(big_labels.data[:], res.paint(threshold=0.25, start_id=start))
    big_labels.undo()
    np.testing.assert_array_equal(big_labels.data[:], res.paint(threshold=0.2, start_id=start))
    assert widget.session.concept.encoder_calls == 1 + n_tiles
    assert not notes.since("error"), notes.since("error")


def test_segment_everything_and_whole_stack_scope(
    docked, qtbot, tiny_tracker_dir, concept_dir, reference, gray_image, monkeypatch
):
    from napari_sam3.core.everything import SETTINGS, segment_everything

    viewer, widget = docked
    notes = Notes()
    assert widget.instances_section.points_per_side_spin.value() == SETTINGS.points_per_side
    assert widget.instances_section.pred_iou_spin.value() == pytest.approx(SETTINGS.pred_iou_thresh)
    assert widget.instances_section.stability_spin.value() == pytest.approx(SETTINGS.stability_score_thresh)
    assert widget.instances_section.min_area_spin.value() == SETTINGS.min_area
    load_tiny(widget, qtbot, tiny_tracker_dir, concept_dir)
    add_image(viewer, widget, qtbot, gray_image)
    seg = widget.session.segmenter
    labels = unwrap(widget.binder.labels_layer)
    # random weights: open the filters so that masks survive
    widget.instances_section.points_per_side_spin.setValue(4)
    widget.instances_section.pred_iou_spin.setValue(0.0)
    widget.instances_section.stability_spin.setValue(0.0)
    widget.instances_section.min_area_spin.setValue(0)
    settings = widget.instances_section.everything_settings()

    unwrap(widget.binder.points_layer).add([[30, 40]])  # a click encodes the image ...
    wait_idle(widget, qtbot)
    encoded = seg.encoder_calls
    click(qtbot, widget.instances_section.everything_button)
    wait_idle(widget, qtbot)
    assert seg.encoder_calls == encoded  # ... and segment everything reuses it
    expected = segment_everything(seg, gray_image, settings=settings, limits=LIMITS)
    assert expected.max() >= 1  # random weights: every grid point gives about one mask
    # ids start above the prompt ids too (the clicked object 1 may still be committed)
    np.testing.assert_array_equal(labels.data, np.where(expected > 0, expected + 1, 0))
    assert {"index", "score", "area", "iou_score", "stability_score"} <= set(labels.features)
    assert list(labels.features["index"]) == sorted(set(np.unique(labels.data)) - {0})
    unwrap(widget.binder.points_layer).data = np.zeros((0, 2))  # no prompts from here on
    assert "Segment everything" in widget.status

    # a z-stack: whole-stack scope runs slice by slice, ids unique across slices
    stack = np.stack([blobs(seed=s, shift=4 * s) for s in range(3)])
    add_image(viewer, widget, qtbot, stack, name="stack")
    labels = unwrap(widget.binder.labels_layer)
    assert labels.data.shape == stack.shape and widget.instances_section.scope_combo.isEnabled()
    widget.instances_section.scope_combo.setCurrentText("whole stack")
    click(qtbot, widget.instances_section.everything_button)
    wait_idle(widget, qtbot)
    everything = segment_everything(seg, stack, settings=settings, limits=LIMITS)
    np.testing.assert_array_equal(labels.data, everything)
    assert set(labels.features["slice"]) == {0, 1, 2}

    widget.instances_section.concept_text_edit.setText("nucleus")
    widget.instances_section.threshold_spin.setValue(0.2)
    assert widget.instances_section.find_concept()
    wait_idle(widget, qtbot)
    opts = dict(limits=LIMITS, **post(widget))
    expected = reference.segment_concept(stack, "nucleus", threshold=0.2, out=everything.copy(),
                                         **opts)  # fmt: skip
    np.testing.assert_array_equal(labels.data, expected)
    assert widget.session.concept.decoder_calls == 3  # one detection per slice
    feats = labels.features
    concept_rows = feats[feats["source"] == "concept 'nucleus'"]
    assert len(concept_rows) == len(set(np.unique(expected)) - set(np.unique(everything)))
    # the threshold re-filters every slice; ids stay unique across slices. A write larger than
    # UNDO_PIXELS goes region by region, without undo
    from napari_sam3.widget import results

    monkeypatch.setattr(results, "UNDO_PIXELS", 10)
    set_threshold(widget, qtbot, 0.25)
    assert "too large for undo" in widget.status
    again = reference.segment_concept(stack, "nucleus", threshold=0.25, out=everything.copy(),
                                      **opts)  # fmt: skip
    np.testing.assert_array_equal(labels.data, again)
    assert widget.session.concept.decoder_calls == 3

    # current-slice scope changes that slice only
    before = labels.data.copy()
    viewer.dims.set_current_step(0, 1)
    widget.instances_section.scope_combo.setCurrentText("current slice")
    click(qtbot, widget.instances_section.everything_button)
    wait_idle(widget, qtbot)
    np.testing.assert_array_equal(labels.data[[0, 2]], before[[0, 2]])
    one = segment_everything(seg, stack[1], settings=settings, limits=LIMITS, out=before[1].copy())
    np.testing.assert_array_equal(labels.data[1], one)
    assert not notes.since("error"), notes.since("error")


def test_cancel_leaves_labels_unchanged(
    docked, qtbot, tiny_tracker_dir, concept_dir, reference, gray_image, monkeypatch
):
    import napari_sam3.core.everything as everything

    viewer, widget = docked
    load_tiny(widget, qtbot, tiny_tracker_dir, concept_dir)
    add_image(viewer, widget, qtbot, gray_image)
    labels = unwrap(widget.binder.labels_layer)
    widget.instances_section.concept_text_edit.setText("nucleus")
    low, high = thresholds(reference.detect(gray_image, "nucleus", limits=LIMITS, **post(widget)))
    widget.instances_section.threshold_spin.setValue(low)
    assert widget.instances_section.find_concept()
    wait_idle(widget, qtbot)
    first = labels.data.copy()
    first_features = labels.features.copy()
    assert first.any()

    # concept: the detector is held inside its first model call, Cancel is pressed
    concept = widget.session.concept
    started, release = threading.Event(), threading.Event()
    real_forward = concept._forward

    def gated_forward(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real_forward(*args, **kwargs)  # the real model still runs

    monkeypatch.setattr(concept, "_forward", gated_forward)
    widget.instances_section.concept_text_edit.setText("cell")
    click(qtbot, widget.instances_section.find_concept_button)
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    click(qtbot, widget.instances_section.instances_cancel_button)
    release.set()
    wait_idle(widget, qtbot)
    assert "cancelled" in widget.status.lower()
    np.testing.assert_array_equal(labels.data, first)
    assert labels.features.equals(first_features)
    # the earlier result is still live: the threshold still re-filters it
    monkeypatch.setattr(concept, "_forward", real_forward)
    set_threshold(widget, qtbot, high)
    assert not np.array_equal(labels.data, first)
    after_threshold = labels.data.copy()

    # segment everything: held in its first decoder batch
    started.clear()
    release.clear()
    real_decode = everything.decode_tile

    def gated_decode(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(everything, "decode_tile", gated_decode)
    widget.instances_section.pred_iou_spin.setValue(0.0)
    widget.instances_section.stability_spin.setValue(0.0)
    click(qtbot, widget.instances_section.everything_button)
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    assert widget.progress_bar.maximum() == 0  # busy while encoding/decoding
    click(qtbot, widget.object_section.cancel_button)  # the Object section's Cancel works too
    release.set()
    wait_idle(widget, qtbot)
    assert "cancelled" in widget.status.lower()
    np.testing.assert_array_equal(labels.data, after_threshold)


def test_bad_inputs_notify_and_change_nothing(
    docked, qtbot, tiny_tracker_dir, concept_dir, gray_image, tmp_path
):
    viewer, widget = docked
    notes = Notes()
    add_image(viewer, widget, qtbot, gray_image)
    labels = unwrap(widget.binder.labels_layer)
    widget.instances_section.concept_text_edit.setText("nucleus")

    def errors_after(action):
        notes.reset()
        action()
        wait_idle(widget, qtbot)
        errs = notes.since("error")
        assert len(errs) == 1 and len(errs[0].splitlines()) == 1, errs
        assert not labels.data.any() and len(labels.features) == 0
        return errs[0]

    # no model
    assert "no SAM3 model loaded" in errors_after(lambda: click(qtbot, widget.instances_section.find_concept_button))
    assert "no SAM3 model loaded" in errors_after(lambda: click(qtbot, widget.instances_section.everything_button))

    # a tracker-only checkpoint as the concept model (the field left empty: same as above)
    load_tiny(widget, qtbot, tiny_tracker_dir)
    msg = errors_after(lambda: click(qtbot, widget.instances_section.find_concept_button))
    assert "sam3_tracker" in msg and "concept" in msg, msg
    assert widget.session.concept is None and widget.instances_section.find_concept_button.isEnabled()
    widget.instances_section.concept_model_edit.setText(str(tmp_path / "missing"))
    assert "no such folder" in errors_after(widget.instances_section.find_concept)

    # no text and no exemplars
    widget.instances_section.concept_model_edit.setText(str(concept_dir))
    widget.instances_section.concept_text_edit.setText("   ")
    assert "type a concept" in errors_after(widget.instances_section.find_concept)

    # an exemplar outside the image
    ex = unwrap(widget.instances_section.draw_exemplars())
    ex.add(np.array([[200, 300], [200, 320], [220, 320], [220, 300]], float))
    assert "outside" in errors_after(widget.instances_section.find_concept)
    assert widget.session.concept is None  # nothing was loaded for a request that could not start

    # the threshold without a result: remembered, no error
    notes.reset()
    widget.instances_section.threshold_slider.setValue(300)
    wait_idle(widget, qtbot)
    assert widget.instances_section.threshold == pytest.approx(0.3) and "next Find concept" in widget.status
    assert not notes.since("error") and not labels.data.any()
