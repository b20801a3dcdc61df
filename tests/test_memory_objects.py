"""Memory must not grow with the number of objects (issue 8, item 6).

* ``paste_objects`` merges objects one at a time into a running best-logit map and
  gives labels identical to the old all-at-once algorithm (kept here as the reference);
* ``segment`` decodes and upsamples in bounded batches and keeps only each object's
  box, so no step holds every object's full-size logits;
* absurd segment-everything grids are refused up front (API and CLI).
"""

from __future__ import annotations

import tracemalloc
import weakref

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi

from napari_sam3 import ObjectPrompt, Sam3Segmenter, cli
from napari_sam3.core import segmenter
from napari_sam3.core.everything import MAX_POINTS_PER_SIDE, EverythingSettings, generate_everything
from napari_sam3.core.postprocess import BestLogitMap, Flush, mask_box, paste_objects
from napari_sam3.testing import reference_paste_objects as old_paste_objects


# -------------------------------------------------------------------- the merge rule
def random_objects(rng, shape, n):
    """Objects with blobs, holes, islands, overlaps, exact ties and empty masks."""
    h, w = shape
    objects = []
    for _ in range(n):
        r0, c0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        r1, c1 = int(rng.integers(r0 + 8, h + 1)), int(rng.integers(c0 + 8, w + 1))
        field = ndi.zoom(rng.normal(size=(6, 6)), ((r1 - r0) / 6, (c1 - c0) / 6), order=1)
        lg = np.round(field[: r1 - r0, : c1 - c0] - rng.uniform(-0.3, 1.0), 1)  # ties
        kind = rng.random()
        if kind < 0.1:
            lg = -np.abs(lg) - 1  # empty mask
        elif kind < 0.25 and objects:
            (region, other) = objects[int(rng.integers(len(objects)))]  # an exact duplicate
            objects.append((region, other.copy()))
            continue
        objects.append(((slice(r0, r1), slice(c0, c1)), lg.astype(np.float32)))
    return objects


def stream(objects, order):
    """``(region, logits, i)`` in ``order`` with a valid Flush after each object."""
    for k, i in enumerate(order):
        region, lg = objects[i]
        yield region, lg, i
        later = [objects[j][0] for j in order[k + 1:]]
        yield Flush(tuple((r.start, c.start, r.stop, c.stop) for r, c in later))


@pytest.mark.parametrize("seed", range(12))
def test_paste_equals_the_old_rule(seed, tmp_path):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    objects = random_objects(rng, shape, int(rng.integers(1, 14)))
    ids = None if seed % 3 == 0 else list(rng.permutation(np.arange(5, 5 + len(objects) * 2))[
        : len(objects)])
    existing = np.where(rng.random(shape) < 0.3, rng.integers(1, 4, shape), 0).astype(np.int32)
    holes, islands = [(0, 0), (100, 20), (8, 3)][seed % 3]
    for overwrite in (True, False):
        want = existing.copy()
        old_paste_objects(want, objects, ids, holes, islands, overwrite)
        got = existing.copy()
        paste_objects(got, iter(objects), ids, holes, islands, overwrite)  # a generator
        np.testing.assert_array_equal(got, want)
        # objects in any order with explicit indices and flushes; tiny blocks
        order = list(rng.permutation(len(objects)))
        got = existing.copy()
        merged = BestLogitMap(got, ids, holes, islands, overwrite, block=7)
        for item in stream(objects, order):
            if isinstance(item, Flush):
                merged.write(item.pending)
            else:
                merged.add(item[2], item[0], item[1])
        merged.write()
        np.testing.assert_array_equal(got, want)
        got = existing.copy()
        paste_objects(got, stream(objects, order), ids, holes, islands, overwrite)
        np.testing.assert_array_equal(got, want)
        z = zarr.open_array(tmp_path / f"out{seed}{overwrite}.zarr", mode="w", shape=shape,
                            chunks=(16, 16), dtype=np.int32)
        z[:] = existing
        paste_objects(z, stream(objects, order), ids, holes, islands, overwrite)
        np.testing.assert_array_equal(z[:], want)
    assert (want != existing).any() or not any((lg > 0).any() for _, lg in objects)


def test_ties_go_to_the_first_object_whatever_the_order():
    lg = np.full((5, 5), 2.0, dtype=np.float32)
    whole = (slice(0, 5), slice(0, 5))
    out = np.zeros((5, 5), np.int32)
    paste_objects(out, [(whole, lg, 1), (whole, lg, 0)], ids=[7, 9])
    assert (out == 7).all()


def disc_objects(n, shape, radius):
    """Full-size logits of ``n`` overlapping discs, made one at a time (a generator)."""
    rng = np.random.default_rng(0)
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    cols = np.arange(shape[1], dtype=np.float32)[None, :]
    whole = (slice(0, shape[0]), slice(0, shape[1]))
    for _ in range(n):
        r, c = rng.uniform(radius, shape[0] - radius), rng.uniform(radius, shape[1] - radius)
        yield whole, np.float32(radius) - np.hypot(rows - np.float32(r), cols - np.float32(c))


def test_paste_holds_one_object_at_a_time():
    """150 full-size 600x600 logit arrays (216 MB if held) streamed through the merge:
    traced memory stays near one object and the map, not the sum."""
    tracemalloc.start()
    try:
        out = np.zeros((600, 600), np.int32)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        paste_objects(out, disc_objects(150, out.shape, 20), max_hole_area=100,
                      max_sprinkle_area=20)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(np.unique(out)) > 100
    assert peak < 40e6, f"{peak / 1e6:.0f} MB traced"


# ------------------------------------------------------------------------- segment
@pytest.fixture
def recorded(monkeypatch, tiny_segmenter):
    """Every decoder call's object count, and every upsampled batch: its size and how
    many earlier batches were still alive when it was made."""
    calls = {"decoder": [], "upsampled": [], "alive": []}
    real_model = tiny_segmenter.model
    real_post = type(tiny_segmenter.processor).post_process_masks
    alive: list[weakref.ref] = []

    class Spy:
        def __getattr__(self, name):
            return getattr(real_model, name)

        def __call__(self, **kw):
            calls["decoder"].append(kw["input_points"].shape[1])
            return real_model(**kw)

    def post(self, masks, *args, **kw):
        calls["alive"].append(sum(r() is not None for r in alive))
        out = real_post(self, masks, *args, **kw)
        calls["upsampled"].append(out[0].numel())
        alive.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(tiny_segmenter, "model", Spy())
    monkeypatch.setattr(type(tiny_segmenter.processor), "post_process_masks", post)
    return calls


def clicks(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [ObjectPrompt(points=[(rng.uniform(0, shape[0] - 1), rng.uniform(0, shape[1] - 1))])
            for _ in range(n)]


def test_segment_works_in_bounded_batches(tiny_segmenter, recorded, monkeypatch):
    """80 clicks on a 400x400 image (0.64 MB of logits each; 4 MB upsampled at once
    here): the decoder sees at most DECODE_BATCH objects, at most UPSAMPLE_BYTES are
    upsampled at once and each batch is gone before the next; the labels equal the old
    rule on full-size logits."""
    monkeypatch.setattr(segmenter, "UPSAMPLE_BYTES", 4 << 20)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)
    prompts = clicks(80, image.shape)
    labels = tiny_segmenter.segment(image, prompts, max_hole_area=50, max_sprinkle_area=10)
    assert sum(recorded["decoder"]) == 80
    assert max(recorded["decoder"]) <= segmenter.DECODE_BATCH < 80
    assert max(recorded["upsampled"]) <= (4 << 20) // 4  # 6 objects of 400x400
    assert max(recorded["alive"]) == 0  # no earlier batch alive when the next is made
    preds = tiny_segmenter.predict(tiny_segmenter.encode(image), prompts)
    whole = (slice(0, 400), slice(0, 400))
    want = np.zeros((400, 400), np.int32)
    old_paste_objects(want, [(whole, p.logits) for p in preds], None, 50, 10)
    np.testing.assert_array_equal(labels, want)
    assert len(np.unique(labels)) > 10


@pytest.fixture(scope="module")
def tiled(tiny_tracker_dir):
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                         overlap=28)


def test_tiled_segment_and_cropped_objects(tiled, tmp_path):
    """On a tiled image, into NumPy and Zarr: the labels of the old rule on the tiles'
    logits; ``crop=True`` objects are exactly the positive box of the tile's logits."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (250, 300, 3), dtype=np.uint8)
    prompts = clicks(25, image.shape, seed=1) + [ObjectPrompt(box=(100, 120, 170, 200))]
    full = tiled.predict_objects(image, prompts)
    cropped = tiled.predict_objects(image, prompts, crop=True)
    for f, c in zip(full, cropped, strict=True):
        rows, cols = mask_box(f.logits > 0)
        r0, c0 = f.region[0].start, f.region[1].start
        assert c.region == (slice(r0 + rows.start, r0 + rows.stop),
                            slice(c0 + cols.start, c0 + cols.stop))
        np.testing.assert_array_equal(c.logits, f.logits[rows, cols])
        assert (c.iou_score, c.object_score) == (f.iou_score, f.object_score)
    assert any(c.logits.size < f.logits.size for f, c in zip(full, cropped, strict=True))
    want = np.zeros(image.shape[:2], np.int32)
    ids = list(range(100, 126))
    old_paste_objects(want, [(o.region, o.logits) for o in full], ids, 30, 5)
    got = tiled.segment(image, prompts, ids=ids, max_hole_area=30, max_sprinkle_area=5)
    np.testing.assert_array_equal(got, want)
    z = zarr.open_array(tmp_path / "l.zarr", mode="w", shape=image.shape[:2], chunks=(64, 64),
                        dtype=np.int32)
    tiled.segment(image, prompts, ids=ids, max_hole_area=30, max_sprinkle_area=5, out=z)
    np.testing.assert_array_equal(z[:], want)
    assert len(np.unique(want)) > 10


def test_iter_objects_yields_cropped_objects_and_checks_first(tiny_segmenter):
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    got = dict(tiny_segmenter.iter_objects(image, clicks(5, image.shape)))
    assert sorted(got) == list(range(5))
    for obj in got.values():
        assert obj.logits.shape == (obj.region[0].stop - obj.region[0].start,
                                    obj.region[1].stop - obj.region[1].start)
        pos = obj.logits > 0
        assert obj.logits.size == 0 or (pos[0].any() and pos[-1].any() and pos[:, 0].any()
                                        and pos[:, -1].any())  # the mask's box exactly
    with pytest.raises(ValueError, match="outside"):
        next(tiny_segmenter.iter_objects(image, [ObjectPrompt(points=[(70, 5)])]))


# ------------------------------------------------------------- absurd everything grids
def test_points_per_side_bound_api(tiny_segmenter):
    assert MAX_POINTS_PER_SIDE == 256
    EverythingSettings(points_per_side=MAX_POINTS_PER_SIDE)
    with pytest.raises(ValueError, match="points_per_side must be at most 256"):
        EverythingSettings(points_per_side=100_000)
    before = tiny_segmenter.encoder_calls
    with pytest.raises(ValueError, match="at most 256"):
        generate_everything(tiny_segmenter, np.zeros((40, 40), np.uint8), points_per_side=257)
    assert tiny_segmenter.encoder_calls == before


def test_points_per_side_bound_cli(tmp_path, tiny_tracker_dir, capsys, monkeypatch):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((40, 50), np.uint16))
    loads = []
    monkeypatch.setattr(Sam3Segmenter, "from_pretrained",
                        classmethod(lambda *a, **k: loads.append(a)))
    before = sorted(tmp_path.iterdir())
    rc = cli.main(["segment", str(tmp_path / "img.tif"), "--everything", "--points-per-side",
                   "100000", "--model", str(tiny_tracker_dir), "--device", "cpu",
                   "--out", str(tmp_path / "labels.zarr")])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert cap.err.startswith("napari-sam3: error:") and cap.err.count("\n") == 1
    assert "points_per_side must be at most 256" in cap.err and "Traceback" not in cap.err
    assert sorted(tmp_path.iterdir()) == before and not loads  # refused before loading
