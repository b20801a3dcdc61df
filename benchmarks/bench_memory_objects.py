"""Peak memory of ``Sam3Segmenter.segment`` against the number of objects (issue 8).

A 2000 x 2000 uint8 RGB image, tiled into 1008 px tiles (overlap 252: 3 x 3 tiles,
so every object's logits are upsampled to a real SAM3 tile, 4 MB of float32), the
tiny random tracker (112 px model input: its encoder and decoder cost little, what
is measured is what happens around them), and 10, 100 or 1000 one-point prompts on a
jittered grid over the image. Each case runs in its own process, so cases do not
share heap or allocator state; the tiles are encoded (``precompute``) before the
measured call, so the encoder is not part of it.

* ``new``: ``segment`` as it is: objects decoded ``DECODE_BATCH`` at a time,
  upsampled ``UPSAMPLE_BYTES`` at a time, cut to their boxes and merged as they come
  into a running best-logit map, tile by tile.
* ``old``: the algorithm before issue 8, reproduced here: every object of a tile
  group decoded and upsampled in one batch, every object's full-tile logits kept
  (``predict_objects``), then the old all-pairs ``paste_objects`` (up to
  ``--old-paste-max`` objects: with the random model's large overlapping masks its
  n^2 pairs take many minutes at 1000; above it only the holding phase is measured,
  a lower bound of the old peak).

Reported per case: the process's peak RSS (``ru_maxrss``: imports, model and image
included), the peak during the measured call above the RSS just before it (from
``VmHWM`` after resetting it through ``/proc/self/clear_refs``), the call's wall time,
and whether old and new labels are identical where both were written.

Usage::

    python benchmarks/bench_memory_objects.py             # 10, 100, 1000 objects
    python benchmarks/bench_memory_objects.py --counts 10 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import loadavg, machine_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SIDE = 2000
TILE = 1008


# -- the measured process ----------------------------------------------------------------------
def textured(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.sin(rows / 23.0) * np.cos(cols / 31.0) * 90 + 128
    img = np.stack([base, np.roll(base, 17, axis=1), base[::-1]], axis=-1)
    return np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)


def grid_prompts(n: int, side: int):
    from napari_sam3 import ObjectPrompt

    k = int(np.ceil(np.sqrt(n)))
    step = side / k
    rng = np.random.default_rng(n)
    pts = [((i + rng.uniform(0.2, 0.8)) * step, (j + rng.uniform(0.2, 0.8)) * step)
           for i in range(k) for j in range(k)][:n]
    return [ObjectPrompt(points=[p]) for p in pts]


def old_predict_objects(seg, image, prompts):
    """``predict_objects`` before issue 8: per tile, each group of prompts decoded and
    upsampled in one batch; every object keeps its whole tile of logits."""
    import torch

    from napari_sam3.core.prompts import prompt_bbox, prompt_in_tile
    from napari_sam3.core.segmenter import ObjectMask

    grid = seg.tiles(image)
    limits = seg.resolve_limits(image, None)
    by_tile = {}
    for i, p in enumerate(prompts):
        by_tile.setdefault(grid.route(prompt_bbox(p)), []).append(i)
    results = [None] * len(prompts)
    for tile, idx in by_tile.items():
        emb = seg.encode_tile(image, grid, tile, limits)
        local = [prompt_in_tile(prompts[i], tile, grid.padded_shape(tile)) for i in idx]
        h, w = tile.shape
        tensors = {k: v.to(seg.device) for k, v in
                   seg._prompt_tensors(emb.image_shape, local).items()}  # all one-point
        with torch.inference_mode():
            out = seg.model(image_embeddings=emb.features, multimask_output=True, **tensors)
            masks, ious = out.pred_masks[0], out.iou_scores[0]
            best = ious.argmax(dim=-1)
            rows = torch.arange(masks.shape[0])
            masks = masks[rows, best][:, None].float()
            logits = seg.processor.post_process_masks(
                [masks.cpu()], [list(emb.image_shape)], binarize=False)[0][:, 0]
        for i, lg in zip(idx, logits, strict=True):
            results[i] = ObjectMask(tile.slices, lg.numpy()[:h, :w], 0.0, 0.0)
    return results


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(variant: str, n: int, folder: str, labels_path: str, old_paste_max: int) -> dict:
    import gc

    import torch

    from napari_sam3 import Sam3Segmenter
    from napari_sam3.core.postprocess import DEFAULTS
    from napari_sam3.testing import reference_paste_objects

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    seg = Sam3Segmenter.from_pretrained(folder, device="cpu", tile_size=TILE)
    image = textured((SIDE, SIDE))
    prompts = grid_prompts(n, SIDE)
    for _ in seg.precompute(image):
        pass
    gc.collect()
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    labels, pasted = None, True
    if variant == "new":
        labels = seg.segment(image, prompts)
    else:
        objects = old_predict_objects(seg, image, prompts)
        if n <= old_paste_max:
            labels = np.zeros((SIDE, SIDE), np.int32)
            reference_paste_objects(labels, [(o.region, o.logits) for o in objects], None,
                                    DEFAULTS.max_hole_area, DEFAULTS.max_sprinkle_area)
        else:
            pasted = False
        del objects
    seconds = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    if labels is not None:
        np.save(labels_path, labels)
    return {"variant": variant, "objects": n, "seconds": seconds, "pasted": pasted,
            "rss_before_mb": before / 1024,
            "call_peak_mb": (hwm - before) / 1024 if reset else float("nan"),
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "labels": None if labels is None else int(len(np.unique(labels)) - 1)}


# -- the parent --------------------------------------------------------------------------------
def run_case(variant, n, folder, tmp, old_paste_max) -> dict:
    labels = str(Path(tmp) / f"{variant}_{n}.npy")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(n), str(folder), labels,
         str(old_paste_max)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} {n} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["labels_path"] = labels if row["labels"] is not None else None
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--old-paste-max", type=int, default=100,
                    help="largest count for which the old all-pairs paste is run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        variant, n, folder, labels, old_max = args.child
        print(json.dumps(child(variant, int(n), folder, labels, int(old_max))))
        return 0

    from napari_sam3.testing import save_random_tracker

    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: python {' '.join(['benchmarks/bench_memory_objects.py', *sys.argv[1:]])}")
    print(f"image {SIDE}x{SIDE} uint8 RGB, tiles {TILE} px (3x3), tiny random tracker, "
          "one-point prompts; each case in its own process, torch on 1 thread\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_tracker(Path(tmp) / "tiny", seed=0)
        for n in args.counts:
            for variant in ("old", "new"):
                row = run_case(variant, n, folder, tmp, args.old_paste_max)
                rows.append(row)
                print(f"  {variant} {n}: {row['call_peak_mb']:.0f} MB over "
                      f"{row['rss_before_mb']:.0f} MB, {row['seconds']:.1f} s", flush=True)
            old, new = rows[-2], rows[-1]
            same = None
            if old["labels_path"] and new["labels_path"]:
                same = bool(np.array_equal(np.load(old["labels_path"]),
                                           np.load(new["labels_path"])))
            new["identical_to_old"] = same
    print()
    print("| objects | old: call peak | old: process peak | old: s | new: call peak "
          "| new: process peak | new: s | labels | identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for old, new in zip(rows[::2], rows[1::2], strict=True):
        star = "" if old["pasted"] else " *"
        same = {True: "yes", False: "NO", None: "n/a"}[new["identical_to_old"]]
        print(f"| {new['objects']} | {old['call_peak_mb']:.0f} MB{star} "
              f"| {old['process_peak_mb']:.0f} MB{star} | {old['seconds']:.1f}{star} "
              f"| {new['call_peak_mb']:.0f} MB | {new['process_peak_mb']:.0f} MB "
              f"| {new['seconds']:.1f} | {new['labels']} | {same} |")
    if any(not r["pasted"] for r in rows):
        print(f"\n* old paste not run above {args.old_paste_max} objects: holding phase "
              "only (a lower bound of the old peak)")
    news = [r["call_peak_mb"] for r in rows[1::2]]
    print(f"\nnew: call peak spread over the counts {max(news) - min(news):.0f} MB "
          "(goal: within 100 MB)")
    info["loadavg_end"] = loadavg()
    print(f"load average (1 min): {info['loadavg_start']} at start, {info['loadavg_end']} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
