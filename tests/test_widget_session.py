"""Sessions in the widget never lose work (real viewer under Xvfb, real widget).

- Save session, close the viewer, Open session in a new viewer: points, boxes (ids and
  polarity), labels, ids and settings come back, and the next commit gets max + 1;
- a process killed after a commit (once its autosave landed) loses nothing: a fresh
  viewer offers the autosave and *Restore* brings the committed labels back;
- a folder holding something else is refused and left untouched; a session whose image
  changed says so in one line and changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from gui import WAIT_MS, dock, load, press, unwrap, wait_idle

from napari_sam3.core import session_folder as sf

HERE = Path(__file__).resolve().parent


def cells(shape=(72, 120)):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = (200 + 600 * np.exp(-((rows - 30) ** 2 + (cols - 40) ** 2) / 200)
           + 500 * np.exp(-((rows - 45) ** 2 + (cols - 85) ** 2) / 150))
    img = img + np.random.default_rng(0).normal(0, 30, img.shape)
    return img.astype(np.uint16)


@pytest.fixture
def autosave_dir(tmp_path, monkeypatch):
    folder = tmp_path / "autosave"
    monkeypatch.setenv(sf.AUTOSAVE_ENV, str(folder))
    return folder


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, cells())
    return path


def open_image(viewer, widget, qtbot, path):
    (layer,) = viewer.open(str(path))
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is layer
                    and widget.binder.points_layer is not None
                    and widget.binder.labels_layer is not None, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    return layer


def layers_of(widget):
    b = widget.binder
    return unwrap(b.points_layer), unwrap(b.shapes_layer), unwrap(b.labels_layer)


def commit_point(widget, qtbot, points, row, col):
    obj = widget.session.object_id
    points.add([[row, col]])
    wait_idle(widget, qtbot)
    assert widget.object_section.preview_mask is not None, widget.status
    press(qtbot, widget.object_section.commit_button)
    wait_idle(widget, qtbot)
    assert "Committed object" in widget.status, widget.status
    return obj


def test_save_close_open_in_a_new_viewer_and_continue(make_napari_viewer, qtbot, tmp_path,
                                                      tiny_tracker_dir, autosave_dir,
                                                      image_file):
    viewer, widget = dock(make_napari_viewer)
    load(widget, qtbot, tiny_tracker_dir)
    widget.cache_section.tile_spin.setValue(1024)
    widget.cache_section.overlap_spin.setValue(64)
    widget.post_section.max_hole_area.setValue(7)
    widget.post_section.overwrite_checkbox.setChecked(True)
    prop, inst = widget.propagate_section, widget.instances_section
    prop.direction_combo.setCurrentText("forward")
    prop.stop_after_spin.setValue(3)
    inst.concept_text_edit.setText("nucleus")
    inst.threshold_spin.setValue(0.7)
    inst.points_per_side_spin.setValue(8)
    inst.min_area_spin.setValue(5)
    open_image(viewer, widget, qtbot, image_file)
    image = unwrap(widget.binder.image_layer)
    low, high = (float(v) for v in image.contrast_limits_range)
    chosen = (low + 0.1 * (high - low), high - 0.25 * (high - low))  # the user's limits
    image.contrast_limits = chosen
    points, boxes, labels = layers_of(widget)
    assert commit_point(widget, qtbot, points, 30, 40) == 1
    assert commit_point(widget, qtbot, points, 45, 85) == 2
    committed = labels.data.copy()
    assert set(np.unique(committed)) <= {0, 1, 2} and (committed == 2).any()
    # the autosave followed both commits
    assert widget.store.last_autosave is not None
    assert widget.store.last_autosave.parent == autosave_dir
    np.testing.assert_array_equal(sf.read_labels(widget.store.last_autosave).read(), committed)
    assert sf.read_record(widget.store.last_autosave)["autosave"] is True  # (prunable)
    # object 3 in progress: a positive and a negative point and a box
    assert widget.session.object_id == 3
    widget.object_section.clicks.set_live(False)
    points.add([[20, 100]])
    points.selected_data = set()  # set_positive flips the selected points too
    widget.binder.set_positive(False)
    points.add([[60, 10]])
    boxes.add([np.array([[10, 90], [10, 115], [35, 115], [35, 90]], float)],
              shape_type="rectangle")
    wait_idle(widget, qtbot)
    saved_points, saved_features = points.data.copy(), points.features.copy()
    assert saved_features["object_id"].tolist() == [3, 3]
    assert saved_features["positive"].tolist() == [True, False]
    assert boxes.features["object_id"].tolist() == [3]

    folder = tmp_path / "my session"
    assert widget.session_section.save_session(str(folder))
    wait_idle(widget, qtbot)
    assert "Saved the session" in widget.status, widget.status
    assert sf.is_session(folder)
    assert not list(autosave_dir.iterdir())  # the autosave it replaced is gone
    rec = sf.read_record(folder)
    assert rec["image"]["path"] == str(image_file) and rec["object_id"] == 3
    assert not rec.get("autosave")  # the user's: never pruned
    assert rec["image"]["contrast_limits"] == list(chosen)
    assert rec["settings"]["tiling"] == [1024, 64]
    assert rec["settings"]["postprocess"] == {"max_hole_area": 7, "max_sprinkle_area":
                                              widget.post_section.max_sprinkle_area.value(),
                                              "overwrite": True}
    assert rec["settings"]["propagation"] == {"direction": "forward", "stop_after": 3}
    assert rec["settings"]["concept"] == {"text": "nucleus", "model": "", "threshold": 0.7}
    assert rec["settings"]["everything"]["points_per_side"] == 8
    assert rec["settings"]["everything"]["min_area"] == 5
    viewer.close()

    viewer2, widget2 = dock(make_napari_viewer)
    assert widget2.session_section.open_session(str(folder))
    qtbot.waitUntil(lambda: widget2.store.last_opened == folder, timeout=WAIT_MS)
    wait_idle(widget2, qtbot)
    image2 = unwrap(widget2.binder.image_layer)
    assert image2.source.path == str(image_file)  # opened from its path, not copied
    assert tuple(image2.contrast_limits) == chosen  # the same normalisation: same tiles
    points2, boxes2, labels2 = layers_of(widget2)
    np.testing.assert_array_equal(labels2.data, committed)
    np.testing.assert_array_equal(points2.data, saved_points)
    assert points2.features["object_id"].tolist() == [3, 3]
    assert points2.features["positive"].tolist() == [True, False]
    np.testing.assert_array_equal(boxes2.data[0], boxes.data[0])
    assert boxes2.features["object_id"].tolist() == [3]
    assert widget2.model_section.model_edit.text() == str(tiny_tracker_dir)
    assert widget2.cache_section.tile_spin.value() == 1024
    assert widget2.cache_section.overlap_spin.value() == 64
    assert widget2.session.tiling == (1024, 64)
    assert widget2.post_section.max_hole_area.value() == 7
    assert widget2.session.post.overwrite
    prop2, inst2 = widget2.propagate_section, widget2.instances_section
    assert prop2.direction_combo.currentText() == "forward"
    assert prop2.stop_after_spin.value() == 3
    assert inst2.concept_text_edit.text() == "nucleus"
    assert inst2.threshold_spin.value() == pytest.approx(0.7)
    assert inst2.threshold_slider.value() == 700  # the slider follows
    assert inst2.points_per_side_spin.value() == 8 and inst2.min_area_spin.value() == 5
    assert widget2.session.object_id == 3  # the object being edited, max + 1

    # continue: the model, then object 3 is committed and the next id is 4
    load(widget2, qtbot, tiny_tracker_dir)
    widget2.post_section.overwrite_checkbox.setChecked(False)  # objects 1 and 2 keep theirs
    assert widget2.object_section.segment_current()
    wait_idle(widget2, qtbot)
    press(qtbot, widget2.object_section.commit_button)
    wait_idle(widget2, qtbot)
    assert (labels2.data == 3).any(), widget2.status
    np.testing.assert_array_equal(labels2.data[committed > 0], committed[committed > 0])
    assert widget2.session.object_id == 4
    # autosaves now go into the opened session
    np.testing.assert_array_equal(sf.read_labels(folder).read(), labels2.data)
    assert widget2.store.last_autosave == folder
    assert not sf.read_record(folder).get("autosave")


def test_a_killed_process_loses_no_commit(make_napari_viewer, qtbot, tmp_path, tiny_tracker_dir,
                                          autosave_dir, image_file):
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.skip("needs a display (make test runs under Xvfb)")
    out = tmp_path / "committed.npy"
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", sf.AUTOSAVE_ENV: str(autosave_dir)}
    env.pop("PYTEST_CURRENT_TEST", None)
    script = HERE / "scripts" / "session_autosave_kill.py"
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_tracker_dir),
                             str(image_file), "30", "40", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("AUTOSAVED "):
                break
        else:
            pytest.fail("the process ended before its autosave:\n" + "".join(lines)[-4000:])
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    folder = Path(lines[-1].split(" ", 1)[1].strip())
    committed = np.load(out)
    assert committed.any() and folder.parent == autosave_dir and sf.is_session(folder)
    rec = sf.read_record(folder)  # taken after the commit: its prompts gone, the next id
    assert rec["object_id"] == int(committed.max()) + 1 and rec["points"]["data"] == []

    viewer, widget = dock(make_napari_viewer)
    open_image(viewer, widget, qtbot, image_file)
    qtbot.waitUntil(lambda: widget.store.offered == folder, timeout=WAIT_MS)
    assert widget.session_section.offer_row.isVisible()
    press(qtbot, widget.session_section.restore_button)
    qtbot.waitUntil(lambda: widget.store.last_opened == folder, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    _, _, labels = layers_of(widget)
    np.testing.assert_array_equal(labels.data, committed)
    assert widget.session.object_id == int(committed.max()) + 1
    assert not widget.session_section.offer_row.isVisible()


def test_a_foreign_folder_is_refused_and_a_changed_image_is_reported(
        make_napari_viewer, qtbot, tmp_path, autosave_dir, image_file):
    viewer, widget = dock(make_napari_viewer)
    layer = open_image(viewer, widget, qtbot, image_file)
    _, _, labels = layers_of(widget)
    labels.data_setitem((np.array([5, 6]), np.array([7, 7])), 4)  # a brush edit
    wait_idle(widget, qtbot)
    assert widget.store.last_autosave is not None  # edits are autosaved too
    other = tmp_path / "project"
    other.mkdir()
    (other / "data.csv").write_text("1,2\n")
    assert not widget.session_section.save_session(str(other))
    assert "not empty and is not a napari-sam3 session" in widget.status
    assert "\n" not in widget.status
    assert [p.name for p in other.iterdir()] == ["data.csv"]
    assert (other / "data.csv").read_text() == "1,2\n"
    assert not widget.session_section.open_session(str(other))
    assert "is not a napari-sam3 session folder" in widget.status

    folder = tmp_path / "s"
    assert widget.session_section.save_session(str(folder))
    wait_idle(widget, qtbot)
    assert sf.is_session(folder)
    viewer.layers.remove(layer)
    edited = cells()
    edited[0, 0] += 1
    tifffile.imwrite(image_file, edited)
    assert widget.session_section.open_session(str(folder))
    qtbot.waitUntil(lambda: "was not opened" in widget.status, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    assert "image changed since it was saved" in widget.status
    assert "\n" not in widget.status
    assert sf.read_record(folder)["labels"]["shape"] == [72, 120]  # the session is kept


def test_an_old_offer_or_a_failed_copy_never_touches_the_session(
        make_napari_viewer, qtbot, tmp_path, autosave_dir, image_file, monkeypatch):
    viewer, widget = dock(make_napari_viewer)
    open_image(viewer, widget, qtbot, image_file)
    _, _, labels = layers_of(widget)
    labels.data_setitem((np.array([5, 6]), np.array([7, 7])), 4)  # a brush edit: autosaved
    wait_idle(widget, qtbot)
    folder = widget.store.last_autosave
    assert folder is not None and folder.parent == autosave_dir
    saved, record = sf.read_labels(folder).read(), sf.read_record(folder)
    assert saved[5, 7] == 4 and saved[6, 7] == 4 and int(saved.sum()) == 8
    viewer.close()

    viewer2, widget2 = dock(make_napari_viewer)
    open_image(viewer2, widget2, qtbot, image_file)
    store = widget2.store
    qtbot.waitUntil(lambda: store.offered == folder, timeout=WAIT_MS)
    # a notification of an autosave no longer offered does nothing
    assert not store.discard(autosave_dir / "another")
    assert not store.restore(autosave_dir / "another")
    assert store.offered == folder and sf.is_session(folder)
    # Restore: its labels are large (copied in the worker) and the copy fails
    monkeypatch.setattr(sf, "ONE_WRITE", 100)
    fail = [True]
    copy_labels = sf.copy_labels

    def copy(*args, **kwargs):
        if fail[0]:
            raise OSError("disk gone")
        return copy_labels(*args, **kwargs)

    monkeypatch.setattr(sf, "copy_labels", copy)
    assert store.restore(folder)
    assert not store.discard(folder)  # being opened: never deleted
    assert not store.discard()
    qtbot.waitUntil(lambda: "cannot copy the session's labels" in widget2.status,
                    timeout=WAIT_MS)
    wait_idle(widget2, qtbot)
    assert "disk gone" in widget2.status and store.last_opened is None
    fail[0] = False
    _, _, labels2 = layers_of(widget2)
    labels2.data_setitem((np.array([20]), np.array([30])), 9)  # an edit after the failure
    wait_idle(widget2, qtbot)
    # the session is untouched; the edit went into an autosave of its own
    assert sf.is_session(folder) and sf.read_record(folder) == record
    np.testing.assert_array_equal(sf.read_labels(folder).read(), saved)
    assert store.last_autosave is not None and store.last_autosave != folder
    assert sf.read_labels(store.last_autosave).read()[20, 30] == 9


def test_pyramid_labels_autosave_only_the_written_regions_and_reopen(
        make_napari_viewer, qtbot, tmp_path, tiny_tracker_dir, autosave_dir, monkeypatch):
    from gui import key

    import napari_sam3.core.pyramid as pyramid_mod
    from napari_sam3.widget import scratch_labels

    monkeypatch.setattr(scratch_labels, "PYRAMID_PIXELS", 50_000)
    monkeypatch.setattr(pyramid_mod, "TOP", 64)
    regions = []
    update = sf.update_labels

    def spy(folder, source, region=None):
        regions.append(region)
        return update(folder, source, region)

    monkeypatch.setattr(sf, "update_labels", spy)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, cells((300, 400)))
    viewer, widget = dock(make_napari_viewer)
    load(widget, qtbot, tiny_tracker_dir)
    widget.cache_section.tile_spin.setValue(128)  # a commit writes one tile's region
    widget.cache_section.overlap_spin.setValue(32)
    open_image(viewer, widget, qtbot, path)
    points, _, labels = layers_of(widget)
    assert labels.multiscale
    target = widget.binder.target(labels)

    def levels(pyr):
        if hasattr(pyr, "wait"):
            pyr.wait()
        return [np.asarray(lv[...]) for lv in pyr.levels]

    commit_point(widget, qtbot, points, 30, 40)  # the first autosave: the whole labels
    folder = widget.store.last_autosave
    assert regions == []
    commit_point(widget, qtbot, points, 45, 85)  # then only the region written
    assert regions and all(r is not None for r in regions)
    for r in regions:
        assert r[-2].stop - r[-2].start <= 128 and r[-1].stop - r[-1].start <= 128
    want = levels(target.pyramid)
    assert len(want) > 1 and (want[0] == 2).any()
    for got, exp in zip(levels(sf.read_labels(folder)), want, strict=True):
        np.testing.assert_array_equal(got, exp)
    key(viewer, qtbot, labels, "Z", "Control")  # undo of a pyramid is autosaved too
    wait_idle(widget, qtbot)
    undone = levels(target.pyramid)
    assert not (undone[0] == 2).any()
    np.testing.assert_array_equal(sf.read_labels(folder).read(), undone[0])
    viewer.close()

    viewer2, widget2 = dock(make_napari_viewer)
    assert widget2.session_section.open_session(str(folder))
    qtbot.waitUntil(lambda: widget2.store.last_opened == folder, timeout=WAIT_MS)
    wait_idle(widget2, qtbot)
    _, _, labels2 = layers_of(widget2)
    assert labels2.multiscale
    for got, exp in zip(levels(widget2.binder.target(labels2).pyramid), undone, strict=True):
        np.testing.assert_array_equal(got, exp)
    assert widget2.session.object_id == int(undone[0].max()) + 1


def test_a_session_keeps_its_channel_layers(make_napari_viewer, qtbot, tmp_path,
                                            tiny_tracker_dir, autosave_dir, image_file):
    """The extra channel layers the model saw come back with the session (found by path
    or name, opened from their path, with their contrast limits); one that cannot be
    found is left out with a warning, and the session still opens."""
    from gui import Notes

    membrane = tmp_path / "membrane.tif"
    tifffile.imwrite(membrane, cells()[::-1].copy())
    viewer, widget = dock(make_napari_viewer)
    load(widget, qtbot, tiny_tracker_dir)
    open_image(viewer, widget, qtbot, image_file)
    (mem,) = viewer.open(str(membrane))
    images = widget.layers_section.image_combo
    images.setCurrentIndex(images.findText("cells"))  # (as a user picks it)
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer).name == "cells"
                    and widget.binder.labels_layer is not None, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    combo = widget.layers_section.channel_combos[0]
    combo.setCurrentIndex(combo.findText("membrane"))
    assert [unwrap(ly).name for ly in widget.binder.channels] == ["cells", "membrane"]
    mem.contrast_limits = (150.0, 700.0)
    points, _, labels = layers_of(widget)
    assert commit_point(widget, qtbot, points, 30, 40) == 1
    folder = tmp_path / "two channels"
    assert widget.session_section.save_session(str(folder))
    wait_idle(widget, qtbot)
    (ref,) = sf.read_record(folder)["settings"]["channels"]
    assert ref["path"] == str(membrane) and ref["contrast_limits"] == [150.0, 700.0]
    committed = labels.data.copy()
    viewer.close()

    viewer2, widget2 = dock(make_napari_viewer)
    assert widget2.session_section.open_session(str(folder))
    qtbot.waitUntil(lambda: widget2.store.last_opened == folder, timeout=WAIT_MS)
    wait_idle(widget2, qtbot)
    chans = widget2.binder.channels
    assert [unwrap(ly).name for ly in chans] == ["cells", "membrane"]
    assert unwrap(chans[1]).source.path == str(membrane)
    assert tuple(unwrap(chans[1]).contrast_limits) == (150.0, 700.0)
    assert widget2.layers_section.channel_combos[0].currentText() == "membrane"
    np.testing.assert_array_equal(layers_of(widget2)[2].data, committed)
    viewer2.close()

    membrane.unlink()  # gone: the session opens with the image alone, and says so
    viewer3, widget3 = dock(make_napari_viewer)
    notes = Notes()
    assert widget3.session_section.open_session(str(folder))
    qtbot.waitUntil(lambda: widget3.store.last_opened == folder, timeout=WAIT_MS)
    wait_idle(widget3, qtbot)
    assert widget3.binder.channels is None
    assert any("membrane" in m and "without that channel" in m for m in notes.since())
    np.testing.assert_array_equal(layers_of(widget3)[2].data, committed)


def test_two_images_autosave_into_their_own_folders(make_napari_viewer, qtbot, tmp_path,
                                                    tiny_tracker_dir, autosave_dir, image_file):
    """Each image's labels autosave into that image's folder: switching images never writes
    one image's labels into the other's autosave."""
    other_file = tmp_path / "other.tif"
    tifffile.imwrite(other_file, cells()[:, ::-1].copy())
    viewer, widget = dock(make_napari_viewer)
    load(widget, qtbot, tiny_tracker_dir)
    open_image(viewer, widget, qtbot, image_file)
    points, _, labels_a = layers_of(widget)
    commit_point(widget, qtbot, points, 30, 40)
    folder_a = widget.store.last_autosave
    (layer_b,) = viewer.open(str(other_file))
    images = widget.layers_section.image_combo  # chosen as a user does
    images.setCurrentIndex(images.findText("other"))
    qtbot.waitUntil(lambda: unwrap(widget.binder.image_layer) is layer_b
                    and widget.binder.labels_layer is not None
                    and unwrap(widget.binder.labels_layer) is not labels_a, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    points_b, _, labels_b = layers_of(widget)
    assert labels_b is not labels_a
    commit_point(widget, qtbot, points_b, 45, 85)
    folder_b = widget.store.last_autosave
    assert folder_b != folder_a and folder_a.parent == folder_b.parent == autosave_dir
    assert sf.read_record(folder_a)["image"]["name"] == "cells"
    assert sf.read_record(folder_b)["image"]["name"] == "other"
    np.testing.assert_array_equal(sf.read_labels(folder_b).read(), labels_b.data)

    images.setCurrentIndex(images.findText("cells"))  # back to the first, one more object
    qtbot.waitUntil(lambda: unwrap(widget.binder.labels_layer) is labels_a, timeout=WAIT_MS)
    wait_idle(widget, qtbot)
    commit_point(widget, qtbot, unwrap(widget.binder.points_layer), 45, 85)
    wait_idle(widget, qtbot)
    assert widget.store.last_autosave == folder_a  # the same folder, updated
    np.testing.assert_array_equal(sf.read_labels(folder_a).read(), labels_a.data)
    np.testing.assert_array_equal(sf.read_labels(folder_b).read(), labels_b.data)
    assert sorted(p.name for p in autosave_dir.iterdir()) == sorted([folder_a.name,
                                                                     folder_b.name])
