"""Never lose a user's files: where the embedding cache may live and what ``clear`` deletes,
what ``--overwrite`` may replace, and the leftovers of killed runs (cache ``tmp/`` entries,
``.partial`` staging folders), told from work in progress by age alone."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_sam3 import ObjectPrompt, Sam3Segmenter, cli
from napari_sam3._cli import output
from napari_sam3.core import io
from napari_sam3.core.embedding_store import (
    FORMAT_VERSION,
    ORPHAN_AGE_S,
    CacheWarning,
    EmbeddingStore,
)

H, W = 60, 90
OBJECTS = [{"points": [[10, 70]]}, {"box": [5, 5, 30, 40]}]
KEY = "ab" * 20  # shaped like cache.content_key's digests


@pytest.fixture
def work(tmp_path):
    rows, cols = np.mgrid[0:H, 0:W]
    img = (1000 + 800 * np.sin(rows / 6.0) * np.cos(cols / 9.0) + 3 * cols).astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", img)
    (tmp_path / "prompts.json").write_text(json.dumps(OBJECTS))
    return tmp_path


@pytest.fixture
def expected(work, tiny_segmenter):
    img = tifffile.imread(work / "img.tif")
    return tiny_segmenter.segment(img, [ObjectPrompt.from_dict(o) for o in OBJECTS])


def _segment(work, model, out, *extra, image=None) -> list[str]:
    return ["segment", str(image or work / "img.tif"), "--prompts", str(work / "prompts.json"),
            "--out", str(out), "--model", str(model), "--device", "cpu", *map(str, extra)]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _one_line(err: str, kind: str) -> None:
    assert err.startswith(f"napari-sam3: {kind}:") and err.count("\n") == 1, err
    assert "Traceback" not in err


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything in it to ``seconds`` ago."""
    then = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (then, then))


def _store_with_entry(path: Path) -> EmbeddingStore:
    store = EmbeddingStore(path, "float32")
    store.put(KEY, [np.ones((2, 3, 3), np.float32)])
    assert store.disk_entries() == [KEY]
    return store


def _tmp_entry(store: EmbeddingStore) -> Path:
    """A tmp/ entry as a writer leaves it (named <key>.<uuid>, a Zarr group inside)."""
    entry = store.path / "tmp" / f"{KEY}.{uuid.uuid4().hex}"
    zarr.open_group(entry, mode="w", zarr_format=3).create_array("0", shape=(2,), dtype="f4")
    return entry


# ------------------------------------------------------------------ cache location


def test_store_never_takes_over_a_folder_of_other_files(tiny_tracker_dir, tmp_path):
    """The issue's reproduction through the API: d/tiles/photo.txt is neither written
    next to nor deleted by clear()."""
    folder = tmp_path / "d"
    (folder / "tiles").mkdir(parents=True)
    (folder / "tiles" / "photo.txt").write_text("x")
    before = _snapshot(folder)
    with pytest.warns(CacheWarning, match="not a napari-sam3 embedding cache.*memory only"):
        seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", cache=folder)
    assert seg.store.path is None
    seg.segment(np.zeros((H, W), np.uint8), [ObjectPrompt(points=[(10, 10)])])
    with pytest.warns(CacheWarning):
        EmbeddingStore(folder).clear()
    assert _snapshot(folder) == before


@pytest.mark.parametrize("where", ["new", "empty folder", "only .DS_Store"])
def test_store_uses_a_new_or_empty_folder(tmp_path, where):
    folder = tmp_path / "c"
    if where != "new":
        folder.mkdir()
    if where == "only .DS_Store":
        (folder / ".DS_Store").write_bytes(b"finder")
    store = _store_with_entry(folder)
    assert store.path == folder and (folder / "zarr.json").is_file()
    assert EmbeddingStore(folder).disk_entries() == [KEY]  # reopened: recognised as ours


def test_clear_deletes_only_what_the_store_wrote(tmp_path):
    folder = tmp_path / "c"
    store = _store_with_entry(folder)
    (folder / "notes.txt").write_text("mine")
    (folder / "tiles" / "photo.txt").write_text("mine")
    (folder / "tiles" / "album").mkdir()
    (folder / "tiles" / "album" / "zarr.json").write_text("{}")
    (folder / "tmp" / "draft.txt").write_text("mine")
    fresh = _tmp_entry(store)  # another process writing right now
    mine = {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")
            if KEY not in str(p.relative_to(folder))}
    store.clear()
    assert store.disk_entries() == [] and not (folder / "tiles" / KEY).exists()
    assert fresh.is_dir()
    after = {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")
             if KEY not in str(p.relative_to(folder))}
    assert after == mine


def test_store_keys_are_digests(tmp_path):
    store = EmbeddingStore(tmp_path / "c")
    with pytest.raises(ValueError, match="hex digest"):
        store.get("../../elsewhere")
    with pytest.raises(ValueError, match="hex digest"):
        store.put("tile 1", [np.zeros((1, 2, 2), np.float32)])


def test_cli_clear_keeps_a_users_files(work, tiny_tracker_dir, expected, capsys):
    """The issue's reproduction: segment with cache="d", then cache clear --cache d; also
    segment --cache d, and clearing a cache of ours that the user put a file in."""
    folder = work / "d"
    (folder / "tiles").mkdir(parents=True)
    (folder / "tiles" / "photo.txt").write_text("x")
    before = _snapshot(folder)
    img = tifffile.imread(work / "img.tif")
    with pytest.warns(CacheWarning, match="not a napari-sam3 embedding cache"):
        seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", cache=folder)
    np.testing.assert_array_equal(seg.segment(img, [ObjectPrompt.from_dict(o) for o in OBJECTS]),
                                  expected)
    capsys.readouterr()  # the API's weight-loading progress
    assert cli.main(["cache", "clear", "--cache", str(folder)]) == 2
    _one_line(capsys.readouterr().err, "error")
    assert _snapshot(folder) == before

    out = work / "o.tif"
    assert cli.main(_segment(work, tiny_tracker_dir, out, "--cache", folder)) == 0
    cap = capsys.readouterr()
    _one_line(cap.err, "warning")
    assert str(folder) in cap.err and "not a napari-sam3 embedding cache" in cap.err
    np.testing.assert_array_equal(io.read_labels(out), expected)
    assert _snapshot(folder) == before

    cache = work / "c.zarr"
    _store_with_entry(cache)
    (cache / "tiles" / "photo.txt").write_text("x")
    assert cli.main(["cache", "clear", "--cache", str(cache)]) == 0
    assert capsys.readouterr().out.startswith("cleared 1 entry ")
    assert sorted(p.name for p in (cache / "tiles").iterdir()) == ["photo.txt"]


def _corrupt_marker(folder: Path) -> Path:
    folder.mkdir()
    (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    return folder


def _zarr_array(folder: Path) -> Path:
    zarr.create_array(folder, shape=(4, 4), dtype="i4")[...] = 1
    return folder


@pytest.mark.parametrize("make", [_corrupt_marker, _zarr_array], ids=["corrupt", "array"])
def test_unusable_cache_is_one_warning_naming_the_cache(work, tiny_tracker_dir, expected,
                                                        capsys, make):
    folder = make(work / "c.zarr")
    before = _snapshot(folder)
    out = work / "o.tif"
    assert cli.main(_segment(work, tiny_tracker_dir, out, "--cache", folder)) == 0
    cap = capsys.readouterr()
    _one_line(cap.err, "warning")
    assert f"cannot use the embedding cache at {folder}" in cap.err and "memory" in cap.err
    assert "model" not in cap.err
    np.testing.assert_array_equal(io.read_labels(out), expected)
    with pytest.warns(CacheWarning, match="embedding cache"):  # the API: a warning, no error
        seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", cache=folder)
    assert seg.store.path is None
    assert cli.main(["precompute", str(work / "img.tif"), "--cache", str(folder),
                     "--model", str(tiny_tracker_dir), "--device", "cpu"]) == 2
    assert "precompute needs a usable cache" in capsys.readouterr().err
    assert _snapshot(folder) == before


def _set_version(folder: Path, version: int) -> None:
    meta = json.loads((folder / "zarr.json").read_text())
    meta["attributes"]["napari_sam3"]["format_version"] = version
    (folder / "zarr.json").write_text(json.dumps(meta))


def test_cache_of_an_older_format_can_be_cleared(work, tiny_tracker_dir, capsys):
    folder = work / "c.zarr"
    _store_with_entry(folder)
    (folder / "notes.txt").write_text("mine")
    _set_version(folder, FORMAT_VERSION - 1)
    with pytest.warns(CacheWarning, match="clear it"):
        assert EmbeddingStore(folder).path is None
    assert cli.main(["cache", "info", "--cache", str(folder)]) == 0
    assert "older format" in capsys.readouterr().out
    assert cli.main(["cache", "clear", "--cache", str(folder)]) == 0
    assert capsys.readouterr().out.startswith("cleared 1 entry ")
    assert (folder / "notes.txt").read_text() == "mine"
    store = _store_with_entry(folder)  # usable again, no warning
    assert store.path == folder
    root = zarr.open_group(folder, mode="r").attrs["napari_sam3"]
    assert root["format_version"] == FORMAT_VERSION


def test_cache_of_a_newer_format_is_left_alone(work, capsys):
    folder = work / "c.zarr"
    _store_with_entry(folder)
    _set_version(folder, FORMAT_VERSION + 1)
    before = _snapshot(folder)
    with pytest.warns(CacheWarning, match="newer format"):
        assert EmbeddingStore(folder).path is None
    assert cli.main(["cache", "clear", "--cache", str(folder)]) == 2
    err = capsys.readouterr().err
    _one_line(err, "error")
    assert "newer format" in err
    assert _snapshot(folder) == before


# ------------------------------------------------------------------ cache leftovers


def test_orphans_are_told_by_age_and_removed(tmp_path, capsys):
    folder = tmp_path / "c.zarr"
    store = _store_with_entry(folder)
    old, fresh = _tmp_entry(store), _tmp_entry(store)
    _age(old, ORPHAN_AGE_S + 60)
    _age(fresh, ORPHAN_AGE_S - 600)  # a slow write of another process: not an orphan yet
    foreign = folder / "tmp" / "draft.txt"
    foreign.write_text("mine")
    _age(foreign, 10 * ORPHAN_AGE_S)
    assert store.orphans() == [old]
    assert cli.main(["cache", "info", "--cache", str(folder)]) == 0
    assert "leftovers: 1 " in capsys.readouterr().out
    assert old.is_dir()  # info changes nothing
    assert cli.main(["cache", "clear", "--cache", str(folder)]) == 0
    assert "and 1 leftover from" in capsys.readouterr().out
    assert not old.exists() and fresh.is_dir() and foreign.read_text() == "mine"


def test_next_writer_removes_orphans(tmp_path):
    folder = tmp_path / "c.zarr"
    store = _store_with_entry(folder)
    old, fresh = _tmp_entry(store), _tmp_entry(store)
    probe = folder / "tmp" / f".probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    _age(old, ORPHAN_AGE_S + 60)
    _age(probe, ORPHAN_AGE_S + 60)
    reopened = EmbeddingStore(folder)
    assert not old.exists() and not probe.exists() and fresh.is_dir()
    assert reopened.orphans() == [] and reopened.disk_entries() == [KEY]


# ------------------------------------------------------------------ --overwrite


def _refused(argv, capsys, folder: Path, *words) -> None:
    before = _snapshot(folder)
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    _one_line(cap.err, "error")
    for w in words:
        assert w in cap.err, cap.err
    assert cap.out == "" and _snapshot(folder) == before


def test_overwrite_never_deletes_the_folder_holding_the_input(work, tiny_tracker_dir, capsys):
    """The issue's reproduction: segment proj.zarr/raw.zarr --out proj.zarr --overwrite."""
    proj = work / "proj.zarr"
    group = zarr.open_group(proj, mode="w", zarr_format=3)
    group.create_array("raw.zarr", shape=(H, W), dtype="u2")[...] = tifffile.imread(
        work / "img.tif")
    (proj / "notes.txt").write_text("mine")
    argv = _segment(work, tiny_tracker_dir, proj, "--overwrite", image=proj / "raw.zarr")
    _refused(argv, capsys, work, "refusing to overwrite", "holds the input image")


def test_overwrite_never_replaces_the_input_itself(work, tiny_tracker_dir, capsys):
    argv = _segment(work, tiny_tracker_dir, work / "img.tif", "--overwrite")
    _refused(argv, capsys, work, "is the input image")


def test_overwrite_never_replaces_a_folder_named_like_a_tiff(work, tiny_tracker_dir, capsys):
    (work / "X.tif").mkdir()
    (work / "X.tif" / "photo.txt").write_text("mine")
    argv = _segment(work, tiny_tracker_dir, work / "X.tif", "--overwrite")
    _refused(argv, capsys, work, "is a folder")


def test_overwrite_never_replaces_a_folder_as_the_scores_file(work, tiny_tracker_dir, capsys):
    (work / "out.csv").mkdir()
    (work / "out.csv" / "photo.txt").write_text("mine")
    argv = ["segment", str(work / "img.tif"), "--everything", "--out", str(work / "out.tif"),
            "--model", str(tiny_tracker_dir), "--device", "cpu", "--overwrite"]
    _refused(argv, capsys, work, "out.csv", "is a folder")


def _foreign_zarr(path: Path) -> None:
    zarr.open_group(path, mode="w", zarr_format=3, attributes={"me": 1}).create_array(
        "0", shape=(4, 4), dtype="i4")


def _our_zarr_with_extra_file(path: Path) -> None:
    io.write_labels_zarr(path, np.ones((4, 4), np.int32))
    (path / "notes.txt").write_text("mine")


@pytest.mark.parametrize("make", [_foreign_zarr, _our_zarr_with_extra_file],
                         ids=["foreign", "ours plus a file"])
def test_overwrite_never_replaces_a_foreign_zarr(work, tiny_tracker_dir, capsys, make):
    make(work / "out.zarr")
    argv = _segment(work, tiny_tracker_dir, work / "out.zarr", "--overwrite")
    _refused(argv, capsys, work, "not a labels Zarr written by napari-sam3")


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_overwrite_replaces_our_own_output_again(work, tiny_tracker_dir, expected, name):
    out = work / name
    for _ in range(3):  # a first write, then twice over its own output
        assert cli.main(_segment(work, tiny_tracker_dir, out, "--overwrite")) == 0
        np.testing.assert_array_equal(io.read_labels(out), expected)
    assert io.is_labels_zarr(out) == (name == "out.zarr")
    side = [f"{name}.json"] if name.endswith(".tif") else []  # the provenance sidecar
    assert sorted(p.name for p in work.iterdir()) == sorted(["img.tif", "prompts.json", name,
                                                             *side])


def test_labels_zarr_marker_survives_score_attributes(tmp_path):
    path = tmp_path / "l.zarr"
    io.create_labels_zarr(path, (4, 4))
    assert io.is_labels_zarr(path)
    output.write_scores_attrs(path, "everything", {}, [])
    assert io.is_labels_zarr(path)
    assert zarr.open_group(path, mode="r").attrs["napari_sam3"]["mode"] == "everything"


# ------------------------------------------------------------------ staging leftovers


def test_stale_staging_folders_are_removed_by_the_next_run(work, tiny_tracker_dir, monkeypatch):
    out = work / "out.zarr"
    names = []
    real_commit = output.commit

    def spy(staged, target, overwrite):
        names.append(staged.parent.name)
        real_commit(staged, target, overwrite)

    monkeypatch.setattr("napari_sam3._cli.segment_prompts.commit", spy)
    assert cli.main(_segment(work, tiny_tracker_dir, out)) == 0
    (name,) = names
    assert name.startswith(".out.zarr.napari-sam3-") and name.endswith(".partial")
    assert not (work / name).exists()

    killed = work / name  # what a killed run leaves: its staging folder, half written
    io.create_labels_zarr(killed / "out.zarr", (H, W))
    _age(killed, output.STALE_STAGING_S + 60)
    running = work / name.replace(".partial", "x.partial")  # a run still writing
    io.create_labels_zarr(running / "out.zarr", (H, W))
    _age(running, output.STALE_STAGING_S + 60)
    os.utime(next((running / "out.zarr" / "0").rglob("zarr.json")))  # written just now
    mine = work / ".out.zarr.mine.partial"  # not ours by name
    mine.mkdir()
    _age(mine, output.STALE_STAGING_S + 60)
    assert output.stale_staging(out) == [killed]
    assert cli.main(_segment(work, tiny_tracker_dir, out, "--overwrite")) == 0
    assert not killed.exists() and running.is_dir() and mine.is_dir()
