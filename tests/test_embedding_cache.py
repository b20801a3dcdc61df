"""The Zarr embedding cache: exactness, invalidation, crash safety, corruption, fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_sam3 import ObjectPrompt, Sam3Segmenter
from napari_sam3.core.cache import MemoryLRU
from napari_sam3.core.embedding_store import FORMAT_VERSION, CacheWarning, EmbeddingStore

TILES = dict(tile_size=112, overlap=48)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(11)
    return rng.integers(0, 255, (200, 250, 3), dtype=np.uint8)  # 3 x 4 tiles


PROMPTS = [ObjectPrompt(points=[(30, 40)]), ObjectPrompt(box=(100, 120, 150, 200)),
           ObjectPrompt(points=[(180, 230), (170, 200)], point_labels=[1, 0])]


def load(tiny_tracker_dir, **kw):
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", **TILES, **kw)


def test_float32_cache_is_exact(tiny_tracker_dir, image, tmp_path):
    uncached = load(tiny_tracker_dir)
    first = load(tiny_tracker_dir, cache=tmp_path / "c.zarr", cache_dtype="float32")
    expected = uncached.predict_objects(image, PROMPTS)
    got_first = first.predict_objects(image, PROMPTS)
    assert first.encoder_calls == 3 and first.store.disk_writes == 3
    warm = load(tiny_tracker_dir, cache=tmp_path / "c.zarr", cache_dtype="float32")
    got_warm = warm.predict_objects(image, PROMPTS)
    assert warm.encoder_calls == 0 and warm.store.disk_reads == 3
    for e, a, b in zip(expected, got_first, got_warm, strict=True):
        np.testing.assert_array_equal(a.logits, e.logits)
        np.testing.assert_array_equal(b.logits, e.logits)


def test_float16_cache_bound(tiny_tracker_dir, image, tmp_path):
    """float16 storage: logits within 1e-4 of float32 and masks differing on <0.1% of pixels."""
    exact = load(tiny_tracker_dir).predict_objects(image, PROMPTS)
    half = load(tiny_tracker_dir, cache=tmp_path / "h.zarr").predict_objects(image, PROMPTS)
    diff = max(np.abs(a.logits - b.logits).max() for a, b in zip(exact, half, strict=True))
    flips = sum(((a.logits > 0) != (b.logits > 0)).sum() for a, b in zip(exact, half, strict=True))
    assert 0 < diff <= 1e-4
    assert flips <= 1e-3 * sum(a.logits.size for a in exact)


def test_store_records_what_made_it(tiny_tracker_dir, image, tmp_path):
    import zarr

    seg = load(tiny_tracker_dir, cache=tmp_path / "c.zarr")
    seg.segment(image, PROMPTS[:1])
    root = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert root.attrs["napari_sam3"]["format_version"] == FORMAT_VERSION
    (key,) = seg.store.disk_entries()
    meta = zarr.open_group(tmp_path / "c.zarr" / "tiles" / key, mode="r").attrs.asdict()
    assert meta["dtype"] == "float16" and len(meta["checksums"]) == 3
    assert meta["meta"]["model"]["weights"] and meta["meta"]["tile_size"] == 112
    assert meta["meta"]["overlap"] == 48 and meta["meta"]["compute_dtype"] == "torch.float32"


def test_other_model_or_settings_never_reuse(tiny_tracker_dir, image, tmp_path):
    from napari_sam3.testing import save_random_tracker

    cache = tmp_path / "c.zarr"
    load(tiny_tracker_dir, cache=cache).segment(image, PROMPTS[:1])
    other = save_random_tracker(tmp_path / "other", seed=1)
    seg = Sam3Segmenter.from_pretrained(str(other), device="cpu", cache=cache, **TILES)
    seg.segment(image, PROMPTS[:1])
    assert seg.encoder_calls == 1  # another model: its own entry
    f32 = load(tiny_tracker_dir, cache=cache, cache_dtype="float32")
    f32.segment(image, PROMPTS[:1])
    assert f32.encoder_calls == 1  # another storage dtype: its own entry
    assert len(seg.store.disk_entries()) == 3


def test_one_changed_pixel_invalidates_its_tile_only(tiny_tracker_dir, image, tmp_path):
    seg = load(tiny_tracker_dir, cache=tmp_path / "c.zarr")
    steps = list(seg.precompute(image))
    assert len(steps) == 12 and seg.encoder_calls == 12
    assert list(seg.precompute(image))[-1] == (12, 12, False) and seg.encoder_calls == 12
    edited = image.copy()
    edited[5, 5, 0] ^= 1  # inside tile (0, 0) only
    list(seg.precompute(edited))
    assert seg.encoder_calls == 13
    edited[5, 100, 0] ^= 1  # in the overlap of tiles (0, 0) and (0, 1)
    list(seg.precompute(edited))
    assert seg.encoder_calls == 15


def test_precompute_region(tiny_tracker_dir, image):
    seg = load(tiny_tracker_dir)
    assert list(seg.precompute(image, region=(0, 0, 50, 50)))[-1][:2] == (1, 1)


def test_corrupt_chunk_is_recomputed(tiny_tracker_dir, image, tmp_path):
    cache = tmp_path / "c.zarr"
    load(tiny_tracker_dir, cache=cache, cache_dtype="float32").segment(image, PROMPTS[:1])
    (key,) = EmbeddingStore(cache, "float32").disk_entries()
    chunk = next(p for p in (cache / "tiles" / key / "2").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    seg = load(tiny_tracker_dir, cache=cache, cache_dtype="float32")
    labels = seg.segment(image, PROMPTS[:1])
    assert seg.encoder_calls == 1 and seg.store.disk_writes == 1
    np.testing.assert_array_equal(labels, load(tiny_tracker_dir).segment(image, PROMPTS[:1]))


def test_unusable_location_falls_back_with_warning(tiny_tracker_dir, image, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(CacheWarning, match="memory only"):
        seg = load(tiny_tracker_dir, cache=blocker / "c.zarr")
    assert seg.store.path is None
    np.testing.assert_array_equal(seg.segment(image, PROMPTS),
                                  load(tiny_tracker_dir).segment(image, PROMPTS))


def test_full_disk_falls_back_with_warning(tiny_tracker_dir, image, tmp_path, monkeypatch):
    seg = load(tiny_tracker_dir, cache=tmp_path / "c.zarr")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(seg.store, "_write", disk_full)
    with pytest.warns(CacheWarning, match="No space left"):
        labels = seg.segment(image, PROMPTS)
    assert seg.store.path is None
    np.testing.assert_array_equal(labels, load(tiny_tracker_dir).segment(image, PROMPTS))


def test_memory_lru_is_bounded_in_bytes():
    lru = MemoryLRU(100, len)
    for k in "abcd":
        lru.put(k, "x" * 30)
    assert len(lru) == 3 and "a" not in lru and lru.nbytes == 90
    lru.get("b")
    lru.put("e", "x" * 30)
    assert "b" in lru and "c" not in lru


WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from napari_sam3 import Sam3Segmenter
    model, cache, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seg = Sam3Segmenter.from_pretrained(model, device="cpu", cache=cache, tile_size=112,
                                        overlap=48)
    real = seg.encode_rgb
    def slow(rgb, key=""):
        time.sleep(delay)
        return real(rgb, key)
    seg.encode_rgb = slow
    image = np.random.default_rng(11).integers(0, 255, (200, 250, 3), dtype=np.uint8)
    for done, total, _ in seg.precompute(image):
        print(done, total, flush=True)
    print("encoded", seg.encoder_calls, flush=True)
""")


def run_worker(tiny_tracker_dir, cache, delay):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tiny_tracker_dir), str(cache),
                             str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_killed_precompute_resumes(tiny_tracker_dir, image, tmp_path):
    cache = tmp_path / "c.zarr"
    proc = run_worker(tiny_tracker_dir, cache, 0.2)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cache / "tiles").glob("*"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = EmbeddingStore(cache).disk_entries()
    assert 3 <= len(done_before) < 12
    seg = load(tiny_tracker_dir, cache=cache)
    list(seg.precompute(image))
    assert seg.encoder_calls == 12 - len(done_before)
    fresh = load(tiny_tracker_dir, cache=cache)
    for key in fresh.store.disk_entries():
        assert fresh.store.get(key) is not None  # every entry passes its checksums
    assert len(fresh.store.disk_entries()) == 12


def test_two_processes_share_a_store(tiny_tracker_dir, image, tmp_path):
    cache = tmp_path / "c.zarr"
    procs = [run_worker(tiny_tracker_dir, cache, 0.0) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    store = EmbeddingStore(cache)
    assert len(store.disk_entries()) == 12
    assert all(store.get(k) is not None for k in store.disk_entries())
    assert not any(Path(cache, "tmp").iterdir())
    seg = load(tiny_tracker_dir, cache=cache)
    list(seg.precompute(image))
    assert seg.encoder_calls == 0
