"""The Zarr embedding cache and lazy tiling, measured side by side in one run.

1. Warm versus cold: time to the first mask on an image whose tile is cached (a fresh
   segmenter, so the tile comes from disk) against encoding it; the Zarr read per tile.
2. A 20,000 x 20,000 uint16 image in Zarr: time to the first mask and peak resident
   memory growth beyond the loaded model, labels written into a Zarr array.
3. Cache size per tile on disk, and how precompute time grows with image size.

The tiny test model runs everything; ``--full`` adds the full-size SAM3 tracker
(random weights) for part 1 on CPU: one real encoder run (about two minutes on
2 cores) against reading its cached tile.

Usage::

    python benchmarks/bench_cache.py [--full] [--big 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _machine import cpu_name, rss_mb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class PeakRSS:
    """Samples resident memory every 10 ms in a thread; ``peak`` in MB."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def machine() -> str:
    import platform

    import torch
    import transformers

    return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def warm_vs_cold(model_dir: str, tile: int, label: str, tmp: Path, repeats: int) -> dict:
    from napari_sam3 import ObjectPrompt, Sam3Segmenter

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (tile, tile)).astype(np.uint16)
    prompt = [ObjectPrompt(points=[(tile // 2, tile // 3)])]
    cache = tmp / f"cache-{label}.zarr"
    cold = Sam3Segmenter.from_pretrained(model_dir, device="cpu", cache=cache, tile_size=tile)
    t0 = time.perf_counter()
    cold.segment(image, prompt, limits=(0, 4000))
    t_cold = time.perf_counter() - t0
    warm_times, read_times = [], []
    for _ in range(repeats):
        warm = Sam3Segmenter.from_pretrained(model_dir, device="cpu", cache=cache, tile_size=tile)
        warm.model, warm.processor = cold.model, cold.processor  # same weights, no reload
        t0 = time.perf_counter()
        warm.segment(image, prompt, limits=(0, 4000))
        warm_times.append(time.perf_counter() - t0)
        assert warm.encoder_calls == 0
        (key,) = warm.store.disk_entries()
        t0 = time.perf_counter()
        warm.store.get(key)
        read_times.append(time.perf_counter() - t0)
    entry = cache / "tiles" / cold.store.disk_entries()[0]
    size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    return {
        "model": label,
        "tile": tile,
        "cold_s": t_cold,
        "warm_s": float(np.median(warm_times)),
        "zarr_read_ms": 1000 * float(np.median(read_times)),
        "entry_mb": size / 2**20,
        "speed_up": t_cold / float(np.median(warm_times)),
    }


def big_image(model_dir: str, side: int, tmp: Path) -> dict:
    import zarr

    from napari_sam3 import ObjectPrompt, Sam3Segmenter

    path = tmp / "big.zarr"
    arr = zarr.create_array(
        path, shape=(side, side), chunks=(1024, 1024), dtype="uint16", fill_value=0
    )
    rng = np.random.default_rng(1)
    block = (rng.normal(1000, 200, (1024, 1024))).clip(0, 65535).astype(np.uint16)
    t0 = time.perf_counter()
    for r in range(0, side, 1024):
        for c in range(0, side, 1024):
            arr[r : r + 1024, c : c + 1024] = block[: min(1024, side - r), : min(1024, side - c)]
    t_make = time.perf_counter() - t0
    del arr
    seg = Sam3Segmenter.from_pretrained(
        model_dir, device="cpu", cache=tmp / "big-cache.zarr", tile_size=1008
    )
    image = zarr.open_array(path, mode="r")
    out = zarr.create_array(
        tmp / "big-labels.zarr",
        shape=(side, side),
        chunks=(1024, 1024),
        dtype="int32",
        fill_value=0,
    )
    base = rss_mb()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        seg.segment(image, [ObjectPrompt(points=[(side // 2 + 17, side // 3 + 5)])], out=out)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        seg.segment(image, [ObjectPrompt(points=[(side // 2 + 40, side // 3 + 9)])], out=out)
        t_second = time.perf_counter() - t0
    return {
        "side": side,
        "make_zarr_s": t_make,
        "first_mask_s": t_first,
        "next_click_same_tile_s": t_second,
        "encoder_calls": seg.encoder_calls,
        "rss_growth_mb": peak.peak - base,
    }


def precompute_growth(model_dir: str, sides, tmp: Path) -> list[dict]:
    from napari_sam3 import Sam3Segmenter

    rows = []
    rng = np.random.default_rng(2)
    for side in sides:
        image = rng.integers(0, 255, (side, side), dtype=np.uint8)
        cache = tmp / f"pre-{side}.zarr"
        seg = Sam3Segmenter.from_pretrained(model_dir, device="cpu", cache=cache, tile_size=1008)
        t0 = time.perf_counter()
        steps = list(seg.precompute(image, limits=(0, 255)))
        dt = time.perf_counter() - t0
        rows.append(
            {
                "side": side,
                "tiles": steps[-1][1],
                "seconds": dt,
                "ms_per_tile": 1000 * dt / steps[-1][1],
                "cache_mb": seg.store.disk_bytes() / 2**20,
            }
        )
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also the full-size model (slow)")
    ap.add_argument("--big", type=int, default=20000, help="side of the big Zarr image")
    ap.add_argument("--sides", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    import torch

    from napari_sam3.testing import full_tracker_config, save_random_tracker

    torch.set_flush_denormal(True)
    print(machine())
    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tiny = str(save_random_tracker(tmp / "tiny"))
        rows = [warm_vs_cold(tiny, 112, "tiny", tmp, repeats=20)]
        if args.full:
            full = str(save_random_tracker(tmp / "full", config=full_tracker_config()))
            rows.append(warm_vs_cold(full, 1008, "full", tmp, repeats=3))
        print("\n1. time to first mask, cached tile vs encoding it")
        print(
            f"{'model':6} {'tile':>5} {'cold s':>9} {'warm s':>9} {'zarr read ms':>13} "
            f"{'entry MB':>9} {'speed-up':>9}"
        )
        for r in rows:
            print(
                f"{r['model']:6} {r['tile']:5d} {r['cold_s']:9.3f} {r['warm_s']:9.3f} "
                f"{r['zarr_read_ms']:13.1f} {r['entry_mb']:9.2f} {r['speed_up']:9.1f}"
            )
        results["warm_vs_cold"] = rows

        big = big_image(tiny, args.big, tmp)
        print(f"\n2. {big['side']}x{big['side']} uint16 Zarr image, tiny model, 1008 px tiles")
        print(
            f"   first mask {big['first_mask_s']:.2f} s (one tile encoded: "
            f"{big['encoder_calls']}), next click in that tile "
            f"{big['next_click_same_tile_s'] * 1000:.0f} ms, peak RSS growth "
            f"{big['rss_growth_mb']:.0f} MB (writing the Zarr input took "
            f"{big['make_zarr_s']:.0f} s)"
        )
        results["big_image"] = big

        growth = precompute_growth(tiny, args.sides, tmp)
        print("\n3. precompute, tiny model, 1008 px tiles, overlap 252")
        print(f"{'side':>6} {'tiles':>6} {'seconds':>8} {'ms/tile':>8} {'cache MB':>9}")
        for r in growth:
            print(
                f"{r['side']:6d} {r['tiles']:6d} {r['seconds']:8.1f} {r['ms_per_tile']:8.1f} "
                f"{r['cache_mb']:9.1f}"
            )
        results["precompute"] = growth
    print(
        f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
