"""The ``napari-sam3`` command line: segment (tiny checkpoint) and view (only with a display)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sam3 import ObjectPrompt, cli
from napari_sam3.core import io

H, W = 60, 90  # non-square, so swapped (row, col) axes give other masks or fall outside

OBJECTS = [
    {"points": [[10, 70]]},
    {"points": [[40, 20], [45, 28]], "labels": [1, 0]},
    {"box": [5, 5, 30, 40]},
    {"points": [[50, 80]], "box": [40, 60, 58, 88]},
]


def _console_script() -> list[str]:
    exe = shutil.which("napari-sam3", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "napari_sam3.cli"]


def _run_script(*args, timeout=300, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    return subprocess.run(
        [*_console_script(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def work(tmp_path):
    """A folder with a uint16 60x90 TIFF and a prompts file for it."""
    rows, cols = np.mgrid[0:H, 0:W]
    img = (1000 + 800 * np.sin(rows / 6.0) * np.cos(cols / 9.0) + 3 * cols).astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", img)
    (tmp_path / "prompts.json").write_text(json.dumps(OBJECTS))
    return tmp_path


@pytest.fixture
def expected(work, tiny_segmenter):
    img = tifffile.imread(work / "img.tif")
    labels = tiny_segmenter.segment(img, [ObjectPrompt.from_dict(o) for o in OBJECTS])
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}  # every object found: a real comparison
    return labels


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_segment_writes_same_labels_as_api(work, expected, tiny_tracker_dir, capsys, name):
    out = work / name
    rc = cli.main(
        [
            "segment",
            str(work / "img.tif"),
            "--model",
            str(tiny_tracker_dir),
            "--prompts",
            str(work / "prompts.json"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = io.read_labels(out)
    assert got.shape == (H, W)
    np.testing.assert_array_equal(got, expected)
    # summary: objects, pixels per id, output path
    assert cap.out.count("\n") == 1
    assert "4 objects" in cap.out and str(out) in cap.out
    for i in range(1, 5):
        assert f"{i}: {int((expected == i).sum())}" in cap.out
    # nothing else left next to the output (the staging folder is gone)
    side = [f"{name}.json"] if name.endswith(".tif") else []  # the provenance sidecar
    assert _listing(work) == sorted(["img.tif", "prompts.json", *side,
                                     *_listing_of(out, work)])


def _listing_of(out: Path, root: Path) -> list[str]:
    return [str(out.relative_to(root))] + [str(p.relative_to(root)) for p in out.rglob("*")]


def test_segment_postprocessing_options(work, tiny_segmenter, tiny_tracker_dir):
    img = tifffile.imread(work / "img.tif")
    prompts = [ObjectPrompt.from_dict(o) for o in OBJECTS]
    want = tiny_segmenter.segment(img, prompts, max_hole_area=0, max_sprinkle_area=0)
    out = work / "raw.tif"
    args = ["segment", str(work / "img.tif"), "--prompts", str(work / "prompts.json")]
    args += ["--model", str(tiny_tracker_dir), "--device", "cpu", "--out", str(out)]
    assert cli.main([*args, "--max-hole-area", "0", "--max-sprinkle-area", "0"]) == 0
    np.testing.assert_array_equal(io.read_labels(out), want)


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_segment_overwrite_replaces(work, expected, tiny_tracker_dir, name):
    out = work / name
    io.write_labels(out, np.full((5, 5), 7, np.int32))
    args = ["segment", str(work / "img.tif"), "--prompts", str(work / "prompts.json")]
    args += ["--model", str(tiny_tracker_dir), "--device", "cpu", "--out", str(out)]
    assert cli.main([*args, "--overwrite"]) == 0
    np.testing.assert_array_equal(io.read_labels(out), expected)
    side = [f"{name}.json"] if name.endswith(".tif") else []  # the provenance sidecar
    assert sorted(p.name for p in work.iterdir()) == sorted(["img.tif", "prompts.json", name,
                                                             *side])


def test_segment_console_script(work, expected, tiny_tracker_dir):
    out = work / "cli.zarr"
    res = _run_script(
        "segment",
        work / "img.tif",
        "--prompts",
        work / "prompts.json",
        "--out",
        out,
        "--model",
        tiny_tracker_dir,
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert str(out) in res.stdout
    np.testing.assert_array_equal(io.read_labels(out), expected)


def test_failed_write_leaves_nothing(work, tiny_tracker_dir, monkeypatch, capsys):
    def broken(path, labels, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_labels", broken)
    out = work / "out.tif"
    args = ["segment", str(work / "img.tif"), "--prompts", str(work / "prompts.json")]
    rc = cli.main([*args, "--model", str(tiny_tracker_dir), "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("napari-sam3: error:") and err.count("\n") == 1 and "disk full" in err
    assert _listing(work) == ["img.tif", "prompts.json"]


# ------------------------------------------------------------------------- bad input


def _bad_cases(work: Path, model: Path) -> dict:
    """name -> (argv changes, expected words in the error line)."""
    (work / "garbage.tif").write_bytes(b"this is not a tiff")
    (work / "bad.json").write_text('[{"points": [[1, 2]]},')
    (work / "dict.json").write_text(json.dumps({"points": [[1, 2]]}))
    (work / "empty_obj.json").write_text(json.dumps([{"points": [[1, 2]]}, {}]))
    # (row 70, col 10): the first object's point with its axes swapped
    (work / "outside.json").write_text(json.dumps([{"points": [[70, 10]]}]))
    (work / "outside_box.json").write_text(json.dumps([{"box": [0, 95, 10, 120]}]))
    (work / "nan.json").write_text('[{"box": [0, 0, NaN, 5]}]')
    (work / "bad_labels.json").write_text(json.dumps([{"points": [[1, 2]], "labels": [2]}]))
    (work / "empty.json").write_text("[]")
    (work / "noconfig").mkdir()
    (work / "exists.tif").write_bytes(b"keep me")
    stack = np.zeros((5, H, W), np.uint16)
    tifffile.imwrite(work / "stack.tif", stack)
    return {
        "missing image": ({"image": work / "nope.tif"}, "no such file"),
        "garbage image": ({"image": work / "garbage.tif"}, "cannot read image"),
        "3D stack": ({"image": work / "stack.tif"}, "2D"),
        "missing prompts": ({"--prompts": work / "nope.json"}, "no such file"),
        "bad json": ({"--prompts": work / "bad.json"}, "not valid JSON"),
        "json not a list": ({"--prompts": work / "dict.json"}, "list"),
        "empty list": ({"--prompts": work / "empty.json"}, "no objects"),
        "object without prompt": ({"--prompts": work / "empty_obj.json"}, "object 2"),
        "bad point label": ({"--prompts": work / "bad_labels.json"}, "label"),
        "point outside": ({"--prompts": work / "outside.json"}, "outside the 60x90 image"),
        "box outside": ({"--prompts": work / "outside_box.json"}, "outside"),
        "nan coordinate": ({"--prompts": work / "nan.json"}, "NaN"),
        "model folder missing": ({"--model": work / "no_model"}, "no such folder"),
        "model without config": ({"--model": work / "noconfig"}, "config.json"),
        "bad device": ({"--device": "tpu"}, "device"),
        "out exists": ({"--out": work / "exists.tif"}, "--overwrite"),
        "bad out suffix": ({"--out": work / "out.png"}, "suffix"),
        "out folder missing": ({"--out": work / "nodir" / "out.tif"}, "does not exist"),
        "negative hole area": ({"--max-hole-area": "-1"}, "0 or more"),
    }


def _argv(work: Path, model: Path, changes: dict) -> list[str]:
    opts = {
        "--prompts": work / "prompts.json",
        "--out": work / "out.tif",
        "--model": model,
        "--device": "cpu",
    }
    image = work / "img.tif"
    for k, v in changes.items():
        if k == "image":
            image = v
        else:
            opts[k] = v
    argv = ["segment", str(image)]
    for k, v in opts.items():
        argv += [k, str(v)]
    return argv


BAD_CASES = [
    "missing image",
    "garbage image",
    "3D stack",
    "missing prompts",
    "bad json",
    "json not a list",
    "empty list",
    "object without prompt",
    "bad point label",
    "point outside",
    "box outside",
    "nan coordinate",
    "model folder missing",
    "model without config",
    "bad device",
    "out exists",
    "bad out suffix",
    "out folder missing",
    "negative hole area",
]


def test_bad_case_list_is_complete(tmp_path):
    assert sorted(_bad_cases(tmp_path, tmp_path)) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_segment_bad_input(work, tiny_tracker_dir, capsys, case):
    changes, words = _bad_cases(work, tiny_tracker_dir)[case]
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    rc = cli.main(_argv(work, tiny_tracker_dir, changes))
    cap = capsys.readouterr()
    assert rc == 2, (case, cap.err)
    assert cap.err.startswith("napari-sam3: error:"), cap.err
    assert cap.err.count("\n") == 1 and cap.err.endswith("\n"), cap.err
    assert words.lower() in cap.err.lower(), cap.err
    assert "Traceback" not in cap.err
    assert cap.out == ""
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed


@pytest.mark.parametrize(
    "case", ["garbage image", "point outside", "model without config", "out exists"]
)
def test_segment_bad_input_console_script(work, tiny_tracker_dir, case):
    changes, words = _bad_cases(work, tiny_tracker_dir)[case]
    before = _listing(work)
    res = _run_script(*_argv(work, tiny_tracker_dir, changes), timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("napari-sam3: error:") and res.stderr.count("\n") == 1, res.stderr
    assert words.lower() in res.stderr.lower()
    assert res.stdout == ""
    assert _listing(work) == before


def test_usage_errors_are_one_line(capsys):
    assert cli.main(["segment", "img.tif"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-sam3: error:") and err.count("\n") == 1
    assert "--prompts" in err
    assert cli.main(["frobnicate"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_and_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"napari-sam3 {__import__('napari_sam3').__version__}"
    for argv in (
        ["--help"],
        ["segment", "--help"],
        ["view", "--help"],
        ["precompute", "--help"],
        ["cache", "--help"],
        ["cache", "info", "--help"],
        ["cache", "clear", "--help"],
    ):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: napari-sam3")
    assert cli.main([]) == 2  # no command: help, non-zero
    capsys.readouterr()
    assert cli.main(["cache"]) == 2  # no action: help, non-zero
    assert capsys.readouterr().out.startswith("usage: napari-sam3 cache")


def test_import_is_light():
    code = (
        "import sys, napari_sam3.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'napari', 'qtpy') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_cache_commands_are_light(tmp_path):
    """'cache info/clear' never import torch: they answer at once."""
    code = (
        "import sys, napari_sam3.cli as c; "
        f"rc = c.main(['cache', 'info', '--cache', {str(tmp_path / 'c.zarr')!r}]); "
        "print(rc, sorted(m for m in ('torch', 'transformers', 'napari') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 []"
    assert "entries: 0" in res.stdout
    assert not (tmp_path / "c.zarr").exists()


# ------------------------------------------------------------------------------ view


def test_view_bad_image_is_one_line(tmp_path, capsys):
    rc = cli.main(["view", str(tmp_path / "nope.tif"), "--screenshot", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("napari-sam3: error:") and err.count("\n") == 1
    assert not (tmp_path / "s.png").exists()


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (make test: xvfb-run)")
@pytest.mark.parametrize("source", ["sample", "image"])
def test_view_screenshot(work, tiny_tracker_dir, source):
    shot = work / "demo.png"
    if source == "sample":
        args = ["view", "--sample"]
    else:
        args = ["view", work / "img.tif", "--model", tiny_tracker_dir]
    res = _run_script(*args, "--screenshot", shot, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "warning" not in res.stderr  # e.g. --model ignored
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000
