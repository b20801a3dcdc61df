"""The command line on large and 3D data: Zarr in/out, embedding cache, precompute, stacks.

Tiny random checkpoints only: a 112 px image tracker for 2D and a tiny video tracker
(which also serves clicks) for stacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_sam3 import ObjectPrompt, Sam3Segmenter, cli
from napari_sam3.core import io, postprocess, segmenter
from napari_sam3.core.propagation import StackFrames, stack_limits

TILES = ["--tile", "112", "--overlap", "32"]
H, W = 300, 400  # 4 x 5 tiles of 112 px with 32 px overlap
OBJECTS = [
    {"points": [[30, 40]]},
    {"box": [100, 120, 150, 200]},
    {"points": [[250, 350], [240, 330]], "labels": [1, 0], "id": 9},
    {"points": [[150, 200]]},  # on a seam between tiles
]
IDS = [1, 2, 9, 4]

DEPTH, SY, SX = 7, 64, 96  # a stack slice fits one tile of the tiny model: fast
STACK_OBJECTS = [
    {"points": [[30, 30]], "slice": 2},
    {"box": [5, 50, 30, 90], "slice": 2, "id": 5},
    {"points": [[34, 40]], "slice": 4},  # id 3 (third entry)
    {"points": [[32, 36]], "slice": 5, "id": 1},  # object 1 again, on another slice
]


def _image() -> np.ndarray:
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:H, 0:W]
    img = 1000 + 800 * np.sin(rows / 9.0) * np.cos(cols / 13.0) + rng.normal(0, 40, (H, W))
    return img.astype(np.uint16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A plain Zarr array, an OME-Zarr group (1, H, W) and the prompts, read-only inputs."""
    root = tmp_path_factory.mktemp("large_inputs")
    img = _image()
    arr = zarr.create_array(root / "img.zarr", shape=img.shape, chunks=(128, 128), dtype=img.dtype)
    arr[...] = img
    ms = {
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                 {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0]}]},
            {"path": "1", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 2.0, 2.0]}]}],
    }
    group = zarr.open_group(root / "ome.zarr", mode="w", zarr_format=3,
                            attributes={"ome": {"version": "0.5", "multiscales": [ms]}})
    group.create_array("0", shape=(1, H, W), chunks=(1, 128, 128), dtype=img.dtype)[...] = img[None]
    group.create_array("1", shape=(1, H // 2, W // 2), dtype=img.dtype)[...] = img[None, ::2, ::2]
    (root / "prompts.json").write_text(json.dumps(OBJECTS))
    return root


@pytest.fixture(scope="module")
def tiled(tiny_tracker_dir):
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                         overlap=32)


@pytest.fixture(scope="module")
def expected(data, tiled):
    """The Python API's labels for OBJECTS (ids 1, 2, 9, 4) on the Zarr image."""
    arr = zarr.open_array(data / "img.zarr", mode="r")
    prompts = [ObjectPrompt.from_dict({k: v for k, v in o.items() if k != "id"})
               for o in OBJECTS]
    labels = tiled.segment(arr, prompts)
    labels = np.array([0, *IDS], dtype=np.int32)[labels]  # position i+1 -> its id
    assert set(np.unique(labels)) == {0, *IDS}
    return labels


def _segment(image, prompts, out, model, *extra) -> list[str]:
    return ["segment", str(image), "--prompts", str(prompts), "--out", str(out),
            "--model", str(model), "--device", "cpu", *map(str, extra)]


def _precompute(image, cache, model, *extra) -> list[str]:
    return ["precompute", str(image), "--cache", str(cache), "--model", str(model),
            "--device", "cpu", *map(str, extra)]


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "tiles").iterdir())


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts image-encoder runs of every Sam3Segmenter in this process."""
    calls = []
    real = Sam3Segmenter.encode_rgb

    def spy(self, rgb, key=""):
        calls.append(rgb.shape)
        return real(self, rgb, key)

    monkeypatch.setattr(Sam3Segmenter, "encode_rgb", spy)
    return calls


# ------------------------------------------------------------------------- 2D, Zarr


@pytest.mark.parametrize("source", ["img.zarr", "ome.zarr"])
def test_zarr_input_to_zarr_output_equals_api(data, expected, tiny_tracker_dir, tmp_path,
                                              monkeypatch, capsys, source):
    outs = []
    real = postprocess.paste_objects

    def spy(out, *args, **kw):
        outs.append(out)
        return real(out, *args, **kw)

    monkeypatch.setattr(postprocess, "paste_objects", spy)
    monkeypatch.setattr(segmenter, "paste_objects", spy)
    lazy = _lazy_only(Sam3Segmenter._objects_by_tile)
    monkeypatch.setattr(Sam3Segmenter, "_objects_by_tile", lazy)
    out = tmp_path / "labels.zarr"
    rc = cli.main(_segment(data / source, data / "prompts.json", out, tiny_tracker_dir, *TILES))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.err == ""
    np.testing.assert_array_equal(io.read_labels(out), expected)
    assert outs and all(isinstance(o, zarr.Array) for o in outs)  # written region by region
    assert f"wrote {out}" in cap.out and "9: " in cap.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr"]
    assert lazy.calls  # the image reached the decoder path lazily


def _lazy_only(real):
    def check(self, image, *args, **kwargs):
        assert not isinstance(image, np.ndarray), "the whole image was read into memory"
        calls.append(type(image))
        return real(self, image, *args, **kwargs)

    calls = []
    check.calls = calls
    return check


def test_zarr_input_to_tif_output(data, expected, tiny_tracker_dir, tmp_path):
    out = tmp_path / "labels.tif"
    assert cli.main(_segment(data / "img.zarr", data / "prompts.json", out, tiny_tracker_dir,
                             *TILES)) == 0
    np.testing.assert_array_equal(io.read_labels(out), expected)


def test_labels_zarr_layout_is_io_layout(tmp_path):
    """The empty labels group the CLI fills has exactly write_labels_zarr's metadata."""
    for shape in [(300, 2100), (3, 40, 50)]:
        a, b = tmp_path / "a" / "lab.zarr", tmp_path / "b" / "lab.zarr"
        a.parent.mkdir(exist_ok=True)
        b.parent.mkdir(exist_ok=True)
        labels = np.zeros(shape, np.int32)
        labels[(0,) * len(shape)] = 3
        io.write_labels_zarr(a, labels, overwrite=True)
        io.create_labels_zarr(b, shape, name="lab", overwrite=True)[(0,) * len(shape)] = 3
        for meta in ["zarr.json", "0/zarr.json"]:
            assert json.loads((a / meta).read_text()) == json.loads((b / meta).read_text())
        np.testing.assert_array_equal(io.read_labels(b), labels)


def test_limits_option(data, tiled, tiny_tracker_dir, tmp_path):
    arr = zarr.open_array(data / "img.zarr", mode="r")
    prompts = [ObjectPrompt(points=[(30, 40)])]
    (tmp_path / "p.json").write_text(json.dumps([{"points": [[30, 40]]}]))
    want = tiled.segment(arr, prompts, limits=(200.0, 1500.0))
    out = tmp_path / "o.tif"
    assert cli.main(_segment(data / "img.zarr", tmp_path / "p.json", out, tiny_tracker_dir,
                             *TILES, "--limits", 200, 1500)) == 0
    np.testing.assert_array_equal(io.read_labels(out), want)
    assert not np.array_equal(want, tiled.segment(arr, prompts))  # the limits matter


# --------------------------------------------------------------- precompute + cache


def test_precompute_then_segment_encodes_nothing(data, tiny_tracker_dir, tmp_path, capsys,
                                                 encoder_calls):
    prompts = data / "prompts.json"
    cold = tmp_path / "cold.zarr"
    assert cli.main(_segment(data / "img.zarr", prompts, cold, tiny_tracker_dir, *TILES,
                             "--cache", tmp_path / "c1")) == 0
    capsys.readouterr()

    cache = tmp_path / "c2"
    assert cli.main(_precompute(data / "img.zarr", cache, tiny_tracker_dir, *TILES)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["tile 1/20 encoded", "tile 2/20 encoded"] and len(lines) == 21
    assert lines[-1].startswith("precomputed 20 tiles of a 300x400 image: 20 encoded, 0 cached")
    assert f"cache {cache}: 20 entries" in lines[-1]
    entries = _entries(cache)
    assert len(entries) == 20

    encoder_calls.clear()
    assert cli.main(_precompute(data / "img.zarr", cache, tiny_tracker_dir, *TILES)) == 0
    assert "0 encoded, 20 cached" in capsys.readouterr().out.splitlines()[-1]
    warm = tmp_path / "warm.zarr"
    assert cli.main(_segment(data / "img.zarr", prompts, warm, tiny_tracker_dir, *TILES,
                             "--cache", cache)) == 0
    assert encoder_calls == []  # neither the second precompute nor segment encoded a tile
    assert _entries(cache) == entries
    np.testing.assert_array_equal(io.read_labels(warm), io.read_labels(cold))


def test_precompute_region(data, tiny_tracker_dir, tmp_path, capsys):
    cache = tmp_path / "c"
    args = _precompute(data / "img.zarr", cache, tiny_tracker_dir, *TILES,
                       "--region", 0, 0, 50, 100)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "precomputed 2 tiles" in out and len(_entries(cache)) == 2


def test_float32_cache_is_exact(data, expected, tiny_tracker_dir, tmp_path):
    out = tmp_path / "o.zarr"
    args = _segment(data / "img.zarr", data / "prompts.json", out, tiny_tracker_dir, *TILES,
                    "--cache", tmp_path / "c", "--cache-dtype", "float32")
    assert cli.main(args) == 0
    np.testing.assert_array_equal(io.read_labels(out), expected)


def test_precompute_stops_when_the_cache_fails(data, tiny_tracker_dir, tmp_path, monkeypatch,
                                               capsys):
    from napari_sam3.core.embedding_store import EmbeddingStore

    def full(self, key, feats, meta):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EmbeddingStore, "_write", full)
    rc = cli.main(_precompute(data / "img.zarr", tmp_path / "c", tiny_tracker_dir, *TILES))
    cap = capsys.readouterr()
    assert rc == 1
    assert cap.err.startswith("napari-sam3: error: precompute stopped: cannot write the "
                              "embedding cache") and cap.err.count("\n") == 1, cap.err
    assert "No space left on device" in cap.err
    assert cap.out == ""  # stopped at the first tile, which could not be stored


def test_cache_info_and_clear(data, tiny_tracker_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "napari-sam3" / "embeddings.zarr"
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(default) in out and "entries: 0" in out and not default.exists()
    assert cli.main(["cache", "clear"]) == 0
    assert "nothing to clear" in capsys.readouterr().out and not default.exists()

    args = _precompute(data / "img.zarr", "default", tiny_tracker_dir, *TILES,
                       "--region", 0, 0, 50, 100)
    assert cli.main(args) == 0
    capsys.readouterr()
    assert len(_entries(default)) == 2
    assert cli.main(["cache", "info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    size = sum(f.stat().st_size for f in (default / "tiles").rglob("*") if f.is_file())
    assert lines[:3] == [f"cache: {default}", "entries: 2",
                         f"size: {cli._human_bytes(size)} ({size} bytes)"]
    assert lines[3:] == ["leftovers: 0 (unfinished writes older than 24 h; 'cache clear' or "
                         "the next run that writes removes them)"]  # issue 8: info counts them
    assert cli.main(["cache", "clear", "--cache", str(default)]) == 0
    assert capsys.readouterr().out.startswith("cleared 2 entries")
    assert _entries(default) == [] and (default / "zarr.json").is_file()

    # a folder of other data is never cleared
    other = tmp_path / "mine"
    (other / "tiles").mkdir(parents=True)
    (other / "tiles" / "keep.txt").write_text("mine")
    for action in ("info", "clear"):
        assert cli.main(["cache", action, "--cache", str(other)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("napari-sam3: error:") and err.count("\n") == 1
        assert "not a napari-sam3 embedding cache" in err
    assert (other / "tiles" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in other.rglob("*")) == ["keep.txt", "tiles"]


@pytest.mark.parametrize("where", ["file", "other data"])
def test_unusable_cache_warns_and_segments(data, expected, tiny_tracker_dir, tmp_path, capsys,
                                           where):
    cache = tmp_path / "cache"
    if where == "file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        (cache / "notes.txt").write_text("mine")
    out = tmp_path / "o.zarr"
    rc = cli.main(_segment(data / "img.zarr", data / "prompts.json", out, tiny_tracker_dir,
                           *TILES, "--cache", cache))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.err.startswith("napari-sam3: warning:") and cap.err.count("\n") == 1, cap.err
    assert "memory" in cap.err and str(cache) in cap.err
    np.testing.assert_array_equal(io.read_labels(out), expected)
    if where == "other data":
        assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- stacks


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video"), seed=0)


@pytest.fixture(scope="module")
def video_seg(video_dir):
    return Sam3Segmenter.from_pretrained(str(video_dir), device="cpu")


@pytest.fixture(scope="module")
def stack_files(tmp_path_factory):
    """A uint16 (Z, Y, X) stack (a bright disc drifting right) as .npy and Zarr."""
    root = tmp_path_factory.mktemp("stack")
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:SY, 0:SX]
    stack = np.stack([
        500 + 2000 * (((rows - 32) ** 2 + (cols - 25 - 4 * z) ** 2) <= 14 ** 2)
        + rng.normal(0, 100, (SY, SX))
        for z in range(DEPTH)]).astype(np.uint16)
    np.save(root / "stack.npy", stack)
    arr = zarr.create_array(root / "stack.zarr", shape=stack.shape, chunks=(1, 32, 32),
                            dtype=stack.dtype)
    arr[...] = stack
    (root / "prompts.json").write_text(json.dumps(STACK_OBJECTS))
    return root, stack


def _by_slice(objects):
    out: dict = {}
    for i, o in enumerate(objects, 1):
        d = {k: v for k, v in o.items() if k not in ("id", "slice")}
        out.setdefault(o["slice"], {})[o.get("id", i)] = ObjectPrompt.from_dict(d)
    return out


@pytest.mark.parametrize("source", ["stack.zarr", "stack.npy"])
def test_propagate_equals_api(stack_files, video_seg, video_dir, tmp_path, capsys, source):
    root, stack = stack_files
    want = video_seg.propagate(stack, _by_slice(STACK_OBJECTS), direction="both")
    assert set(np.unique(want)) == {0, 1, 3, 5}
    out = tmp_path / "tracked.zarr"
    rc = cli.main(_segment(root / source, root / "prompts.json", out, video_dir,
                           "--propagate", "both"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    got = io.read_labels(out)
    assert got.shape == (DEPTH, SY, SX)
    np.testing.assert_array_equal(got, want)
    last = cap.out.splitlines()[-1]
    assert last.startswith(f"propagated 3 objects (both) through a {DEPTH}x{SY}x{SX} stack")
    assert "slice 3 tracked (ids " in cap.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracked.zarr"]


def test_propagate_range_options_equal_api(stack_files, video_seg, video_dir, tmp_path):
    root, stack = stack_files
    prompts = _by_slice(STACK_OBJECTS)
    want = video_seg.propagate(stack, prompts, direction="forward", start=1, stop=6,
                               score_threshold=-5.0, stop_after=1, max_hole_area=0)
    out = tmp_path / "fwd.tif"
    args = _segment(root / "stack.npy", root / "prompts.json", out, video_dir, "--propagate",
                    "forward", "--start", 1, "--stop", 6, "--score-threshold", -5,
                    "--stop-after", 1, "--max-hole-area", 0)
    assert cli.main(args) == 0
    got = io.read_labels(out)
    np.testing.assert_array_equal(got, want)
    assert not got[0].any() and not got[6].any()


def test_stack_without_propagate_segments_prompted_slices(stack_files, video_seg, video_dir,
                                                          tmp_path, capsys):
    root, stack = stack_files
    limits = stack_limits(StackFrames(stack))
    want = np.zeros(stack.shape, np.int32)
    for k, objs in _by_slice(STACK_OBJECTS).items():
        labels = video_seg.segment(stack[k], list(objs.values()), limits=limits)
        want[k] = np.array([0, *objs], dtype=np.int32)[labels]
    assert {k for k in range(DEPTH) if want[k].any()} == {2, 4, 5}
    for name in ("slices.zarr", "slices.tif"):
        out = tmp_path / name
        assert cli.main(_segment(root / "stack.zarr", root / "prompts.json", out,
                                 video_dir)) == 0
        np.testing.assert_array_equal(io.read_labels(out), want)
    assert "segmented 3 objects on 3 slices of a 7x64x96 stack" in capsys.readouterr().out


def test_precompute_stack_then_propagate_encodes_nothing(stack_files, video_dir, tmp_path,
                                                         capsys, encoder_calls):
    root, _ = stack_files
    cache = tmp_path / "c"
    assert cli.main(_precompute(root / "stack.zarr", cache, video_dir)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"slice 0 (1/{DEPTH}) tile 1/1 encoded"
    assert lines[-1].startswith(f"precomputed {DEPTH} tiles on {DEPTH} slices")
    assert len(encoder_calls) == DEPTH and len(_entries(cache)) == DEPTH
    encoder_calls.clear()
    out = tmp_path / "t.zarr"
    args = _segment(root / "stack.zarr", root / "prompts.json", out, video_dir,
                    "--propagate", "both", "--cache", cache)
    assert cli.main(args) == 0
    assert encoder_calls == [] and len(_entries(cache)) == DEPTH


# ------------------------------------------------------------------------ bad input


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _zarr_group(path: Path) -> Path:
    zarr.open_group(path, mode="w", zarr_format=3, attributes={"me": 1})
    return path


BAD = {
    # name: (command builder(work, root, data, model, video) -> argv, words in the error)
    "slice outside stack": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", _write(
            w / "p.json", [{"points": [[3, 3]], "slice": DEPTH}]), w / "o.zarr", v),
        f"slice {DEPTH} is outside the stack"),
    "negative slice": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", _write(
            w / "p.json", [{"points": [[3, 3]], "slice": -1}]), w / "o.zarr", v),
        "outside the stack"),
    "slice not a number": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", _write(
            w / "p.json", [{"points": [[3, 3]], "slice": "2"}]), w / "o.zarr", v),
        "'slice' must be a whole number"),
    "no slice on a stack": (
        lambda w, r, d, m, v: _segment(r / "stack.zarr", _write(
            w / "p.json", [{"points": [[3, 3]]}]), w / "o.zarr", v),
        "give each object a 'slice'"),
    "point outside the slice": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", _write(
            w / "p.json", [{"points": [[3, SX + 5]], "slice": 1}]), w / "o.zarr", v),
        "outside the 64x96 image"),
    "slice on a 2D image": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", _write(
            w / "p.json", [{"points": [[3, 3]], "slice": 2}]), w / "o.zarr", m),
        "for 3D stacks"),
    "propagate on a 2D image": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", d / "prompts.json", w / "o.zarr", v,
                                       "--propagate", "both"),
        "--propagate needs a 3D stack"),
    "id not a number": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", _write(
            w / "p.json", [{"points": [[3, 3]], "slice": 1, "id": "cell"}]), w / "o.zarr", v),
        "'id' must be a whole number"),
    "id zero": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", _write(
            w / "p.json", [{"points": [[3, 3]], "id": 0}]), w / "o.zarr", m),
        "'id' must be a whole number from 1"),
    "id boolean": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", _write(
            w / "p.json", [{"points": [[3, 3]], "id": True}]), w / "o.zarr", m),
        "got true"),
    "id float": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", _write(
            w / "p.json", [{"points": [[3, 3]], "id": 1.5}]), w / "o.zarr", m),
        "got 1.5"),
    "same id twice on a slice": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", _write(
            w / "p.json", [{"points": [[3, 3]], "slice": 1, "id": 2},
                           {"box": [1, 1, 9, 9], "slice": 1, "id": 2}]), w / "o.zarr", v),
        "id 2 is already used by object 1 on slice 1"),
    "unknown key": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", _write(
            w / "p.json", [{"points": [[3, 3]], "frame": 2}]), w / "o.zarr", m),
        "unknown prompt keys: frame"),
    "start without propagate": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", r / "prompts.json", w / "o.zarr", v,
                                       "--start", 1),
        "--start only apply with --propagate"),
    "stop beyond the stack": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", r / "prompts.json", w / "o.zarr", v,
                                       "--propagate", "forward", "--stop", DEPTH + 1),
        "need 0 <= start < stop <= 7"),
    "no prompt in range": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", r / "prompts.json", w / "o.zarr", v,
                                       "--propagate", "forward", "--start", 6),
        "no prompted slice between"),
    "bad direction": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", r / "prompts.json", w / "o.zarr", v,
                                       "--propagate", "sideways"),
        "invalid choice"),
    "axis on a 2D image": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", d / "prompts.json", w / "o.zarr", m,
                                       "--axis", 0),
        "not a stack"),
    "spatial axis": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", r / "prompts.json", w / "o.zarr", v,
                                       "--axis", 1),
        "not a stack axis"),
    "propagate with an image-only model": (
        lambda w, r, d, m, v: _segment(r / "stack.npy", r / "prompts.json", w / "o.zarr", m,
                                       "--propagate", "both"),
        "video"),
    "limits reversed": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", d / "prompts.json", w / "o.zarr", m,
                                       "--limits", 10, 5),
        "LOW must be below HIGH"),
    "overlap not below tile": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", d / "prompts.json", w / "o.zarr", m,
                                       "--tile", 112, "--overlap", 112),
        "smaller than --tile"),
    "overlap not below the model tile": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", d / "prompts.json", w / "o.zarr", m,
                                       "--overlap", 500),
        "--tile/--overlap"),
    "tile too small": (
        lambda w, r, d, m, v: _segment(d / "img.zarr", d / "prompts.json", w / "o.zarr", m,
                                       "--tile", 8),
        "at least 16"),
    "region outside": (
        lambda w, r, d, m, v: _precompute(d / "img.zarr", w / "c", m, "--region", 0, 0, 50, W + 1),
        "--region 0 0 50 401 is outside the 300x400 image"),
    "region empty": (
        lambda w, r, d, m, v: _precompute(d / "img.zarr", w / "c", m, "--region", 50, 0, 50, 9),
        "outside the 300x400 image or empty"),
    "region outside a slice": (
        lambda w, r, d, m, v: _precompute(r / "stack.npy", w / "c", v, "--region", 0, 0, 70, 9),
        "outside the 64x96 image"),
    "precompute without cache": (
        lambda w, r, d, m, v: ["precompute", str(d / "img.zarr"), "--model", str(m)],
        "--cache"),
    "precompute into other data": (
        lambda w, r, d, m, v: _precompute(d / "img.zarr", w / "mine", m),
        "not a napari-sam3 embedding cache"),
    "precompute into a file": (
        lambda w, r, d, m, v: _precompute(d / "img.zarr", _write(w / "f.json", 1), m),
        "(not a folder)"),
    "precompute into another Zarr store": (
        lambda w, r, d, m, v: _precompute(d / "img.zarr", _zarr_group(w / "g.zarr"), m),
        "a Zarr store that is not a napari-sam3 embedding cache"),
    "precompute bad model": (
        lambda w, r, d, m, v: _precompute(d / "img.zarr", w / "c", w / "no_model"),
        "no such folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nothing_written(data, stack_files, tiny_tracker_dir, video_dir,
                                            tmp_path, capsys, case):
    build, words = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("mine")
    argv = build(work, stack_files[0], data, tiny_tracker_dir, video_dir)
    before = _snapshot(work)
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (case, cap.err)
    assert cap.err.startswith("napari-sam3: error:"), cap.err
    assert cap.err.count("\n") == 1 and "Traceback" not in cap.err, cap.err
    assert words.lower() in cap.err.lower(), cap.err
    assert cap.out == ""
    assert _snapshot(work) == before  # nothing written, created or changed


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}
