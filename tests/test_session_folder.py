"""Session folders (core): the layout round-trips, region updates touch only their region
at every level, and a folder that is not ours is never written over or removed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from napari_sam3.core import session_folder as sf
from napari_sam3.core.provenance import Provenance, image_fingerprint


def record(shape=(40, 60), image=None, **kw):
    image = np.zeros(shape, np.uint16) if image is None else image
    ref = {"path": "/data/cells.tif", "name": "cells", "shape": list(image.shape),
           "dtype": str(image.dtype), "rgb": False, "fingerprint": image_fingerprint(image)}
    return sf.new_record(
        image=ref, labels={"name": "SAM3 labels", "shape": list(shape), "n_lead": len(shape) - 2},
        settings={"model": "m", "device": "cpu", "cache": None, "tiling": [512, 128],
                  "postprocess": {"max_hole_area": 3, "max_sprinkle_area": 4,
                                  "overwrite": False}},
        object_id=kw.get("object_id", 4),
        points={"name": "SAM3 points", "data": [[1.0, 2.0], [3.5, 4.0]],
                "object_id": [3, 3], "positive": [True, False]},
        boxes={"name": "SAM3 boxes", "data": [[[0, 0], [0, 5], [5, 5], [5, 0]]],
               "shape_type": ["rectangle"], "object_id": [2]})


def test_session_round_trips_labels_record_and_provenance(tmp_path):
    labels = np.zeros((40, 60), np.int32)
    labels[5:10, 7:20] = 3
    labels[30:35, 50:60] = 7
    prov = Provenance(device="cpu", operations=[{"kind": "brush", "slice": None}])
    rec = record()
    out = sf.write_session(tmp_path / "s", rec, labels, prov)
    assert sf.is_session(out)
    assert sorted(p.name for p in out.iterdir()) == ["labels", "session.json", "zarr.json"]
    assert sf.read_record(out) == rec
    np.testing.assert_array_equal(sf.read_labels(out).read(), labels)
    assert sf.read_provenance(out) == prov.to_dict()
    # the labels are an OME-NGFF-style multiscale group: level 0 is the labels
    import zarr

    group = zarr.open_group(out / "labels", mode="r")
    path0 = group.attrs["multiscales"][0]["datasets"][0]["path"]
    np.testing.assert_array_equal(group[path0][...], labels)
    assert json.loads((out / "session.json").read_text())["schema"] == "napari-sam3/session"


def test_a_folder_that_holds_something_else_is_refused_and_untouched(tmp_path):
    other = tmp_path / "project"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(sf.SessionError, match="not empty and is not a napari-sam3 session"):
        sf.write_session(other, record(), np.zeros((40, 60), np.int32))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert (other / "notes.txt").read_text() == "mine"
    assert not sf.remove(other) and (other / "notes.txt").exists()
    # a session with a file of someone else's added is no longer ours either
    s = sf.write_session(tmp_path / "s", record(), np.zeros((40, 60), np.int32))
    (s / "extra.txt").write_text("x")
    assert not sf.is_session(s)
    with pytest.raises(sf.SessionError):
        sf.write_session(s, record(), np.zeros((40, 60), np.int32))
    assert (s / "extra.txt").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(sf.SessionError, match="not a folder"):
        sf.check_target(a_file)
    with pytest.raises(sf.SessionError, match="not a napari-sam3 session folder"):
        sf.read_record(other)


def test_a_session_of_ours_and_an_empty_folder_are_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    first = np.ones((40, 60), np.int32)
    sf.write_session(empty, record(), first)
    np.testing.assert_array_equal(sf.read_labels(empty).read(), first)
    second = np.zeros((40, 60), np.int32)
    second[0, 0] = 9
    sf.write_session(empty, record(object_id=10), second)  # replaces ours
    np.testing.assert_array_equal(sf.read_labels(empty).read(), second)
    assert sf.read_record(empty)["object_id"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging left
    assert sf.remove(empty) and not empty.exists()


def test_a_failed_rename_never_loses_the_previous_session(tmp_path, monkeypatch):
    first = np.ones((40, 60), np.int32)
    out = sf.write_session(tmp_path / "s", record(), first)
    real = os.replace
    failing = {"new"}

    def replace(src, dst):
        if Path(src).name in failing and Path(src).parent.name.endswith(".partial"):
            raise OSError("disk says no")
        return real(src, dst)

    monkeypatch.setattr(sf.os, "replace", replace)
    # the new session cannot be put in place: the previous one is put back
    with pytest.raises(OSError, match="disk says no"):
        sf.write_session(out, record(object_id=10), np.zeros((40, 60), np.int32))
    np.testing.assert_array_equal(sf.read_labels(out).read(), first)
    assert sf.read_record(out)["object_id"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging left
    # nor can the previous one be put back: it is kept where it is, and said so
    failing.add("old")
    with pytest.raises(sf.SessionError, match="your previous session is at") as info:
        sf.write_session(out, record(object_id=10), np.zeros((40, 60), np.int32))
    monkeypatch.undo()
    (stage,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    kept = stage / "old"
    assert str(kept) in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and sf.is_session(kept)
    np.testing.assert_array_equal(sf.read_labels(kept).read(), first)
    assert sf.read_record(kept)["object_id"] == 4


def test_a_failed_removal_is_reported(tmp_path, monkeypatch):
    out = sf.write_session(tmp_path / "s", record(), None)

    def rmtree(path, *args, **kwargs):
        raise PermissionError("in use")

    monkeypatch.setattr(sf.shutil, "rmtree", rmtree)
    with pytest.raises(sf.SessionError, match="cannot delete the session"):
        sf.remove(out)
    monkeypatch.undo()
    assert sf.is_session(out)
    assert sf.remove(out) and not out.exists()


def test_region_updates_write_only_their_region_at_every_level(tmp_path, monkeypatch):
    from napari_sam3.core import pyramid as pyr

    monkeypatch.setattr(pyr, "TOP", 64)
    monkeypatch.setattr(pyr, "CHUNK", 32)
    shape = (300, 260)
    out = sf.write_session(tmp_path / "s", record(shape), None)
    levels = sf.read_labels(out).levels
    assert len(levels) >= 3
    labels = np.zeros(shape, np.int32)
    labels[10:50, 20:90] = 5
    region = (slice(10, 50), slice(20, 90))
    labels[200:220, 200:220] = 8  # outside the region: not written
    assert sf.update_labels(out, labels, region) == 5
    got = sf.read_labels(out)
    want = np.zeros(shape, np.int32)
    want[region] = labels[region]
    np.testing.assert_array_equal(got.read(), want)
    for level, (fr, fc) in zip(got.levels, got.factors, strict=True):
        np.testing.assert_array_equal(np.asarray(level), want[::fr, ::fc])
    chunk_files = {p.relative_to(out).as_posix() for p in (out / "labels").rglob("c/*/*")}
    assert chunk_files and all(p.split("/")[2] == "c" for p in chunk_files)
    # level 0 chunks written: only those under the region (32 px chunks)
    level0 = {tuple(int(v) for v in p.split("/")[-2:]) for p in chunk_files
              if p.startswith("labels/0/")}
    assert level0 == {(r, c) for r in range(0, 2) for c in range(0, 3)}
    # None: anywhere, the blocks that differ
    sf.update_labels(out, labels, None)
    np.testing.assert_array_equal(sf.read_labels(out).read(), labels)


def test_region_updates_of_a_stack_and_large_regions_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "ONE_WRITE", 100)
    monkeypatch.setattr(sf, "BLOCK", 16)
    shape = (3, 40, 50)
    out = sf.write_session(tmp_path / "s", record(shape), None)
    labels = np.random.default_rng(0).integers(0, 5, shape).astype(np.int32)
    sf.update_labels(out, labels, (1, slice(0, 40), slice(3, 50)))
    want = np.zeros(shape, np.int32)
    want[1, :, 3:] = labels[1, :, 3:]
    np.testing.assert_array_equal(sf.read_labels(out).read(), want)
    with pytest.raises(sf.SessionError, match="shape"):
        sf.update_labels(out, labels[:2], None)


def test_record_and_provenance_updates_are_atomic_and_checked(tmp_path):
    out = sf.write_session(tmp_path / "s", record(), None)
    rec = record(object_id=12)
    sf.write_record(out, rec)
    assert sf.read_record(out)["object_id"] == 12
    sf.set_provenance(out, {"schema": "napari-sam3/provenance", "version": 1})
    assert sf.read_provenance(out)["version"] == 1
    assert sf.is_session(out)
    (out / ("session.json" + sf.TMP_SUFFIX)).write_text("{")  # a write cut short
    assert sf.is_session(out)
    with pytest.raises(sf.SessionError, match="newer"):
        sf.write_record(out, {**rec, "version": sf.VERSION + 1})


def test_image_matching_by_path_name_and_fingerprint(tmp_path, monkeypatch):
    image = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    rec = record(image=image)
    monkeypatch.setenv(sf.AUTOSAVE_ENV, str(tmp_path / "auto"))
    assert sf.autosave_root() == tmp_path / "auto"
    folder = sf.new_autosave_folder("cells / 1")
    assert folder.parent == tmp_path / "auto" and "/" not in folder.name[:10]
    sf.write_session(folder, rec, None)
    same = {**rec["image"]}
    assert sf.find_autosaves(same) == [folder]
    assert sf.find_autosaves(same, exclude=[folder]) == []
    edited = image.copy()
    edited[0, 0] += 1
    changed = {**same, "fingerprint": image_fingerprint(edited)}
    assert sf.find_autosaves(changed) == []
    assert "pixels differ" in sf.image_mismatch(rec["image"], changed)
    assert "shape" in sf.image_mismatch(rec["image"], {**same, "shape": [1, 2]})
    assert sf.find_autosaves({**same, "path": "/elsewhere/cells.tif"}) == []
    unnamed = {**rec["image"], "path": None}
    assert sf.same_image_ref(unnamed, {"path": None, "name": "cells"})
    assert not sf.same_image_ref(unnamed, {"path": None, "name": "other"})
    (tmp_path / "auto" / "junk").mkdir()  # not a session: never listed
    assert sf.find_autosaves(same) == [folder]


def test_old_autosaves_of_an_image_are_pruned_keeping_the_newest(tmp_path, monkeypatch):
    """Only this image's autosaves beyond the newest few go; one in use, one written to
    in the last day, a session the user saved there, another image's, and a folder that
    is not ours stay."""
    monkeypatch.setenv(sf.AUTOSAVE_ENV, str(tmp_path / "auto"))
    image = np.arange(40 * 60, dtype=np.uint16).reshape(40, 60)
    rec = {**record(image=image), "autosave": True}
    folders = []
    old = time.time() - 2 * sf.PRUNE_AFTER_S
    for day in range(1, 9):  # eight autosaves of the image, oldest first
        folder = tmp_path / "auto" / f"cells-{day}"
        sf.write_session(folder, {**rec, "saved": f"2026-11-0{day}T10:00:00"}, None)
        os.utime(folder / sf.RECORD, (old, old))
        folders.append(folder)
    user_saved = folders[1]  # saved there by the user: no autosave mark
    sf.write_record(user_saved, {**rec, "autosave": False, "saved": "2026-11-02T10:00:00"})
    recent = folders[2]  # another napari may still autosave into it
    sf.write_record(recent, {**rec, "saved": "2026-11-03T10:00:00"})
    for f in (user_saved,):
        os.utime(f / sf.RECORD, (old, old))
    sf.write_session(tmp_path / "auto" / "other", record(image=image + 1), None)
    (tmp_path / "auto" / "junk").mkdir()
    (tmp_path / "auto" / "junk" / "notes.txt").write_text("mine")
    in_use = folders[0]  # the oldest, but a widget is autosaving into it
    removed = sf.prune_autosaves(rec["image"], keep=3, exclude=[in_use])
    assert sorted(removed) == sorted(folders[3:5])  # beyond the 3 newest, prunable
    kept = [folders[7], folders[6], folders[5], recent, user_saved, in_use]
    assert sf.find_autosaves(rec["image"]) == kept
    assert sf.is_session(tmp_path / "auto" / "other")
    assert (tmp_path / "auto" / "junk" / "notes.txt").read_text() == "mine"
    assert sf.prune_autosaves(rec["image"], keep=3, exclude=[in_use]) == []
    assert sf.KEEP_AUTOSAVES == 5
