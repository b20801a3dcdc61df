"""Provenance of what the widget writes (real viewer under Xvfb, tiny models).

- a commit records the prompts given (points with polarity in (row, col), a box), its
  tile and its id; a brush stroke and napari's undo are stored as their resulting values;
- Delete label / Merge into selected give exact ids, are undoable and are replayed;
- widget labels saved with our zarr writer replay to byte-identical labels (core replay
  and ``napari-sam3 replay``), a propagation and an everything run included;
- saved into an OME-Zarr image's ``labels/NAME``: an NGFF label image with the record,
  the image's arrays byte-identical.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import zarr
from gui import canvas_click, dock, key, load, press, unwrap, wait_idle

from napari_sam3._writers import PROVENANCE_KEY, save_labels_layer
from napari_sam3.core.provenance import Provenance

LIMITS = (100.0, 900.0)


def blobs(shape=(72, 120)):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = (200 + 600 * np.exp(-((rows - 30) ** 2 + (cols - 40) ** 2) / 200)
           + 500 * np.exp(-((rows - 45) ** 2 + (cols - 85) ** 2) / 150))
    return (img + np.random.default_rng(0).normal(0, 30, img.shape)).astype(np.float32)


def load_untiled(widget, qtbot, folder):
    widget.cache_section.tile_spin.setValue(1024)
    return load(widget, qtbot, folder)


def add(viewer, widget, qtbot, data, **kwargs):
    layer = viewer.add_image(data, name="cells", contrast_limits=LIMITS, **kwargs)
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is layer
                    and widget.binder.points_layer is not None
                    and widget.binder.points_layer.ndim == layer.ndim
                    and widget.binder.labels_layer is not None, timeout=30_000)
    wait_idle(widget, qtbot)
    return layer


def record_of(layer) -> Provenance:
    rec = unwrap(layer).metadata[PROVENANCE_KEY]
    return rec if isinstance(rec, Provenance) else Provenance.from_dict(rec)


def saved_record(path) -> Provenance:
    return Provenance.from_dict(dict(zarr.open_group(path, mode="r").attrs)["napari_sam3"]
                                ["provenance"])


def replayed(rec: Provenance, image, segmenter):
    from napari_sam3.core.replay import replay

    return replay(rec, image, segmenter)


def test_commit_brush_delete_merge_undo_recorded_and_replayed_identically(
    make_napari_viewer, qtbot, tiny_tracker_dir, tmp_path
):
    viewer, widget = dock(make_napari_viewer)
    seg = load_untiled(widget, qtbot, tiny_tracker_dir)
    img = blobs()
    add(viewer, widget, qtbot, img)
    points, shapes = unwrap(widget.binder.points_layer), unwrap(widget.binder.shapes_layer)
    labels = unwrap(widget.binder.labels_layer)

    # object 1: a positive and a negative point and a box
    r1, c1 = canvas_click(viewer, qtbot, points, 30, 40)
    points.selected_data = set()  # (toggling flips the selected points too)
    widget.object_section.toggle_polarity()
    r2, c2 = canvas_click(viewer, qtbot, points, 30, 60)
    shapes.add(np.array([[15, 20], [15, 70], [50, 70], [50, 20]], float),
               shape_type="rectangle")
    wait_idle(widget, qtbot)
    obj = widget.object_section.clicks.preview.result
    press(qtbot, widget.object_section.commit_button)
    assert (labels.data == 1).any()
    op = record_of(labels).operations[-1]
    assert op["kind"] == "prompts" and op["slice"] is None and op["commit"] == {
        "overwrite": False}
    (o,) = op["objects"]
    assert o["id"] == 1 and o["labels"] == [1, 0] and o["box"] == [15.0, 20.0, 50.0, 70.0]
    np.testing.assert_allclose(o["points"], [[r1, c1], [r2, c2]])
    assert o["tile"] == (None if obj.tile is None else list(obj.tile))
    assert o["iou_score"] == pytest.approx(float(obj.iou_score))
    assert op["limits"] == list(LIMITS)

    # object 2: one point
    points.selected_data = set()
    widget.object_section.toggle_polarity()
    canvas_click(viewer, qtbot, points, 45, 85)
    wait_idle(widget, qtbot)
    press(qtbot, widget.object_section.commit_button)
    assert (labels.data == 2).any()
    seen = []
    widget.session.labels_recorded.connect(lambda layer, region: seen.append(region))

    # a brush stroke (napari's paint, as its mouse callback calls it)
    labels.brush_size = 5
    labels.paint((5, 105), 7)
    assert (labels.data == 7).any()
    op = record_of(labels).operations[-1]
    assert op["kind"] == "brush" and 7 in op["ids"] and op["note"].startswith("napari")
    r0, c0, rr, cc = op["region"]["bbox"]
    from napari_sam3.core.provenance import decode_values

    np.testing.assert_array_equal(decode_values(op["values"], op["region"]["shape"]),
                                  labels.data[r0:rr, c0:cc])
    assert seen[-1] == (slice(r0, rr), slice(c0, cc))

    # delete label 2: exact ids, undoable (the undo is recorded), deleted again
    before = labels.data.copy()
    labels.selected_label = 2
    assert widget.object_section.delete_label()
    assert not (labels.data == 2).any()
    np.testing.assert_array_equal(labels.data, np.where(before == 2, 0, before))
    assert record_of(labels).operations[-1] == {"kind": "delete", "slice": None, "ids": [2]}
    key(viewer, qtbot, labels, "Z", "Control")
    np.testing.assert_array_equal(labels.data, before)
    assert record_of(labels).operations[-1]["note"] == "napari undo"
    assert widget.object_section.delete_label()

    # merge 7 into 1
    labels.selected_label = 1
    widget.object_section.merge_id_spin.setValue(7)
    press(qtbot, widget.object_section.merge_button)
    assert not (labels.data == 7).any() and (labels.data == 1).sum() > (before == 1).sum()
    assert record_of(labels).operations[-1] == {"kind": "merge", "slice": None, "ids": [7],
                                                "into": 1}
    assert sorted(np.unique(labels.data).tolist()) == [0, 1]

    # saved with our zarr writer, replayed: byte-identical
    out = tmp_path / "labels.zarr"
    save_labels_layer(labels, str(out))
    rec = saved_record(out)
    assert [op["kind"] for op in rec.operations] == [
        "prompts", "prompts", "brush", "delete", "brush", "delete", "merge"]
    assert rec.image["fingerprint"]["kind"] == "full" and rec.image["shape"] == [72, 120]
    assert rec.mismatches(seg, img) == []
    again = replayed(rec, img, seg)
    assert again.dtype == labels.data.dtype
    assert again.tobytes() == np.asarray(labels.data).tobytes()

    # napari-sam3 replay on the saved labels and the image file
    import tifffile

    from napari_sam3.cli import main

    tifffile.imwrite(tmp_path / "cells.tif", img)
    assert main(["replay", str(out), "--image", str(tmp_path / "cells.tif"),
                 "--out", str(tmp_path / "again.zarr")]) == 0
    from napari_sam3.core.io import read_labels

    assert np.asarray(read_labels(str(tmp_path / "again.zarr"))).tobytes() == \
        np.asarray(labels.data).tobytes()


def test_propagation_and_everything_recorded_once_and_replayed(
    make_napari_viewer, qtbot, tmp_path_factory
):
    from napari_sam3.testing import save_random_video_tracker

    folder = save_random_video_tracker(tmp_path_factory.mktemp("tiny_video_prov"), seed=0)
    viewer, widget = dock(make_napari_viewer)
    seg = load_untiled(widget, qtbot, folder)
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:64, 0:80]
    zstack = np.stack([200 + 600 * np.exp(-((rows - 30) ** 2 + (cols - 25 - z) ** 2) / 150)
                       + rng.normal(0, 25, rows.shape) for z in range(8)]).astype(np.float32)
    add(viewer, widget, qtbot, zstack)
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)

    viewer.dims.set_current_step(0, 3)
    canvas_click(viewer, qtbot, points, 30, 28)
    wait_idle(widget, qtbot)
    sec = widget.propagate_section
    sec.direction_combo.setCurrentText("forward")
    sec.start_spin.setValue(2)
    sec.stop_spin.setValue(6)
    seen = []
    widget.session.labels_recorded.connect(lambda layer, region: seen.append(region))
    press(qtbot, sec.propagate_button)
    wait_idle(widget, qtbot)
    assert labels.data[3:7].any() and not labels.data[:2].any()
    op = record_of(labels).operations[-1]
    assert (op["kind"], op["direction"], op["start"], op["stop"]) == (
        "propagation", "forward", 2, 7)
    assert [o["slice"] for o in op["objects"]] == [3] and op["objects"][0]["id"] == 1
    assert [s["slice"] for s in op["slices"]] == list(range(3, 7))
    # each slice announced (autosaved) as it is written, with its region; the op at the end
    r0, c0, r1, c1 = op["objects"][0]["tile"]
    assert seen == [(k, slice(r0, r1), slice(c0, c1)) for k in range(3, 7)] + [None]

    # napari edits held while a task writes are logged after its op, as their final values
    from napari_sam3.core.provenance import decode_values
    from napari_sam3.widget import provenance_log

    recorder = provenance_log.recorder(widget.session, widget.binder)
    n_ops = len(record_of(labels).operations)
    recorder.hold(labels)
    labels.brush_size = 3
    viewer.dims.set_current_step(0, 0)  # slice 0: nothing propagated there
    labels.paint((0, 5, 75), 1)
    viewer.dims.set_current_step(0, 3)
    assert (labels.data[0, 3:8, 73:78] == 1).any()
    assert len(record_of(labels).operations) == n_ops
    recorder.release(labels)
    ops = record_of(labels).operations
    assert len(ops) == n_ops + 1 and ops[-1]["kind"] == "brush" and ops[-1]["slice"] == 0
    b0, d0, b1, d1 = ops[-1]["region"]["bbox"]
    np.testing.assert_array_equal(decode_values(ops[-1]["values"], ops[-1]["region"]["shape"]),
                                  labels.data[0, b0:b1, d0:d1])

    # everything on the current slice, then a new threshold of nothing: one operation
    n_ops = len(record_of(labels).operations)
    widget.instances_section.points_per_side_spin.setValue(4)
    widget.instances_section.pred_iou_spin.setValue(0.0)
    widget.instances_section.stability_spin.setValue(0.0)
    assert widget.instances_section.segment_everything("current slice")
    wait_idle(widget, qtbot)
    ops = record_of(labels).operations
    assert len(ops) == n_ops + 1 and ops[-1]["kind"] == "everything"
    assert ops[-1]["slices"] == [3] and ops[-1]["start_id"] == 2

    out = tmp_path_factory.mktemp("prov_stack") / "labels.zarr"
    save_labels_layer(labels, str(out))
    again = replayed(saved_record(out), zstack, seg)
    assert again.tobytes() == np.asarray(labels.data).tobytes()

    # a duplicated layer (napari copies the metadata shallowly) gets its own log
    from napari.layers import Labels

    dup = Labels(np.array(labels.data), metadata=dict(labels.metadata))
    assert dup.metadata[PROVENANCE_KEY] is record_of(labels)
    own = recorder.log(dup)
    assert own is not record_of(labels) and own.operations == record_of(labels).operations
    assert recorder.log(dup) is own and recorder.log(labels) is record_of(labels)
    own.append({"kind": "delete", "slice": None, "ids": [1]})
    assert len(own.operations) == len(record_of(labels).operations) + 1


def test_closing_the_session_frees_it_from_its_recorder(qtbot):
    import gc
    import weakref

    from qtpy.QtCore import QObject, Signal

    from napari_sam3.widget import provenance_log
    from napari_sam3.widget.session import Session

    class Binder(QObject):
        role_changed = Signal(str)
        labels_layer = None

    binder, session = Binder(), Session()
    rec = provenance_log.recorder(session, binder)
    assert provenance_log.recorder(session, binder) is rec
    session.close()
    assert provenance_log.recorder(session, binder) is not rec  # no longer held
    gone, gone_rec = weakref.ref(session), weakref.ref(rec)
    del session, rec
    gc.collect()
    assert gone() is None and gone_rec() is None
    binder.role_changed.emit("labels")  # nothing left listening


def test_concept_run_recorded_once_after_threshold_changes(
    make_napari_viewer, qtbot, tiny_tracker_dir, tmp_path_factory
):
    from napari_sam3.testing_concept import save_random_concept_model

    concept_dir = save_random_concept_model(tmp_path_factory.mktemp("tiny_concept_prov"),
                                            seed=0)
    viewer, widget = dock(make_napari_viewer)
    seg = load_untiled(widget, qtbot, tiny_tracker_dir)
    img = blobs()
    add(viewer, widget, qtbot, img)
    labels = unwrap(widget.binder.labels_layer)
    sec = widget.instances_section
    sec.concept_model_edit.setText(str(concept_dir))
    sec.concept_text_edit.setText("cell")
    sec.threshold_spin.setValue(0.0)
    assert sec.find_concept()
    wait_idle(widget, qtbot)
    for value in (0.3, 0.1, 0.2):
        sec.threshold_slider.setValue(round(value * 1000))
        wait_idle(widget, qtbot)
    ops = record_of(labels).operations
    assert [op["kind"] for op in ops] == ["concept"]
    assert ops[0]["threshold"] == pytest.approx(0.2) and ops[0]["text"] == "cell"
    assert ops[0]["min_score"] == pytest.approx(0.0)
    assert len(ops[0]["instances"]) == len(np.setdiff1d(np.unique(labels.data), [0]))
    out = tmp_path_factory.mktemp("prov_concept") / "labels.zarr"
    save_labels_layer(labels, str(out))
    from napari_sam3.core.concept import ConceptSegmenter

    concept = ConceptSegmenter.from_pretrained(str(concept_dir), device="cpu", tile_size=1024)
    from napari_sam3.core.replay import replay

    again = replay(saved_record(out), img, seg, concept=concept)
    assert again.tobytes() == np.asarray(labels.data).tobytes()


def _files(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()
            and "labels" not in p.relative_to(root).parts}


def test_save_into_an_ome_zarr_image_writes_its_ngff_labels(
    make_napari_viewer, qtbot, tiny_tracker_dir, tmp_path
):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    from napari_sam3._writers import LabelsWriteError
    from napari_sam3.core.ngff import image_info, is_ours, read_provenance

    img = (blobs((64, 96)) * 20).astype(np.uint16)
    path = tmp_path / "img.zarr"
    write_image(img, zarr.open_group(path, mode="w", zarr_format=2), scale_factors=(2,),
                axes="yx", fmt=FormatV04())
    before = _files(path)
    viewer, widget = dock(make_napari_viewer)
    load_untiled(widget, qtbot, tiny_tracker_dir)
    levels = [d["path"] for d in image_info(path)["datasets"]]
    layer = viewer.add_image(zarr.open_group(path, mode="r")[levels[0]], name="cells",
                             contrast_limits=(4000.0, 18000.0))
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is layer
                    and widget.binder.labels_layer is not None, timeout=30_000)
    wait_idle(widget, qtbot)
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)
    canvas_click(viewer, qtbot, points, 30, 40)
    wait_idle(widget, qtbot)
    press(qtbot, widget.object_section.commit_button)
    assert (labels.data == 1).any()

    written = save_labels_layer(labels, str(path / "labels" / "sam3"))
    assert written == [str(path / "labels" / "sam3")]
    assert is_ours(written[0])
    rec = Provenance.from_dict(read_provenance(written[0]))
    assert [op["kind"] for op in rec.operations] == ["prompts"]
    attrs = dict(zarr.open_group(written[0], mode="r").attrs)
    colours = {c["label-value"] for c in attrs["image-label"]["colors"]}
    assert colours == {1}
    info = image_info(written[0])
    assert info["shapes"] == [(64, 96), (32, 48)] and info["version"] == "0.4"
    level0 = zarr.open_group(written[0], mode="r")[info["datasets"][0]["path"]]
    assert level0[:].tobytes() == np.asarray(labels.data, np.int32).tobytes()
    assert _files(path) == before  # the image's own arrays and metadata untouched

    # a label image that is not ours is refused in one line
    zarr.open_group(path / "labels" / "other", mode="w", zarr_format=2)
    with pytest.raises(LabelsWriteError, match="not a label image napari-sam3 wrote"):
        save_labels_layer(labels, str(path / "labels" / "other"))


def test_delete_merge_and_refine_on_lazy_labels_find_the_label_in_a_worker(
    make_napari_viewer, qtbot, tiny_tracker_dir, monkeypatch
):
    """On a Zarr (lazy) labels layer, *Delete label*, *Merge into selected* and *Refine
    selected label* look for the label block by block in a worker (napari never reads the
    whole slice on its GUI thread), then edit only the label's box: the same exact ids,
    recorded as on a NumPy layer."""
    import threading

    from gui import Notes

    from napari_sam3.core import planes
    from napari_sam3.widget import scratch_labels

    monkeypatch.setattr(scratch_labels, "LARGE_PIXELS", 1000)  # the widget's labels: Zarr
    on_main = []
    real = planes.iter_label_box

    def spy(plane, label):
        on_main.append(threading.current_thread() is threading.main_thread())
        return (yield from real(plane, label))

    monkeypatch.setattr(planes, "iter_label_box", spy)
    viewer, widget = dock(make_napari_viewer)
    load_untiled(widget, qtbot, tiny_tracker_dir)
    img = blobs()
    add(viewer, widget, qtbot, img)
    labels = unwrap(widget.binder.labels_layer)
    assert isinstance(labels.data, zarr.Array)
    data = np.zeros(img.shape, np.int32)
    data[5:20, 10:30] = 4
    data[40:60, 70:100] = 6
    data[30, 5] = 6
    data[50:70, 10:40] = 8
    labels.data[...] = data
    labels.refresh()
    section, notes = widget.object_section, Notes()

    labels.selected_label = 6
    assert section.delete_label()  # started: the search runs in a worker
    wait_idle(widget, qtbot)
    now = np.asarray(labels.data[...])
    np.testing.assert_array_equal(now, np.where(data == 6, 0, data))
    assert record_of(labels).operations[-1] == {"kind": "delete", "slice": None, "ids": [6]}

    labels.selected_label = 8
    assert section.merge_into_selected(4)
    wait_idle(widget, qtbot)
    data = np.where(data == 6, 0, np.where(data == 4, 8, data))
    np.testing.assert_array_equal(np.asarray(labels.data[...]), data)
    assert record_of(labels).operations[-1]["into"] == 8

    labels.selected_label = 21  # no such label: one line, nothing changed
    assert section.delete_label()
    wait_idle(widget, qtbot)
    assert any("label 21 has no pixels" in m for m in notes.since())
    np.testing.assert_array_equal(np.asarray(labels.data[...]), data)

    labels.selected_label = 8
    assert section.refine_selected()
    wait_idle(widget, qtbot)
    clicks = section.clicks
    assert widget.session.object_id == 8 and clicks.preview is not None
    np.testing.assert_array_equal(clicks.mask_prompt[2], data == 8)
    assert on_main == [False, False, False, False]
    assert section.commit()
    op = record_of(labels).operations[-1]
    assert op["kind"] == "prompts" and op["objects"][0]["mask"] == {"labels_id": 8}


def test_commits_on_an_image_with_two_leading_axes_replay_identically(
    make_napari_viewer, qtbot, tiny_tracker_dir
):
    """A (T, Z, Y, X) image: commits on two (t, z) slices and a delete there are recorded
    with their slice as a list of both indices and replayed byte for byte."""
    viewer, widget = dock(make_napari_viewer)
    seg = load_untiled(widget, qtbot, tiny_tracker_dir)
    base = blobs()
    img = np.stack([np.stack([np.roll(base, 7 * (t + z), axis=1) for z in range(3)])
                    for t in range(2)])  # (2, 3, 72, 120)
    add(viewer, widget, qtbot, img)
    labels, points = unwrap(widget.binder.labels_layer), unwrap(widget.binder.points_layer)
    assert labels.data.shape == img.shape
    committed = []
    for t, z, (r, c) in ((1, 2, (30, 54)), (0, 1, (45, 92))):
        viewer.dims.set_current_step(0, t)
        viewer.dims.set_current_step(1, z)
        wait_idle(widget, qtbot)
        canvas_click(viewer, qtbot, points, r, c)
        wait_idle(widget, qtbot)
        obj = widget.session.object_id
        assert widget.object_section.commit()
        assert (np.asarray(labels.data[t, z]) == obj).any()
        committed.append(((t, z), obj))
    labels.selected_label = committed[0][1]  # deleted on (0, 1), where it is not: one line
    assert not widget.object_section.delete_label()
    ops = record_of(labels).operations
    assert [op["kind"] for op in ops] == ["prompts", "prompts"]
    assert [op["slice"] for op in ops] == [[1, 2], [0, 1]]
    again = replayed(record_of(labels), img, seg)
    assert again.tobytes() == np.asarray(labels.data).tobytes()
    assert sorted(np.unique(again).tolist()) == [0] + sorted(o for _, o in committed)
