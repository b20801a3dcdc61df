"""``napari-sam3 segment --text/--exemplars`` (concept) and ``--everything`` on tiny random
checkpoints: the labels equal the Python API's, scores are written next to them, and bad
input is one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_sam3 import Sam3Segmenter, cli
from napari_sam3.core import io
from napari_sam3.core.concept import ConceptSegmenter
from napari_sam3.core.defaults import DEFAULT_THRESHOLD
from napari_sam3.core.everything import SETTINGS, EverythingSettings

H, W = 60, 90
THRESHOLD = 0.249  # the tiny random detector scores ~0.25: this keeps about half
EXEMPLARS = [[5, 5, 30, 40], {"box": [40, 60, 58, 88], "positive": False}]
# the random tracker's masks are near-identical: open filters keep a few per tile
OPEN = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--min-area", "0"]
OPEN_API = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=0)


def textured(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = np.sin(rows / 5.0) * np.cos(cols / 7.0) * 800 + 1000 + 3 * cols
    return (base + rng.normal(0, 150, base.shape)).astype(np.uint16)


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    from napari_sam3.testing_concept import save_random_concept_model

    return save_random_concept_model(tmp_path_factory.mktemp("cli_concept"), seed=0)


@pytest.fixture(scope="module")
def concept(concept_dir):
    """The API side: the detector with its default tiling (the CLI's default too)."""
    return ConceptSegmenter.from_pretrained(str(concept_dir), device="cpu")


@pytest.fixture
def work(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", textured((H, W)))
    (tmp_path / "exemplars.json").write_text(json.dumps(EXEMPLARS))
    return tmp_path


def _segment(image, out, model, *extra) -> list[str]:
    return [
        "segment",
        str(image),
        "--out",
        str(out),
        "--model",
        str(model),
        "--device",
        "cpu",
        *map(str, extra),
    ]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _scores(out: Path) -> list[dict]:
    """The instance table written with ``out``: OUT.csv for TIFF, attributes for Zarr."""
    if out.suffix == ".zarr":
        return zarr.open_group(out, mode="r").attrs["napari_sam3"]["instances"]
    with open(out.with_suffix(".csv"), newline="") as f:
        return [
            {
                k: (
                    float(v)
                    if k in ("score", "presence", "iou_score", "stability_score")
                    else int(v)
                )
                for k, v in row.items()
            }
            for row in csv.DictReader(f)
        ]


def _check_scores(out: Path, labels: np.ndarray, stack: bool = False) -> list[dict]:
    rows = _scores(out)
    ids = sorted(set(np.unique(labels).tolist()) - {0})
    assert [r["id"] for r in rows] == ids  # one row per label id, in id order
    counts = np.bincount(labels.ravel())
    assert [r["area"] for r in rows] == [int(counts[i]) for i in ids]
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    if stack:
        for r in rows:
            assert (labels[r["slice"]] == r["id"]).sum() == r["area"]
    return rows


# ----------------------------------------------------------------------------- concept


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_text_equals_api(work, concept, concept_dir, capsys, name):
    img = tifffile.imread(work / "img.tif")
    want = concept.segment_concept(img, "nucleus", threshold=THRESHOLD)
    assert len(np.unique(want)) > 2  # several instances: a real comparison
    out = work / name
    rc = cli.main(
        _segment(work / "img.tif", out, concept_dir, "--text", "nucleus", "--threshold", THRESHOLD)
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = io.read_labels(out)
    np.testing.assert_array_equal(got, want)
    rows = _check_scores(out, got)
    assert all(r["score"] > THRESHOLD for r in rows) and "presence" in rows[0]
    res = concept.detect(img, "nucleus", threshold=THRESHOLD)
    res.paint()
    np.testing.assert_array_equal([r["score"] for r in rows], res.features["score"])
    # one summary line: instances found, output, scores
    assert cap.out.count("\n") == 1
    assert f"found {len(rows)} instances of 'nucleus'" in cap.out and str(out) in cap.out
    extra = [] if name.endswith(".zarr") else ["out.csv", "out.tif.json"]
    assert _listing(work) == sorted(
        [
            "img.tif",
            "exemplars.json",
            *extra,
            *[str(p.relative_to(work)) for p in [out, *out.rglob("*")]],
        ]
    )


def test_text_and_exemplars_equal_api(work, concept, concept_dir, capsys):
    img = tifffile.imread(work / "img.tif")
    want = concept.segment_concept(
        img, "cell", [[5, 5, 30, 40], [40, 60, 58, 88]], THRESHOLD, exemplar_labels=[1, 0]
    )
    assert len(np.unique(want)) > 2
    out = work / "ex.tif"
    rc = cli.main(
        _segment(
            work / "img.tif",
            out,
            concept_dir,
            "--text",
            "cell",
            "--exemplars",
            work / "exemplars.json",
            "--threshold",
            THRESHOLD,
        )
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    np.testing.assert_array_equal(io.read_labels(out), want)
    assert "2 exemplar boxes" in cap.out
    # exemplars alone, and the default threshold (0.5: nothing from a random model)
    only = concept.segment_concept(img, exemplars=[[5, 5, 30, 40]], threshold=THRESHOLD)
    (work / "one.json").write_text(json.dumps([[5, 5, 30, 40]]))
    assert (
        cli.main(
            _segment(
                work / "img.tif",
                work / "one.zarr",
                concept_dir,
                "--exemplars",
                work / "one.json",
                "--threshold",
                THRESHOLD,
            )
        )
        == 0
    )
    np.testing.assert_array_equal(io.read_labels(work / "one.zarr"), only)
    assert (
        cli.main(_segment(work / "img.tif", work / "dflt.zarr", concept_dir, "--text", "cell")) == 0
    )
    attrs = zarr.open_group(work / "dflt.zarr", mode="r").attrs["napari_sam3"]
    assert attrs["mode"] == "concept" and attrs["settings"]["threshold"] == DEFAULT_THRESHOLD
    np.testing.assert_array_equal(
        io.read_labels(work / "dflt.zarr"), concept.segment_concept(img, "cell")
    )


def test_concept_on_a_stack(work, concept, concept_dir, capsys):
    stack = np.stack([textured((48, 64), seed=s) for s in (1, 2, 3)])
    tifffile.imwrite(work / "stack.tif", stack)
    lim = (800.0, 2200.0)  # the API's stack limits differ from the CLI's: give both the same
    want = concept.segment_concept(stack, "nucleus", threshold=THRESHOLD, limits=lim)
    out = work / "stack_labels.tif"
    rc = cli.main(
        _segment(
            work / "stack.tif",
            out,
            concept_dir,
            "--text",
            "nucleus",
            "--threshold",
            THRESHOLD,
            "--limits",
            *lim,
        )
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = io.read_labels(out)
    assert got.shape == (3, 48, 64)
    np.testing.assert_array_equal(got, want)
    per_slice = [set(np.unique(s).tolist()) - {0} for s in got]
    assert (
        all(per_slice) and not (per_slice[0] & per_slice[1]) and not (per_slice[1] & per_slice[2])
    )  # ids unique across slices
    rows = _check_scores(out, got, stack=True)
    assert {r["slice"] for r in rows} == {0, 1, 2}
    assert "slice 2 segmented" in cap.out and "on 3 of 3 slices" in cap.out


# -------------------------------------------------------------------------- everything


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_everything_equals_api(work, tiny_segmenter, tiny_tracker_dir, capsys, name):
    img = tifffile.imread(work / "img.tif")
    settings = EverythingSettings(points_per_side=8, points_per_batch=16, **OPEN_API)
    want = tiny_segmenter.segment_everything(img, settings=settings)
    assert want.max() >= 1
    out = work / name
    rc = cli.main(
        _segment(
            work / "img.tif",
            out,
            tiny_tracker_dir,
            "--everything",
            "--points-per-side",
            8,
            "--points-per-batch",
            16,
            *OPEN,
        )
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = io.read_labels(out)
    np.testing.assert_array_equal(got, want)
    rows = _check_scores(out, got)
    assert {"iou_score", "stability_score"} <= set(rows[0])
    assert cap.out.count("\n") == 1 and f"found {len(rows)} object" in cap.out
    if name.endswith(".zarr"):
        attrs = zarr.open_group(out, mode="r").attrs["napari_sam3"]
        assert attrs["mode"] == "everything"
        assert attrs["settings"]["points_per_side"] == 8
        assert attrs["settings"]["box_nms_thresh"] == SETTINGS.box_nms_thresh


@pytest.fixture
def large(tmp_path):
    """A 150x190 Zarr image: 2 x 2 tiles of 112 px with 32 px overlap."""
    img = textured((150, 190), seed=4)
    arr = zarr.create_array(
        tmp_path / "big.zarr", shape=img.shape, chunks=(64, 64), dtype=img.dtype
    )
    arr[...] = img
    return tmp_path


TILES = ["--tile", "112", "--overlap", "32", "--cache-dtype", "float32"]


def test_large_zarr_tile_by_tile(large, concept_dir, tiny_tracker_dir, capsys):
    """Zarr in, Zarr out, tile by tile; the API's run fills a float32 cache (exact) that the
    CLI then reads (--cache): no tile is encoded twice."""
    arr = zarr.open_array(large / "big.zarr", mode="r")
    cache = large / "cache"
    api = ConceptSegmenter.from_pretrained(
        str(concept_dir),
        device="cpu",
        tile_size=112,
        overlap=32,
        cache=cache,
        cache_dtype="float32",
    )
    want = api.segment_concept(arr, "nucleus", threshold=THRESHOLD)
    assert api.encoder_calls == 4 and len(np.unique(want)) > 2
    entries = len(api.store.disk_entries())
    out = large / "concept.zarr"
    argv = _segment(
        large / "big.zarr",
        out,
        concept_dir,
        "--text",
        "nucleus",
        "--threshold",
        THRESHOLD,
        "--cache",
        cache,
        *TILES,
    )
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "tile 4/4 done" in cap.out
    got = zarr.open_array(out / "0", mode="r")
    assert got.shape == (150, 190) and got.dtype == np.int32
    np.testing.assert_array_equal(got[...], want)
    _check_scores(out, got[...])
    assert len(api.store.disk_entries()) == entries  # same tiles, same keys: read, not added

    seg = Sam3Segmenter.from_pretrained(
        str(tiny_tracker_dir),
        device="cpu",
        tile_size=112,
        overlap=32,
        cache=cache,
        cache_dtype="float32",
    )
    want = seg.segment_everything(arr, points_per_side=4, **OPEN_API)
    assert want.max() > 1
    out = large / "everything.zarr"
    argv = _segment(
        large / "big.zarr",
        out,
        tiny_tracker_dir,
        "--everything",
        "--points-per-side",
        4,
        *OPEN,
        "--cache",
        cache,
        *TILES,
    )
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "tile 4/4 done" in cap.out
    got = io.read_labels(out)
    np.testing.assert_array_equal(got, want)
    _check_scores(out, got)
    assert len(seg.store.disk_entries()) == entries + 4  # tracker tiles: own keys, once


def test_everything_on_a_stack_into_zarr(work, tiny_segmenter, tiny_tracker_dir, capsys):
    stack = np.stack([textured((48, 64), seed=s) for s in (5, 6, 7)])
    np.save(work / "stack.npy", stack)
    lim = (800.0, 2200.0)
    want = tiny_segmenter.segment_everything(stack, points_per_side=4, limits=lim, **OPEN_API)
    out = work / "stack.zarr"
    rc = cli.main(
        _segment(
            work / "stack.npy",
            out,
            tiny_tracker_dir,
            "--everything",
            "--points-per-side",
            4,
            "--limits",
            *lim,
            *OPEN,
        )
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = io.read_labels(out)
    np.testing.assert_array_equal(got, want)
    rows = _check_scores(out, got, stack=True)
    assert len({r["slice"] for r in rows}) == 3
    assert len({r["id"] for r in rows}) == len(rows)  # unique across slices


# --------------------------------------------------------------------------- bad input


def _bad_cases(work: Path, tracker: Path, concept_model: Path) -> dict:
    """name -> (argv after 'segment IMAGE --out OUT.tif --device cpu', words in the error)."""
    files = {
        "bad.json": "[[1, 2, 3, 4],",
        "dict.json": json.dumps({"box": [1, 2, 3, 4]}),
        "empty.json": "[]",
        "three.json": json.dumps([[1, 2, 3]]),
        "outside.json": json.dumps([[0, 95, 10, 120]]),  # columns beyond the 90 px width
        "nan.json": "[[0, 0, NaN, 5]]",
        "positive.json": json.dumps([{"box": [1, 2, 10, 10], "positive": "no"}]),
        "unknown.json": json.dumps([{"box": [1, 2, 10, 10], "label": 0}]),
        "nobox.json": json.dumps([{"positive": True}]),
        "prompts.json": json.dumps([{"points": [[10, 10]]}]),
    }
    for name, text in files.items():
        (work / name).write_text(text)
    (work / "out.csv").write_bytes(b"keep me")
    text = ["--text", "cell", "--model", concept_model]
    every = ["--everything", "--model", tracker]
    return {
        "no mode": ([], "give --prompts"),
        "text and prompts": ([*text, "--prompts", work / "prompts.json"], "cannot be combined"),
        "everything and text": ([*text, "--everything"], "cannot be combined"),
        "everything and prompts": (
            [*every, "--prompts", work / "prompts.json"],
            "cannot be combined",
        ),
        "empty text": (["--text", "  ", "--model", concept_model], "empty"),
        "threshold above 1": ([*text, "--threshold", "1.5"], "between 0 and 1"),
        "threshold not a number": ([*text, "--threshold", "high"], "expected a number"),
        "threshold without concept": ([*every, "--threshold", "0.3"], "only apply with --text"),
        "concept model with everything": (
            [*every, "--concept-model", concept_model],
            "only apply with --text",
        ),
        "points with text": ([*text, "--points-per-side", "4"], "only apply with --everything"),
        "zero points per side": ([*every, "--points-per-side", "0"], "1 or more"),
        "points per batch not whole": ([*every, "--points-per-batch", "2.5"], "whole number"),
        "iou threshold out of range": ([*every, "--pred-iou-thresh", "-0.1"], "between 0 and 1"),
        "stability nan": ([*every, "--stability-score-thresh", "nan"], "finite"),
        "negative min area": ([*every, "--min-area", "-3"], "0 or more"),
        "min area with prompts": (
            ["--prompts", work / "prompts.json", "--min-area", "5", "--model", tracker],
            "--min-area only applies",
        ),
        "propagate with text": ([*text, "--propagate", "both"], "only applies with --prompts"),
        "start without propagate": ([*every, "--start", "1"], "only apply with --propagate"),
        "exemplars missing": ([*text, "--exemplars", work / "nope.json"], "no such file"),
        "exemplars bad json": ([*text, "--exemplars", work / "bad.json"], "not valid JSON"),
        "exemplars not a list": ([*text, "--exemplars", work / "dict.json"], "JSON list"),
        "exemplars empty": ([*text, "--exemplars", work / "empty.json"], "no boxes"),
        "exemplar of 3 numbers": ([*text, "--exemplars", work / "three.json"], "4 numbers"),
        "exemplar outside": (
            [*text, "--exemplars", work / "outside.json"],
            "outside the 60x90 image",
        ),
        "exemplar nan": ([*text, "--exemplars", work / "nan.json"], "NaN"),
        "exemplar positive not bool": (
            [*text, "--exemplars", work / "positive.json"],
            "true or false",
        ),
        "exemplar unknown key": ([*text, "--exemplars", work / "unknown.json"], "unknown key"),
        "exemplar without box": ([*text, "--exemplars", work / "nobox.json"], "needs a 'box'"),
        "scores csv exists": ([*every, "--out", work / "out.tif"], "--overwrite"),
        "tracker-only checkpoint for text": (
            ["--text", "cell", "--model", tracker],
            "concept detector",
        ),
        "concept model missing": (
            [*text, "--concept-model", work / "no" / "model"],
            "no such folder",
        ),
        "bad device": ([*every, "--device", "tpu"], "device"),
    }


BAD_CASES = [
    "no mode",
    "text and prompts",
    "everything and text",
    "everything and prompts",
    "empty text",
    "threshold above 1",
    "threshold not a number",
    "threshold without concept",
    "concept model with everything",
    "points with text",
    "zero points per side",
    "points per batch not whole",
    "iou threshold out of range",
    "stability nan",
    "negative min area",
    "min area with prompts",
    "propagate with text",
    "start without propagate",
    "exemplars missing",
    "exemplars bad json",
    "exemplars not a list",
    "exemplars empty",
    "exemplar of 3 numbers",
    "exemplar outside",
    "exemplar nan",
    "exemplar positive not bool",
    "exemplar unknown key",
    "exemplar without box",
    "scores csv exists",
    "tracker-only checkpoint for text",
    "concept model missing",
    "bad device",
]


def test_bad_case_list_is_complete(tmp_path):
    assert sorted(_bad_cases(tmp_path, tmp_path, tmp_path)) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(work, tiny_tracker_dir, concept_dir, capsys, case):
    extra, words = _bad_cases(work, tiny_tracker_dir, concept_dir)[case]
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    argv = [
        "segment",
        str(work / "img.tif"),
        "--out",
        str(work / "labels.tif"),
        "--device",
        "cpu",
        *map(str, extra),
    ]
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (case, cap.err)
    assert cap.err.startswith("napari-sam3: error:"), cap.err
    assert cap.err.count("\n") == 1 and cap.err.endswith("\n"), cap.err
    assert words.lower() in cap.err.lower(), cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed


def test_failed_write_leaves_nothing(work, tiny_tracker_dir, monkeypatch, capsys):
    def broken(path, labels, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_labels", broken)
    before = _listing(work)
    rc = cli.main(
        _segment(
            work / "img.tif",
            work / "out.tif",
            tiny_tracker_dir,
            "--everything",
            "--points-per-side",
            2,
        )
    )
    err = capsys.readouterr().err
    assert rc == 1 and "disk full" in err and err.count("\n") == 1
    assert _listing(work) == before  # no labels, no OUT.csv, no staging folder


def test_defaults_match_the_library(capsys):
    library = inspect.signature(ConceptSegmenter.detect).parameters["threshold"].default
    assert cli.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD == library  # one constant, core.defaults
    assert cli.main(["segment", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEFAULT_THRESHOLD})" in text
    for flag in (
        "--text",
        "--exemplars",
        "--threshold",
        "--concept-model",
        "--everything",
        "--points-per-side",
        "--points-per-batch",
        "--pred-iou-thresh",
        "--stability-score-thresh",
        "--min-area",
    ):
        assert flag in text
    assert f"(default: {SETTINGS.points_per_side})" in text
    assert f"(default: {SETTINGS.stability_score_thresh})" in text


def test_mode_and_out_are_required(work, capsys):
    assert cli.main(["segment", str(work / "img.tif")]) == 2  # names the three modes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(m in err for m in ("--prompts", "--text", "--everything"))
    assert cli.main(["segment", str(work / "img.tif"), "--everything"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-sam3: error: --out") and err.count("\n") == 1
    assert _listing(work) == ["exemplars.json", "img.tif"]
