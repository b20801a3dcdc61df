"""Bad input gets one clear error (API: ValueError/PromptError; CLI: exit 2, one line,
nothing written), and one slice-range convention: inclusive first..last in the CLI (and
the widget), exclusive ``stop`` in the Python API, each slice tracked once."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile

from napari_sam3 import ObjectPrompt, PromptError, Sam3Segmenter, cli
from napari_sam3.core import io
from napari_sam3.core.prompts import prompt_bbox
from napari_sam3.core.propagation import StackFrames

H, W = 40, 56


@pytest.fixture
def image():
    rows, cols = np.mgrid[0:H, 0:W]
    return (1000 + 800 * np.sin(rows / 5.0) * np.cos(cols / 7.0)).astype(np.uint16)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video"), seed=0)


DEPTH, SY, SX = 6, 64, 96


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    """A uint16 (Z, Y, X) stack (a bright disc drifting right) and prompts on slice 2."""
    root = tmp_path_factory.mktemp("stack")
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:SY, 0:SX]
    stack = np.stack([
        500 + 2000 * (((rows - 32) ** 2 + (cols - 25 - 4 * z) ** 2) <= 14 ** 2)
        + rng.normal(0, 100, (SY, SX))
        for z in range(DEPTH)]).astype(np.uint16)
    np.save(root / "stack.npy", stack)
    (root / "prompts.json").write_text(json.dumps([
        {"points": [[32, 33]], "slice": 2},
        {"box": [5, 60, 25, 90], "slice": 2, "id": 4},
    ]))
    return root


# ----------------------------------------------------------------- point labels (API)


@pytest.mark.parametrize("labels", [
    [0.5], [1.9], [2], [-1], [1e20], [float("inf")], [float("nan")], [1.0], ["1"], [None],
    [[1]], np.array([0.0]),
])
def test_point_labels_must_be_exactly_0_or_1(labels):
    with pytest.raises(PromptError, match="point labels must be"):
        ObjectPrompt(points=[(1, 2)], point_labels=labels)


@pytest.mark.parametrize("labels", [
    [True, False], [1, 0], np.array([1, 0], np.uint8), np.array([True, False]),
    [np.int64(1), np.int32(0)],
])
def test_point_labels_integers_and_booleans(labels):
    p = ObjectPrompt(points=[(1, 2), (3, 4)], point_labels=labels)
    assert p.point_labels.tolist() == [1, 0] and p.point_labels.dtype == np.int64


def test_coordinates_that_are_not_numbers_are_prompt_errors():
    for kwargs in (dict(points=[(10 ** 400, 2)]), dict(points=[(1, 2, 3)]), dict(box="abcd"),
                   dict(points=[("a", 2)])):
        with pytest.raises(PromptError):
            ObjectPrompt(**kwargs)


# ------------------------------------------------------------ prompt files (CLI)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


PROMPT_FILES = {
    "label 0.5": ('[{"points": [[1, 2]]}, {"points": [[3, 4]], "labels": [0.5]}]',
                  "object 2: point labels must be 1 (positive) or 0 (negative)"),
    "label 1.9": ('[{"points": [[1, 2]]}, {"points": [[3, 4]], "labels": [1.9]}]',
                  "object 2: point labels"),
    "label 1.0": ('[{"points": [[1, 2]]}, {"points": [[3, 4]], "labels": [1.0]}]',
                  "object 2: point labels"),
    "label 1e20": ('[{"points": [[1, 2]]}, {"points": [[3, 4]], "labels": [1e20]}]',
                   "object 2: point labels"),
    "label 1e999": ('[{"points": [[1, 2]]}, {"points": [[3, 4]], "labels": [1e999]}]',
                    "object 2: point labels"),
    "huge coordinate": ('[{"points": [[1, 2]]}, {"points": [[3, 1' + "0" * 400 + ']]}]',
                        "object 2: points are (row, col) pairs"),
    "100,000-deep nesting": (_deep(100_000), "nested too deeply"),
    "deep nesting in an object": ('[{"points": ' + _deep(5000) + "}]", "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(PROMPT_FILES))
def test_bad_prompt_file_is_one_line_exit_2(tmp_path, image, tiny_tracker_dir, capsys, case):
    text, words = PROMPT_FILES[case]
    tifffile.imwrite(tmp_path / "img.tif", image)
    (tmp_path / "p.json").write_text(text)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*")}
    rc = cli.main(["segment", str(tmp_path / "img.tif"), "--prompts", str(tmp_path / "p.json"),
                   "--out", str(tmp_path / "out.tif"), "--model", str(tiny_tracker_dir),
                   "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert cap.err.startswith("napari-sam3: error:") and cap.err.count("\n") == 1, cap.err
    assert "Traceback" not in cap.err and words in cap.err, cap.err
    assert cap.out == ""
    assert {p: p.read_bytes() for p in tmp_path.rglob("*")} == before


def test_boolean_labels_in_a_prompt_file(tmp_path, image, tiny_segmenter, tiny_tracker_dir):
    tifffile.imwrite(tmp_path / "img.tif", image)
    (tmp_path / "p.json").write_text('[{"points": [[10, 20], [12, 30]], "labels": [true, false]}]')
    out = tmp_path / "out.tif"
    assert cli.main(["segment", str(tmp_path / "img.tif"), "--prompts",
                     str(tmp_path / "p.json"), "--out", str(out), "--model",
                     str(tiny_tracker_dir), "--device", "cpu"]) == 0
    want = tiny_segmenter.segment(image, [ObjectPrompt(points=[(10, 20), (12, 30)],
                                                       point_labels=[1, 0])])
    np.testing.assert_array_equal(io.read_labels(out), want)


# ------------------------------------------------------------------ segment (API)


@pytest.mark.parametrize("kwargs, words", [
    (dict(ids=[1]), "1 ids for 2 prompts"),
    (dict(ids=[1, 0]), "ids[1] must be from 1"),
    (dict(ids=[-3, 1]), "ids[0] must be from 1"),
    (dict(ids=[1, 2.0]), "ids[1] must be a whole number"),
    (dict(out=np.zeros((H, W + 1), np.int32)), f"out has shape ({H}, {W + 1})"),
    (dict(out=np.zeros((H, W, 1), np.int32)), "out has shape"),
    (dict(limits=(10, 5)), "low must be below high"),
    (dict(limits=(5, 5)), "low must be below high"),
    (dict(limits=(float("nan"), 5)), "finite"),
    (dict(limits=(0, float("inf"))), "finite"),
    (dict(limits=(1, 2, 3)), "limits must be (low, high)"),
    (dict(max_hole_area=-1), "max_hole_area must be 0 or more"),
    (dict(max_sprinkle_area=-1), "max_sprinkle_area must be 0 or more"),
    (dict(max_hole_area=2.5), "max_hole_area must be a whole number"),
])
def test_segment_bad_arguments(tiny_segmenter, image, kwargs, words):
    prompts = [ObjectPrompt(points=[(10, 20)]), ObjectPrompt(box=(5, 5, 30, 40))]
    out = kwargs.get("out")
    before = None if out is None else out.copy()
    with pytest.raises(ValueError, match=re.escape(words)):
        tiny_segmenter.segment(image, prompts, **kwargs)
    if out is not None:
        np.testing.assert_array_equal(out, before)


def test_segment_error_names_the_object(tiny_segmenter, image):
    prompts = [ObjectPrompt(points=[(10, 20)]), {"points": [(10, W + 5)]}]
    with pytest.raises(PromptError, match="object 7: point .* is outside"):
        tiny_segmenter.segment(image, prompts, ids=[3, 7])


def test_empty_mask_prompt(tiny_tracker_dir):
    tiled = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=64,
                                          overlap=16)
    big = np.random.default_rng(0).integers(0, 4000, (150, 170)).astype(np.uint16)
    assert not tiled.tiles(big).single
    empty = np.zeros(big.shape, bool)
    with pytest.raises(PromptError, match="object 2: empty mask"):
        tiled.segment(big, [ObjectPrompt(points=[(5, 5)]), {"mask": empty}])
    with pytest.raises(PromptError, match="empty mask"):
        ObjectPrompt(mask=empty)
    p = ObjectPrompt(mask=~empty)
    p.mask = empty  # emptied after the check: still a clear error, not min() of nothing
    with pytest.raises(PromptError, match="empty mask"):
        prompt_bbox(p)
    # with a point, an empty previous mask is only a hint: accepted
    assert tiled.segment(big, [ObjectPrompt(points=[(5, 5)], mask=empty)]).shape == big.shape


# -------------------------------------------------------------- propagate (API)


def _stack():
    return np.zeros((5, 32, 48), np.uint16) + np.arange(48, dtype=np.uint16)


@pytest.mark.parametrize("kwargs, words", [
    (dict(axis=3), "axis 3 is out of range for data of shape (5, 32, 48)"),
    (dict(axis=-4), "axis -4 is out of range"),
    (dict(axis=1), "axis 1 is a spatial axis"),
    (dict(axis=0.0), "axis must be a whole number"),
    (dict(prompts_by_slice={2.5: [ObjectPrompt(points=[(1, 1)])]}),
     "a slice index must be a whole number, got 2.5"),
    (dict(prompts_by_slice={"2": [ObjectPrompt(points=[(1, 1)])]}),
     "a slice index must be a whole number, got '2'"),
    (dict(prompts_by_slice={2: {0: ObjectPrompt(points=[(1, 1)])}}),
     "slice 2: a label id must be from 1"),
    (dict(prompts_by_slice={2: {-1: ObjectPrompt(points=[(1, 1)])}}),
     "slice 2: a label id must be from 1"),
    (dict(prompts_by_slice={2: [{"points": [(1, 1)]}, {"points": [(40, 1)]}]}),
     "slice 2, object 2: point (row 40, col 1) is outside"),
    (dict(stop_after=0), "stop_after must be 1 or more, got 0"),
    (dict(stop_after=1.5), "stop_after must be a whole number"),
    (dict(start=1.5), "start must be a whole number"),
    (dict(stop=4, start=4), "slice range 4-3 is outside"),
    (dict(score_threshold=float("nan")), "score_threshold must be a finite number"),
    (dict(limits=(3, 1)), "low must be below high"),
    (dict(limits=(float("nan"), 1)), "finite"),
])
def test_iter_propagate_bad_arguments_fail_at_the_call(tiny_segmenter, kwargs, words):
    """Checked when called, before a model is loaded or a slice tracked (this segmenter is
    image-only: reaching the tracker would be a different error)."""
    prompts = kwargs.pop("prompts_by_slice", {2: [ObjectPrompt(points=[(1, 1)])]})
    with pytest.raises(ValueError, match=re.escape(words)):
        tiny_segmenter.iter_propagate(_stack(), prompts, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(out=np.zeros((5, 32, 47), np.int32)), "out has shape (5, 32, 47), the labels are "
                                                "(5, 32, 48)"),
    (dict(max_hole_area=-1), "max_hole_area must be 0 or more"),
    (dict(max_sprinkle_area=-2), "max_sprinkle_area must be 0 or more"),
    (dict(axis=3), "out of range"),
])
def test_propagate_bad_arguments(tiny_segmenter, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        tiny_segmenter.propagate(_stack(), {2: [ObjectPrompt(points=[(1, 1)])]}, **kwargs)


def test_stack_frames_axis_never_wraps():
    stack = _stack()
    assert StackFrames(stack, axis=-3).axis == 0  # NumPy's negative axes
    with pytest.raises(ValueError, match="out of range"):
        StackFrames(stack, axis=3)
    tzyx = np.zeros((2, 3, 8, 8))
    with pytest.raises(ValueError, match="fixed index of axis 1 must be from 0 to 2"):
        StackFrames(tzyx, axis=0, fixed={1: 3})


def test_both_directions_track_each_slice_once(video_dir):
    seg = Sam3Segmenter.from_pretrained(str(video_dir), device="cpu")
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 255, (DEPTH, 40, 48, 3)).astype(np.uint8)
    prompts = {3: {1: ObjectPrompt(points=[(20, 20)])}, 4: {2: ObjectPrompt(box=(5, 5, 20, 30))}}
    got = [r.index for r in seg.iter_propagate(stack, prompts, direction="both", start=1,
                                               stop_after=10 ** 6)]
    assert got == [3, 4, 5, 2, 1]  # forward from 3, then backward from 2: each slice once
    assert [r.index for r in seg.iter_propagate(stack, prompts, direction="backward",
                                                stop_after=10 ** 6)] == [4, 3, 2, 1, 0]


# ------------------------------------------------------------ slice range (CLI)


def _run(stack_dir, out, model, *extra):
    return cli.main(["segment", str(stack_dir / "stack.npy"), "--prompts",
                     str(stack_dir / "prompts.json"), "--out", str(out), "--model", str(model),
                     "--device", "cpu", "--propagate", *map(str, extra)])


def _tracked(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^slice (\d+) tracked", text, flags=re.M)]


def test_first_last_are_inclusive_and_stop_still_works(stack_dir, video_dir, tmp_path, capsys):
    seg = Sam3Segmenter.from_pretrained(str(video_dir), device="cpu")
    stack = np.load(stack_dir / "stack.npy")
    prompts = {2: {1: ObjectPrompt(points=[(32, 33)]), 4: ObjectPrompt(box=(5, 60, 25, 90))}}
    opts = ("--score-threshold", -1e6, "--stop-after", 100, "--max-hole-area", 0)
    want = seg.propagate(stack, prompts, direction="both", start=1, stop=5,
                         score_threshold=-1e6, stop_after=100, max_hole_area=0)
    assert want[1:5].any(axis=(1, 2)).all()  # a real comparison: every slice has labels
    runs = {"first/last": ("--first", 1, "--last", 4), "start/stop": ("--start", 1, "--stop", 5),
            "first/stop": ("--first", 1, "--stop", 5)}
    for name, bounds in runs.items():
        out = tmp_path / f"{name.replace('/', '_')}.tif"
        rc = _run(stack_dir, out, video_dir, "both", *bounds, *opts)
        cap = capsys.readouterr()
        assert rc == 0, (name, cap.err)
        np.testing.assert_array_equal(io.read_labels(out), want, err_msg=name)
        # each slice of 1..4 (both included) tracked and reported once
        assert _tracked(cap.out) == [2, 3, 4, 1], (name, cap.out)


def test_default_range_reports_every_slice_once(stack_dir, video_dir, tmp_path, capsys):
    out = tmp_path / "all.zarr"
    assert _run(stack_dir, out, video_dir, "both", "--stop-after", 100,
                "--score-threshold", -1e6) == 0
    assert sorted(_tracked(capsys.readouterr().out)) == list(range(DEPTH))


@pytest.mark.parametrize("extra, words", [
    (("--last", 3, "--stop", 4), "give one of them"),
    (("--first", 1, "--start", 1), "--start is the old name of --first"),
    (("--last", DEPTH), f"--first 0 --last {DEPTH}: need 0 <= first <= last <= {DEPTH - 1}"),
    (("--first", 3, "--last", 2), "need 0 <= first <= last"),
    (("--first", -1), "need 0 <= first <= last"),
    (("--first", 3, "--last", 4), "no prompted slice between slices 3 and 4 (both included)"),
    (("--start", 3, "--stop", 3), "--start 3 --stop 3: need 0 <= start < stop"),
])
def test_bad_slice_range_is_one_line_exit_2(stack_dir, video_dir, tmp_path, capsys, extra,
                                            words):
    rc = _run(stack_dir, tmp_path / "o.zarr", video_dir, "forward", *extra)
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert cap.err.startswith("napari-sam3: error:") and cap.err.count("\n") == 1, cap.err
    assert words in cap.err and "Traceback" not in cap.err, cap.err
    assert cap.out == "" and list(tmp_path.iterdir()) == []


def test_range_options_need_propagate(stack_dir, video_dir, tmp_path, capsys):
    for flag in ("--first", "--last"):
        rc = cli.main(["segment", str(stack_dir / "stack.npy"), "--prompts",
                       str(stack_dir / "prompts.json"), "--out", str(tmp_path / "o.zarr"),
                       "--model", str(video_dir), flag, "1"])
        assert rc == 2
        assert f"{flag} only apply with --propagate" in capsys.readouterr().err


def test_help_documents_the_range(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--first K" in text and "--last K" in text and "included" in text
    assert "--stop K" in text and "kept for compatibility" in text


def test_exemplar_boxes_and_labels_follow_the_prompt_rules(tmp_path):
    from types import SimpleNamespace

    from napari_sam3._cli.errors import CliError
    from napari_sam3._cli.prompt_files import load_exemplars
    from napari_sam3.core.concept import _exemplar_array

    with pytest.raises(PromptError, match="exemplar labels must be 1 .* got 0.5"):
        _exemplar_array([[0, 0, 5, 5]], [0.5], (20, 30))
    with pytest.raises(PromptError, match="exemplar box 1's coordinates must be finite"):
        _exemplar_array([[0, 0, np.inf, 5]], None, (20, 30))
    boxes, labels = _exemplar_array([[0, 0, 1e300, 5], [3, 4, 1, 2]], [True, 0], (20, 30))
    np.testing.assert_array_equal(boxes, [[0, 0, 19, 5], [1, 2, 3, 4]])  # clipped, sorted
    assert labels.tolist() == [1, 0]

    inp = SimpleNamespace(plane_shape=(20, 30))
    for text in ("[[1" + "0" * 400 + ", 0, 10, 10]]", "[[1e999, 0, 10, 10]]"):
        path = tmp_path / "ex.json"
        path.write_text(text)
        with pytest.raises(CliError, match="box 1") as err:
            load_exemplars(str(path), inp)
        assert len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_count_options_say_their_real_bound(capsys):
    assert cli.main(["segment", "x.tif", "--everything", "--out", "o.tif",
                     "--points-per-side", "-3"]) == 2
    err = capsys.readouterr().err
    assert "must be 1 or more, got -3" in err and "0 or more" not in err
