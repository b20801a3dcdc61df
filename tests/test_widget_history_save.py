"""Undo and saving in the viewer never lose work (real viewer under Xvfb, real keys).

- a propagation is one undo step of its own: Ctrl+Z after commit + propagate undoes
  the propagation and nothing else;
- labels of any dimensionality napari holds are saved, and a save that cannot be done
  says why instead of napari's "no plugin could write";
- the widget's *Save labels* uses our writer (ImageJ-readable TIFF);
- the scratch folders of large labels go with their layer (kept and offered for deletion
  when they hold labels), and never a folder that is not ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from gui import Notes, canvas_click, dock, key, load, press, unwrap, wait_idle

from napari_sam3 import ObjectPrompt
from napari_sam3.widget import scratch_labels

LIMITS = (100.0, 900.0)
DEPTH = 30


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video_history"), seed=0)


def stack(depth=DEPTH):
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:80, 0:112]
    planes = []
    for z in range(depth):
        img = 200 + 600 * np.exp(-((rows - 35) ** 2 + (cols - 30 - z) ** 2) / 150)
        img = img + 500 * np.exp(-((rows - 55) ** 2 + (cols - 85) ** 2) / 120)
        planes.append(img + rng.normal(0, 25, img.shape))
    return np.stack(planes).astype(np.float32)


def add(viewer, widget, qtbot, data, **kwargs):
    layer = viewer.add_image(data, name="cells", contrast_limits=LIMITS, **kwargs)
    qtbot.waitUntil(
        lambda: unwrap(widget.binder.image_layer) is layer
        and widget.binder.points_layer is not None
        and widget.binder.points_layer.ndim == layer.ndim
        and widget.binder.labels_layer is not None,
        timeout=30_000,
    )
    wait_idle(widget, qtbot)
    return layer


def test_ctrl_z_after_commit_and_propagate_undoes_only_the_propagation(
    make_napari_viewer, qtbot, video_dir
):

    viewer, widget = dock(make_napari_viewer)
    seg = load(widget, qtbot, video_dir)
    zstack = stack()
    add(viewer, widget, qtbot, zstack)
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)
    pp = {"max_hole_area": widget.post_section.max_hole_area.value(),
          "max_sprinkle_area": widget.post_section.max_sprinkle_area.value()}

    viewer.dims.set_current_step(0, 10)  # object 1, committed on slice 10
    _, r, c = canvas_click(viewer, qtbot, points, 35, 40)
    wait_idle(widget, qtbot)
    press(qtbot, widget.object_section.commit_button)
    committed = labels.data.copy()
    assert (committed[10] == 1).sum() > 0 and not np.delete(committed, 10, axis=0).any()

    viewer.dims.set_current_step(0, 12)  # object 2, propagated through the stack
    _, r2, c2 = canvas_click(viewer, qtbot, points, 55, 85)
    wait_idle(widget, qtbot)
    press(qtbot, widget.propagate_section.propagate_button)
    wait_idle(widget, qtbot)
    want = seg.propagate(zstack, {12: {2: ObjectPrompt(points=[(r2, c2)])}}, axis=0,
                         limits=LIMITS, out=committed.copy(), **pp)
    propagated = labels.data.copy()
    np.testing.assert_array_equal(propagated, want)
    assert len({k for k in range(DEPTH) if (propagated[k] == 2).any()}) > 1
    assert "Ctrl+Z undoes it" in widget.status

    key(viewer, qtbot, labels, "Z", "Control")  # undoes the propagation, not the commit
    np.testing.assert_array_equal(labels.data, committed)
    key(viewer, qtbot, labels, "Z", "Control", "Shift")  # redo
    np.testing.assert_array_equal(labels.data, propagated)
    key(viewer, qtbot, labels, "Z", "Control")
    key(viewer, qtbot, labels, "Z", "Control")  # ... and then the commit
    assert not labels.data.any()


def test_a_propagation_too_large_for_undo_says_so_and_keeps_earlier_steps(
    make_napari_viewer, qtbot, video_dir, monkeypatch
):

    from napari_sam3.widget import results

    monkeypatch.setattr(results, "UNDO_PIXELS", 50)
    viewer, widget = dock(make_napari_viewer)
    load(widget, qtbot, video_dir)
    add(viewer, widget, qtbot, stack(6))
    points, labels = unwrap(widget.binder.points_layer), unwrap(widget.binder.labels_layer)
    labels.data_setitem((np.array([0]), np.array([0]), np.array([0])), 9)  # a user's edit
    viewer.dims.set_current_step(0, 2)
    canvas_click(viewer, qtbot, points, 55, 85)
    wait_idle(widget, qtbot)
    press(qtbot, widget.propagate_section.propagate_button)
    wait_idle(widget, qtbot)
    assert "too large for undo" in widget.status
    assert (labels.data == 1).sum() > 50
    labels.undo()  # the user's own edit is still the step Ctrl+Z reverts
    assert labels.data[0, 0, 0] == 0 and (labels.data == 1).sum() > 50


def test_tzyx_labels_save_to_zarr_and_tiff_and_errors_are_shown(make_napari_viewer, tmp_path):
    from napari_sam3.core import io

    viewer = make_napari_viewer()
    data = np.random.default_rng(0).integers(0, 4, (3, 4, 20, 30)).astype(np.int32)
    layer = viewer.add_labels(data, name="tzyx", axis_labels=("t", "z", "y", "x"))
    out = tmp_path / "tzyx.zarr"
    assert viewer.layers.save(str(out), selected=False) == [str(out)]  # File > Save path
    np.testing.assert_array_equal(io.read_labels(out), data)
    tif = tmp_path / "tzyx.tif"
    layer.save(str(tif), plugin="napari-sam3")
    with tifffile.TiffFile(tif) as f:
        assert f.is_imagej and f.series[0].axes == "TZYX"
        np.testing.assert_array_equal(f.asarray(), data)
    viewer.layers.remove(layer)
    six = viewer.add_labels(np.zeros((2,) * 6, np.int32), name="six")
    with pytest.raises(OSError, match="SAM3: cannot save 'six'.*2 to 5 dimensions"):
        six.save(str(tmp_path / "six.zarr"), plugin="napari-sam3")


def test_save_labels_button_uses_our_writer(make_napari_viewer, qtbot, tiny_tracker_dir,
                                            tmp_path):
    viewer, widget = dock(make_napari_viewer)
    add(viewer, widget, qtbot, stack(1)[0])
    labels = unwrap(widget.binder.labels_layer)
    labels.data_setitem((np.array([3, 4]), np.array([5, 6])), 7)
    ours = tmp_path / "ours.tif"
    assert widget.layers_section.save_labels(str(ours)) == [str(ours)]
    assert f"Saved 'SAM3 labels' to {ours}" in widget.status
    with tifffile.TiffFile(ours) as f:
        assert f.is_imagej and f.pages[0].dtype == np.uint16  # Fiji opens it
        np.testing.assert_array_equal(f.asarray(), labels.data)
    theirs = tmp_path / "theirs.tif"  # File > Save picks napari's builtin writer
    viewer.layers.selection.active = labels
    viewer.layers.save(str(theirs), selected=True)
    with tifffile.TiffFile(theirs) as f:
        assert not f.is_imagej  # why README points to *Save labels*
    notes = Notes()
    assert widget.layers_section.save_labels(str(tmp_path / "x.png")) == []
    assert any("save labels as .tif or .zarr" in m for m in notes.since("error"))


def test_scratch_folder_goes_with_its_layer_or_is_offered_for_deletion(
    make_napari_viewer, qtbot, monkeypatch
):
    from napari_sam3.widget import scratch_labels

    monkeypatch.setattr(scratch_labels, "LARGE_PIXELS", 1000)
    viewer, widget = dock(make_napari_viewer)
    notes = Notes()
    add(viewer, widget, qtbot, stack(1)[0])

    # no labels in it: removed with the layer, nothing offered
    labels = unwrap(widget.binder.labels_layer)
    folder = widget.binder.scratch.folder_of(labels)
    assert folder is not None and scratch_labels.is_ours(folder)
    assert not isinstance(labels.data, np.ndarray)  # a Zarr array in the scratch folder
    viewer.layers.remove(labels)
    assert not folder.exists() and not notes.since("warning")

    # labels in it: kept, the real notification says where and its Delete button deletes
    widget.binder.ensure_layers()
    labels = unwrap(widget.binder.labels_layer)
    folder = widget.binder.scratch.folder_of(labels)
    labels.data_setitem((np.array([5]), np.array([5])), 3)
    assert scratch_labels.holds_labels(folder)
    viewer.layers.remove(labels)
    assert folder.exists()
    from napari.utils.notifications import notification_manager

    record = notification_manager.records[-1]
    assert str(folder) in str(record.message) and "removed layer" in str(record.message)
    (name, delete), = record.actions
    assert name == "Delete"
    delete(record)
    assert not folder.exists()

    # after the dock is closed, a scratch layer removed is still offered for deletion
    widget.binder.ensure_layers()
    labels = unwrap(widget.binder.labels_layer)
    folder = widget.binder.scratch.folder_of(labels)
    labels.data_setitem((np.array([6]), np.array([6])), 4)
    widget.session.close()
    viewer.layers.remove(labels)
    record = notification_manager.records[-1]
    assert folder.exists() and str(folder) in str(record.message)
    assert [name for name, _ in record.actions] == ["Delete"]


def test_scratch_folders_only_ours_are_removed_and_exit_keeps_unsaved(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    data, folder = scratch_labels.new_labels_data((40, 40), 0, large_pixels=100)
    assert folder.parent == tmp_path and scratch_labels.is_ours(folder)
    data[3:5, 3:5] = 2
    scratch_labels._at_exit(folder)  # holds labels: kept, and said where
    assert folder.exists() and str(folder) in capsys.readouterr().err
    data[3:5, 3:5] = 0
    scratch_labels._at_exit(folder)  # empty again: removed
    assert not folder.exists()

    _, other = scratch_labels.new_labels_data((40, 40), 0, large_pixels=100)
    (other / "mine.txt").write_text("a user's file")  # no longer only ours
    assert not scratch_labels.remove(other) and (other / "mine.txt").exists()
    lookalike = tmp_path / "napari-sam3-labels-x"
    lookalike.mkdir()
    assert not scratch_labels.remove(lookalike) and lookalike.exists()
