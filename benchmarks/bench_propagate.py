"""Propagation through a stack: our loop against the bare transformers video loop.

Per-slice cost, measured in one run on the same stack and prompt:

* ``bare``        transformers' documented loop: ``init_video_session(video=frames)``,
                  ``add_inputs_to_inference_session``, ``model(...)`` on the prompted
                  slice, ``propagate_in_video_iterator`` forward, and
                  ``post_process_masks`` per slice (the video model encodes each frame);
* ``ours cold``   ``Sam3Segmenter.iter_propagate`` with nothing cached (each slice is
                  encoded once by the image tracker and handed to the session);
* ``ours cached`` the same again with every slice's embedding cached.

Peak memory against stack depth: each variant runs in its own process on stacks of
50, 200 and 500 slices; the figure is peak RSS growth after imports and after the
input stack is in memory (so: the tiny model, the session and what it keeps).

Tiny random model on CPU (the full model's encoder is ~2 min per slice here).

Usage::

    python benchmarks/bench_propagate.py [--depths 50 200 500] [--side 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

HERE = Path(__file__).resolve()


def make_stack(depth: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:side, 0:side]
    out = np.empty((depth, side, side, 3), np.uint8)
    for z in range(depth):
        r = side / 6 * (1 - z / (2 * depth))
        disc = (rows - side / 2) ** 2 + (cols - side / 4 - z * side / (2 * depth)) ** 2 <= r * r
        img = 40 + 150 * disc + rng.normal(0, 12, disc.shape)
        out[z] = np.clip(img, 0, 255).astype(np.uint8)[..., None]
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_bare(model_dir: str, stack: np.ndarray, point) -> float:
    import torch
    from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

    model = Sam3TrackerVideoModel.from_pretrained(model_dir).eval()
    proc = Sam3TrackerVideoProcessor.from_pretrained(model_dir)
    h, w = stack.shape[1:3]
    t0 = time.perf_counter()
    with torch.inference_mode():
        session = proc.init_video_session(
            video=list(stack), inference_device="cpu", dtype=torch.float32
        )
        proc.add_inputs_to_inference_session(
            session,
            frame_idx=0,
            obj_ids=[1],
            input_points=[[[[point[1], point[0]]]]],
            input_labels=[[[1]]],
        )
        model(inference_session=session, frame_idx=0)
        for out in model.propagate_in_video_iterator(session, start_frame_idx=0):
            proc.post_process_masks([out.pred_masks], [[h, w]], binarize=False)
    return time.perf_counter() - t0


def run_ours(model_dir: str, stack: np.ndarray, point, repeat: bool):
    from napari_sam3 import ObjectPrompt, Sam3Segmenter

    seg = Sam3Segmenter.from_pretrained(model_dir, device="cpu", tile_size=4096)
    seg.video_tracker()  # load outside the timing, as the bare loop does
    prompts = {0: [ObjectPrompt(points=[point])]}
    times = []
    for _ in range(2 if repeat else 1):
        t0 = time.perf_counter()
        for _ in seg.iter_propagate(stack, prompts, direction="forward", stop_after=10**9):
            pass
        times.append(time.perf_counter() - t0)
    return times


def child(args) -> None:
    """One measurement in a fresh process: prints a JSON line."""
    import torch  # noqa: F401  - imports are not part of the growth
    import transformers  # noqa: F401
    from transformers import Sam3TrackerVideoModel  # noqa: F401

    import napari_sam3.segmenter  # noqa: F401

    stack = make_stack(args.depth, args.side)
    point = (args.side // 2, args.side // 4)
    base = rss_mb()  # after imports and the stack itself: growth = model + inference
    if args.child == "bare":
        t = run_bare(args.model, stack, point)
        res = {"seconds": t}
    else:
        t = run_ours(args.model, stack, point, repeat=args.child == "ours-timing")
        res = {"seconds": t[0], "cached_seconds": t[-1]}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res.update(depth=args.depth, peak_growth_mb=peak - base)
    print(json.dumps(res))


def spawn(kind: str, model: str, depth: int, side: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--child",
            kind,
            "--model",
            model,
            "--depth",
            str(depth),
            "--side",
            str(side),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", type=int, nargs="*", default=[50, 200, 500])
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--timing-depth", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from napari_sam3.testing import save_random_video_tracker

    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        model = str(save_random_video_tracker(Path(d) / "video"))
        rows = []
        for _ in range(args.repeats):  # interleaved: bare, ours, bare, ours...
            b = spawn("bare", model, args.timing_depth, args.side)
            o = spawn("ours-timing", model, args.timing_depth, args.side)
            rows.append((b["seconds"], o["seconds"], o["cached_seconds"]))
        bare, cold, warm = (float(np.median([r[i] for r in rows])) for i in range(3))
        n = args.timing_depth
        print(
            f"per slice, tiny model, {n} slices of {args.side}x{args.side}, median of "
            f"{args.repeats} runs"
        )
        print(f"  bare transformers loop  {1000 * bare / n:7.2f} ms")
        print(f"  ours, nothing cached    {1000 * cold / n:7.2f} ms   ratio {cold / bare:.2f}")
        print(f"  ours, slices cached     {1000 * warm / n:7.2f} ms   ratio {warm / bare:.2f}")
        results["per_slice_ms"] = {
            "bare": 1000 * bare / n,
            "ours_cold": 1000 * cold / n,
            "ours_cached": 1000 * warm / n,
            "ratio_cold": cold / bare,
            "ratio_cached": warm / bare,
        }
        print("\npeak RSS growth (MB) over the loaded model, by stack depth")
        print(f"{'depth':>6} {'bare':>8} {'ours':>8}")
        mem = []
        for depth in args.depths:
            b = spawn("bare", model, depth, args.side)
            o = spawn("ours", model, depth, args.side)
            mem.append(
                {"depth": depth, "bare_mb": b["peak_growth_mb"], "ours_mb": o["peak_growth_mb"]}
            )
            print(f"{depth:6d} {b['peak_growth_mb']:8.0f} {o['peak_growth_mb']:8.0f}")
        results["memory"] = mem
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
