"""Provenance with every label: the schema round-trips, the prompts stored are the prompts
given (API and CLI), ``replay`` gives identical labels (2D prompts, a propagated stack, a
concept run, segment-everything) and reports a changed pixel or model in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_sam3 import ObjectPrompt, Sam3Segmenter, cli
from napari_sam3.core import io, replay
from napari_sam3.core.prompts import prompt_bbox
from napari_sam3.core.provenance import (
    SCHEMA,
    VERSION,
    Provenance,
    ProvenanceError,
    decode_mask,
    decode_values,
    encode_mask,
    encode_values,
    external_op,
)

H, W = 60, 90
OBJECTS = [
    {"points": [[20, 30]], "labels": [1]},
    {"points": [[40, 60], [45, 70]], "labels": [1, 0]},
    {"box": [5, 50, 30, 85]},
    {"points": [[50, 20]], "box": [40, 5, 58, 40], "id": 7},
]
OPEN = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--min-area", "0"]


def _image(shape=(H, W), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    base = 1000 + 800 * np.sin(rows / 6.0) * np.cos(cols / 9.0) + 3 * cols
    return (base + rng.normal(0, 60, base.shape)).astype(np.uint16)


@pytest.fixture
def work(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", _image())
    (tmp_path / "prompts.json").write_text(json.dumps(OBJECTS))
    return tmp_path


@pytest.fixture(scope="module")
def tiled(tiny_tracker_dir):
    """Tiles of 48 px with 16 px overlap: objects are routed to tiles."""
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=48,
                                         overlap=16)


def _seg(image, out, model, *extra) -> list[str]:
    return ["segment", str(image), "--out", str(out), "--model", str(model), "--device", "cpu",
            *map(str, extra)]


def _replay(labels, out, *extra) -> list[str]:
    return ["replay", str(labels), "--out", str(out), *map(str, extra)]


def _prompts(objs):
    return [ObjectPrompt.from_dict({k: v for k, v in o.items() if k != "id"}) for o in objs]


# --------------------------------------------------------------------------- the schema


def test_schema_round_trips(tiny_segmenter):
    img = _image()
    log = Provenance.start(tiny_segmenter, img, path="/data/img.tif", labels_shape=img.shape)
    mask = np.zeros((H, W), bool)
    mask[10:20, 30:47] = True
    mask[12, 31] = False
    labels = replay.segment(log, tiny_segmenter, img,
                            [*_prompts(OBJECTS[:2]), ObjectPrompt(mask=mask)], ids=[1, 2, 3])
    edit = labels[0:10, 0:12].copy()
    edit[2:5, 3:6] = 9
    log.append(external_op("brush", edit, bbox=(0, 0, 10, 12)))
    d = log.to_dict()
    assert d["schema"] == SCHEMA and d["version"] == VERSION
    assert d["model"]["fingerprint"] == tiny_segmenter.fingerprint
    assert d["image"]["fingerprint"]["kind"] == "full"
    assert [op["kind"] for op in d["operations"]] == ["prompts", "brush"]
    back = Provenance.from_json(log.to_json())
    assert back.to_dict() == d
    assert json.loads(back.to_json(indent=1)) == json.loads(log.to_json())
    np.testing.assert_array_equal(decode_mask(d["operations"][0]["objects"][2]["mask"]), mask)
    assert encode_mask(np.zeros((3, 3), bool)) is None
    np.testing.assert_array_equal(decode_values(encode_values(edit), edit.shape), edit)
    assert d["operations"][1]["ids"] == sorted(set(np.unique(edit).tolist()) - {0})
    with pytest.raises(ProvenanceError, match="newer"):
        Provenance.from_dict({**d, "version": VERSION + 1})
    with pytest.raises(ProvenanceError, match="not a napari-sam3"):
        Provenance.from_dict({"operations": []})
    # the brush edit is written back as stored
    again = replay.replay(back, img, tiny_segmenter)
    want = labels.copy()
    want[0:10, 0:12] = edit
    np.testing.assert_array_equal(again, want)


def test_imported_labels_by_reference(tiny_segmenter, tmp_path):
    img = _image()
    theirs = np.zeros((H, W), np.int32)
    theirs[30:50, 10:40] = 12
    io.write_labels(tmp_path / "cellpose.tif", theirs)
    log = Provenance.start(tiny_segmenter, img, labels_shape=img.shape)
    log.append(external_op("import", None, source=str(tmp_path / "cellpose.tif")))
    labels = replay.segment(log, tiny_segmenter, img, _prompts(OBJECTS[:1]), ids=[13],
                            out=theirs.copy())
    np.testing.assert_array_equal(replay.replay(log, img, tiny_segmenter), labels)
    assert [op["kind"] for op in log.operations] == ["import", "prompts"]
    (tmp_path / "cellpose.tif").unlink()
    with pytest.raises(ProvenanceError, match="cannot be replayed"):
        replay.replay(log, img, tiny_segmenter)


def test_a_second_wait_also_waits_for_a_late_fingerprint():
    import sys
    import threading

    rec, go = Provenance(), threading.Event()
    where = {}
    rec.fill_later(where, "fingerprint", lambda: go.wait() and {"kind": "full", "value": "x"})
    assert where == {"fingerprint": None}  # the key is there at once: the dict keeps its size
    first = threading.Thread(target=rec.wait)
    first.start()
    for _ in range(100_000):  # until the first waiter is joining the fingerprint thread
        frames = sys._current_frames().get(first.ident)
        names = set()
        while frames is not None:
            names.add(frames.f_code.co_name)
            frames = frames.f_back
        if "join" in names:
            break
        threading.Event().wait(0.001)
    got = []
    second = threading.Thread(target=lambda: (rec.wait(), got.append(dict(where))))
    second.start()
    go.set()
    first.join()
    second.join()
    assert got == [{"fingerprint": {"kind": "full", "value": "x"}}]


# --------------------------------------------------------------------------- the API


def test_api_records_the_prompts_and_tiles(tiled):
    img = _image((100, 130), seed=3)
    prompts = _prompts(OBJECTS)
    ids = [1, 2, 3, 7]
    want = tiled.segment(img, prompts, ids=ids)
    log = Provenance.start(tiled, img, labels_shape=img.shape)
    got = replay.segment(log, tiled, img, prompts, ids=ids)
    np.testing.assert_array_equal(got, want)
    assert len(set(np.unique(want).tolist()) - {0}) >= 3  # a real comparison
    (op,) = log.operations
    grid = tiled.tiles(img)
    for rec, obj, p, i in zip(op["objects"], OBJECTS, prompts, ids, strict=True):
        assert rec["id"] == i
        assert rec["points"] == obj.get("points", [])
        assert rec["labels"] == obj.get("labels", [1] * len(obj.get("points", [])))
        assert rec["box"] == obj.get("box")
        t = grid.route(prompt_bbox(p))
        assert rec["tile"] == [t.r0, t.c0, t.r1, t.c1]
        assert isinstance(rec["iou_score"], float) and isinstance(rec["object_score"], float)
    again = replay.replay(Provenance.from_json(log.to_json()), img, tiled)
    np.testing.assert_array_equal(again, want)


def test_replay_decodes_in_the_recorded_tile(tiled):
    """A widget may route an object to an encoded tile other than the fixed rule's: the
    replay uses the recorded one."""
    img = _image((100, 130), seed=4)
    p = ObjectPrompt(points=[[40, 40]])
    grid = tiled.tiles(img)
    best = grid.route(prompt_bbox(p))
    other = next(t for t in grid.tiles if t != best and t.intersects((40, 40, 41, 41))
                 and grid.margin(t, prompt_bbox(p)) >= 0)
    box = [other.r0, other.c0, other.r1, other.c1]
    log = Provenance.start(tiled, img, labels_shape=img.shape)
    chosen = replay.segment(log, tiled, img, [p], tiles=[box])
    assert log.operations[0]["objects"][0]["tile"] == box
    fixed = tiled.segment(img, [p])
    assert not np.array_equal(chosen, fixed)  # the tile matters for this object
    np.testing.assert_array_equal(replay.replay(log, img, tiled), chosen)


def test_mismatches_name_what_differs(tiny_segmenter, tiny_tracker_dir, tmp_path):
    from napari_sam3.testing import save_random_tracker

    img = _image()
    log = Provenance.start(tiny_segmenter, img)
    assert log.mismatches(tiny_segmenter, img) == []
    edited = img.copy()
    edited[0, 0] += 1
    assert log.mismatches(image=edited) == ["image pixels differ"]
    other = Sam3Segmenter.from_pretrained(str(save_random_tracker(tmp_path / "m", seed=1)),
                                          device="cpu", tile_size=1024)
    assert "weights differ" in log.mismatches(other)


# --------------------------------------------------------------------------- the CLI


def test_cli_tif_sidecar_and_replay(work, tiny_tracker_dir, tmp_path, capsys):
    out = work / "out.tif"
    assert cli.main(_seg(work / "img.tif", out, tiny_tracker_dir, "--prompts",
                         work / "prompts.json")) == 0
    side = work / "out.tif.json"
    record = Provenance.from_json(side.read_text())
    (op,) = record.operations
    assert [o["id"] for o in op["objects"]] == [1, 2, 3, 7]
    for rec, obj in zip(op["objects"], OBJECTS, strict=True):
        assert rec["points"] == obj.get("points", [])
        assert rec["labels"] == obj.get("labels", [1] * len(obj.get("points", [])))
        assert rec["box"] == obj.get("box")
    assert record.image["path"] == str((work / "img.tif").absolute())
    capsys.readouterr()
    again = work / "again.zarr"
    assert cli.main(_replay(out, again)) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(io.read_labels(again), io.read_labels(out))
    assert len(set(np.unique(io.read_labels(out)).tolist()) - {0}) >= 3

    # a changed pixel: one line, exit 2, nothing written; --force replays
    edited = tifffile.imread(work / "img.tif")
    edited[3, 4] += 7
    tifffile.imwrite(work / "edited.tif", edited)
    capsys.readouterr()
    rc = cli.main(_replay(out, work / "x.tif", "--image", work / "edited.tif"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "image pixels differ" in err
    assert "--force" in err and not (work / "x.tif").exists()
    assert cli.main(_replay(out, work / "x.tif", "--image", work / "edited.tif", "--force")) == 0
    assert (work / "x.tif").exists() and (work / "x.tif.json").exists()

    # another model: one line, exit 2; --force replays
    from napari_sam3.testing import save_random_tracker

    other = save_random_tracker(tmp_path / "other", seed=1)
    capsys.readouterr()
    rc = cli.main(_replay(out, work / "y.zarr", "--model", other))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "weights differ" in err
    assert not (work / "y.zarr").exists()
    assert cli.main(_replay(out, work / "y.zarr", "--model", other, "--force")) == 0

    # the sidecar goes with the TIFF: an existing one is refused without --overwrite
    (work / "z.tif.json").write_text("{}")
    capsys.readouterr()
    rc = cli.main(_seg(work / "img.tif", work / "z.tif", tiny_tracker_dir, "--prompts",
                       work / "prompts.json"))
    assert rc == 2 and "z.tif.json" in capsys.readouterr().err
    assert not (work / "z.tif").exists()


def test_cli_propagated_stack_replays(tmp_path, capsys):
    from napari_sam3.testing import save_random_video_tracker

    video = save_random_video_tracker(tmp_path / "video", seed=0)
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:48, 0:64]
    stack = np.stack([500 + 2000 * (((rows - 24) ** 2 + (cols - 20 - 4 * z) ** 2) <= 100)
                      + rng.normal(0, 100, (48, 64)) for z in range(5)]).astype(np.uint16)
    np.save(tmp_path / "stack.npy", stack)
    objects = [{"points": [[24, 28]], "slice": 2}, {"box": [5, 40, 20, 60], "slice": 2}]
    (tmp_path / "p.json").write_text(json.dumps(objects))
    out = tmp_path / "out.zarr"
    assert cli.main(_seg(tmp_path / "stack.npy", out, video, "--prompts", tmp_path / "p.json",
                         "--propagate", "both")) == 0
    record = Provenance.from_dict(
        zarr.open_group(out, mode="r").attrs["napari_sam3"]["provenance"])
    (op,) = record.operations
    assert op["kind"] == "propagation" and op["direction"] == "both"
    assert [(o["slice"], o["points"], o["box"]) for o in op["objects"]] == [
        (2, [[24, 28]], None), (2, [], [5, 40, 20, 60])]
    assert sorted(s["slice"] for s in op["slices"]) == list(range(5))
    labels = io.read_labels(out)
    assert (labels > 0).any(axis=(1, 2)).sum() >= 3  # tracked over several slices
    capsys.readouterr()
    assert cli.main(_replay(out, tmp_path / "again.tif")) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(io.read_labels(tmp_path / "again.tif"), labels)


def test_cli_concept_replays(work, tmp_path, capsys):
    from napari_sam3.testing_concept import save_random_concept_model

    concept = save_random_concept_model(tmp_path / "concept", seed=0)
    out = work / "c.zarr"
    assert cli.main(_seg(work / "img.tif", out, concept, "--text", "cell", "--threshold",
                         "0.249")) == 0
    labels = io.read_labels(out)
    assert labels.max() >= 2
    capsys.readouterr()
    assert cli.main(_replay(out, work / "again.tif")) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(io.read_labels(work / "again.tif"), labels)
    record = Provenance.from_json((work / "again.tif.json").read_text())
    (op,) = record.operations
    assert op["kind"] == "concept" and op["text"] == "cell" and op["threshold"] == 0.249
    assert [r["id"] for r in op["instances"]] == list(range(1, labels.max() + 1))


def test_cli_everything_on_a_stack_replays(tiny_tracker_dir, tmp_path, capsys):
    stack = np.stack([_image((48, 64), seed=s) for s in (5, 6)])
    np.save(tmp_path / "stack.npy", stack)
    out = tmp_path / "e.tif"
    assert cli.main(_seg(tmp_path / "stack.npy", out, tiny_tracker_dir, "--everything",
                         "--points-per-side", 4, *OPEN)) == 0
    labels = io.read_labels(out)
    assert labels.max() >= 2
    capsys.readouterr()
    assert cli.main(_replay(out, tmp_path / "again.zarr")) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(io.read_labels(tmp_path / "again.zarr"), labels)
    op = Provenance.from_json((tmp_path / "e.tif.json").read_text()).operations[0]
    assert op["kind"] == "everything" and op["settings"]["points_per_side"] == 4
    assert op["slices"] == [0, 1]


def test_replay_without_provenance_is_one_line(work, capsys):
    tifffile.imwrite(work / "plain.tif", np.zeros((4, 4), np.uint16))
    rc = cli.main(_replay(work / "plain.tif", work / "o.tif"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no provenance" in err
    assert not Path(work / "o.tif").exists()


def test_napari_writers_keep_the_provenance_with_the_labels(tiny_segmenter, tmp_path):
    """What the widget's save goes through: a layer's provenance goes with its labels;
    a sidecar of ours that no longer describes a TIFF is removed, anyone else's kept."""
    import zarr

    from napari_sam3 import _writers

    img = _image()
    log = Provenance.start(tiny_segmenter, img, labels_shape=img.shape)
    labels = replay.segment(log, tiny_segmenter, img, _prompts(OBJECTS[:2]))
    meta = {"name": "labels", "metadata": {_writers.PROVENANCE_KEY: log}}
    (tif,) = _writers.write_labels_tif(str(tmp_path / "w.tif"), labels, meta)
    assert Provenance.from_json(Path(tif + ".json").read_text()).to_dict() == log.to_dict()
    (zpath,) = _writers.write_labels_zarr(str(tmp_path / "w.zarr"), labels, meta)
    attrs = zarr.open_group(zpath, mode="r").attrs["napari_sam3"]
    assert attrs["provenance"] == log.to_dict() and io.is_labels_zarr(zpath)
    _writers.write_labels_tif(str(tmp_path / "w.tif"), labels * 0, {"name": "edited"})
    assert not Path(tif + ".json").exists()
    Path(tif + ".json").write_text('{"mine": 1}')
    _writers.write_labels_tif(str(tmp_path / "w.tif"), labels, {"name": "again"})
    assert Path(tif + ".json").read_text() == '{"mine": 1}'
    with pytest.warns(UserWarning, match="not a provenance record of ours"):
        _writers.write_labels_tif(str(tmp_path / "w.tif"), labels, meta)  # with a record
    assert Path(tif + ".json").read_text() == '{"mine": 1}'  # someone else's: never touched


def test_delete_and_merge_ops_replay_exact_ids_on_a_slice_or_everywhere():
    from napari_sam3.core.provenance import (
        KINDS,
        Provenance,
        edit_op,
        external_op,
    )
    from napari_sam3.core.replay import replay

    assert {"delete", "merge"} <= set(KINDS)
    start = np.zeros((3, 6, 8), np.int32)
    start[:, 1:3, 1:4] = 2
    start[:, 4:6, 5:8] = 5
    start[1, 0, 0] = 9
    rec = Provenance(labels={"shape": [3, 6, 8]}, image={"axis": 0, "fixed": {}})
    rec.append(external_op("import", start))
    rec.append(edit_op("delete", [2], slice_index=1))
    rec.append(edit_op("merge", [9, 5], into=2, slice_index=None))
    rec = Provenance.from_json(rec.to_json())
    out = replay(rec, np.zeros((3, 6, 8), np.float32), None)
    want = start.copy()
    want[1][want[1] == 2] = 0
    want[np.isin(want, [9, 5])] = 2
    np.testing.assert_array_equal(out, want)
    assert rec.operations[2] == {"kind": "merge", "slice": None, "ids": [5, 9], "into": 2}
    props = {p["label-value"] for p in rec.label_properties()}
    assert 5 not in props and 9 not in props and 2 in props
