"""Precompute on dask.distributed against in-process, on this machine (issue 11).

1. A bare encoder loop (``encode_rgb``, no cache) at 1 torch thread: tiles/s.
2. In-process ``precompute`` (torch's default threads) into a fresh cache: tiles/s.
3. ``precompute(client=...)`` on a LocalCluster of 2 workers x 1 thread into a fresh
   cache (models loaded by a warm-up run first): tiles/s, and each worker's throughput
   from the task stream (its tiles / its busy time) against the bare loop at 1 thread.
4. Scaling on paper: per-tile cost x tiles of a 100,000^2 slide on 1, 8 and 64 workers,
   with the float16 cache bytes that move.

Tiny random model by default (the overhead per task dominates); ``--full`` uses the
full-size tracker config (random weights; ~2 min per tile on 2 cores, so few tiles).

Usage::

    python benchmarks/bench_distributed.py [--tiles 48] [--full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import machine_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SLIDE = 100_000
FULL_TILE, FULL_OVERLAP = 1008, 252
FLOAT16_TILE_BYTES = 10_616_832  # the tracker's three levels per 1008 px tile


def image_for(n_tiles: int, side: int, overlap: int, seed: int) -> np.ndarray:
    """A uint16 image of about ``n_tiles`` tiles (a row of tiles high, k wide)."""
    stride = side - overlap
    per_row = max(1, int(round(math.sqrt(n_tiles))))
    rows = max(1, -(-n_tiles // per_row))
    shape = (side + (rows - 1) * stride, side + (per_row - 1) * stride)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape, dtype=np.uint16)


def slide_tiles(side=FULL_TILE, overlap=FULL_OVERLAP, length=SLIDE) -> int:
    stride = side - overlap
    per_side = -(-(length - side) // stride) + 1
    return per_side * per_side


def load_worker_model(spec) -> None:
    """Load the model on a worker (returns nothing: a model does not travel back)."""
    from napari_sam3.core.distributed.sources import worker_model

    worker_model(spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=48)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workers", type=int, default=2,
                    help="LocalCluster workers (1 thread each); 1 compares one worker with the "
                         "bare 1-thread loop on an otherwise idle core")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process run")
    args = ap.parse_args()

    from napari_sam3.core.torch_import import prepare_torch_import

    prepare_torch_import()
    import torch
    from distributed import Client, LocalCluster

    from napari_sam3 import Sam3Segmenter
    from napari_sam3.testing import full_tracker_config, save_random_tracker

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model_dir = save_random_tracker(work / "model", full_tracker_config() if args.full else None)
    seg = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu")
    side, overlap = seg.tile_size, seg.overlap
    img = image_for(args.tiles, side, overlap, 1)
    grid = seg.tiles(img)
    n = len(grid)
    results = {"machine": info, "config": "full" if args.full else "tiny", "tiles": n,
               "tile_size": side}

    # 1. bare encoder loop, 1 thread
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rgbs = [seg.tile_rgb(img, grid, t, (0, 4000)) for t in grid.tiles]
    if not args.full:  # a full-size tile is minutes: its first call's set-up is noise
        seg.encode_rgb(rgbs[0])
    bare_times = []
    for rgb in rgbs:
        t0 = time.perf_counter()
        seg.encode_rgb(rgb)
        bare_times.append(time.perf_counter() - t0)
    bare = n / sum(bare_times)
    results["bare_loop_1_thread_s_per_tile"] = bare_times
    torch.set_num_threads(default_threads)
    results["bare_loop_1_thread_tiles_per_s"] = bare
    print(json.dumps({"bare": bare_times}), flush=True)

    # 2. in-process precompute, default threads, fresh cache
    if not args.no_in_process:
        inproc = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu", cache=work / "c1")
        if not args.full:
            list(inproc.precompute(image_for(1, side, overlap, 2), limits=(0, 4000)))  # warm-up
        t0 = time.perf_counter()
        list(inproc.precompute(img, limits=(0, 4000)))
        results["in_process_tiles_per_s"] = n / (time.perf_counter() - t0)
        results["in_process_threads"] = default_threads
        print(json.dumps({"in_process_tiles_per_s": results["in_process_tiles_per_s"]}),
              flush=True)
        del inproc

    # 3. LocalCluster N x 1
    results["cluster_workers"] = args.workers
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.get_task_stream()
        dist = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu", cache=work / "c2")
        if args.full:  # load each worker's model without encoding anything
            from napari_sam3.core.distributed.sources import spec_of

            client.run(load_worker_model, spec_of(dist))
        else:
            list(dist.precompute(image_for(4, side, overlap, 3), limits=(0, 4000),
                                 client=client))
        start = time.time()
        t0 = time.perf_counter()
        list(dist.precompute(img, limits=(0, 4000), client=client))
        results[f"local_cluster_{args.workers}x1_tiles_per_s"] = n / (time.perf_counter() - t0)
        per_worker: dict[str, list] = {}
        for task in client.get_task_stream(start=start):
            if "precompute" not in str(task["key"]):
                continue
            busy = sum(s["stop"] - s["start"] for s in task["startstops"]
                       if s["action"] == "compute")
            per_worker.setdefault(task["worker"], []).append(busy)
        results["per_worker"] = {
            w: {"tiles": len(b), "tiles_per_s": len(b) / sum(b), "s_per_task": b,
                "vs_bare_loop": len(b) / sum(b) / bare} for w, b in per_worker.items()}

    # 4. on paper
    tiles = slide_tiles()
    results["slide_tiles"] = tiles
    results["slide_cache_bytes_float16"] = tiles * FLOAT16_TILE_BYTES
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
