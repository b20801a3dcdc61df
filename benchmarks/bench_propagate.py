"""Propagation through a stack: our loop against the bare transformers video loop.

Per-slice cost, measured in one process, variants interleaved, same stack and prompt:

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
from _machine import rss_mb

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


class Bare:
    """transformers' documented video loop, model and processor loaded once."""

    def __init__(self, model_dir: str):
        from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

        self.model = Sam3TrackerVideoModel.from_pretrained(model_dir).eval()
        self.proc = Sam3TrackerVideoProcessor.from_pretrained(model_dir)

    def __call__(self, stack: np.ndarray, point) -> None:
        import torch

        h, w = stack.shape[1:3]
        with torch.inference_mode():
            session = self.proc.init_video_session(video=list(stack), inference_device="cpu",
                                                   dtype=torch.float32)
            self.proc.add_inputs_to_inference_session(
                session, frame_idx=0, obj_ids=[1], input_points=[[[[point[1], point[0]]]]],
                input_labels=[[[1]]])
            self.model(inference_session=session, frame_idx=0)
            for out in self.model.propagate_in_video_iterator(session, start_frame_idx=0):
                self.proc.post_process_masks([out.pred_masks], [[h, w]], binarize=False)


class Ours:
    """``Sam3Segmenter.iter_propagate``; ``cold`` empties the embedding memory first."""

    def __init__(self, model_dir: str, cache_bytes: int = 2 << 30):
        from napari_sam3 import Sam3Segmenter

        self.seg = Sam3Segmenter.from_pretrained(model_dir, device="cpu", tile_size=4096,
                                                 cache_bytes=cache_bytes)
        self.engine = self.seg.video_tracker()  # loaded outside the timing, as Bare's model

    def __call__(self, stack: np.ndarray, point, cold: bool) -> None:
        from napari_sam3 import ObjectPrompt

        if cold:
            self.seg.memory.clear()
        for _ in self.seg.iter_propagate(stack, {0: [ObjectPrompt(points=[point])]},
                                         direction="forward", stop_after=10 ** 9):
            pass


def session_bytes(engine) -> int:
    """Bytes of tensors the last propagation session still holds (per-slice memories)."""
    import torch

    total, seen = 0, set()

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    walk(engine.last_session.output_dict_per_obj)
    return total


def timing(model_dir: str, depth: int, side: int, repeats: int) -> dict:
    stack = make_stack(depth, side)
    point = (side // 2, side // 4)
    bare, ours = Bare(model_dir), Ours(model_dir)
    bare(stack[:8], point)  # warm-up of both paths
    ours(stack[:8], point, cold=True)
    times: dict[str, list[float]] = {"bare": [], "cold": [], "cached": []}
    for _ in range(repeats):  # interleaved
        for name, run in (("bare", lambda: bare(stack, point)),
                          ("cold", lambda: ours(stack, point, cold=True)),
                          ("cached", lambda: ours(stack, point, cold=False))):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {k: 1000 * float(np.median(v)) / depth for k, v in times.items()}


def child(args) -> None:
    """One memory measurement in a fresh process: prints a JSON line."""
    import resource

    import torch  # noqa: F401  - imports are not part of the growth
    import transformers  # noqa: F401

    import napari_sam3.core.segmenter  # noqa: F401

    stack = make_stack(args.depth, args.side)
    point = (args.side // 2, args.side // 4)
    if args.child == "bare":
        run = Bare(args.model)
        base = rss_mb()  # after imports, the stack and the model: growth = inference
        run(stack, point)
        res = {}
    else:
        run = Ours(args.model, cache_bytes=64 << 20)
        base = rss_mb()
        run(stack, point, cold=True)
        res = {"session_mb": session_bytes(run.engine) / 2**20,
               "embedding_lru_mb": run.seg.memory.nbytes / 2**20}
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
        ms = timing(model, args.timing_depth, args.side, args.repeats)
        n = args.timing_depth
        print(f"per slice, tiny model, {n} slices of {args.side}x{args.side}, medians of "
              f"{args.repeats} interleaved runs in one process")
        print(f"  bare transformers loop  {ms['bare']:7.2f} ms")
        print(f"  ours, nothing cached    {ms['cold']:7.2f} ms   ratio {ms['cold'] / ms['bare']:.2f}")
        print(f"  ours, slices cached     {ms['cached']:7.2f} ms   "
              f"ratio {ms['cached'] / ms['bare']:.2f}")
        results["per_slice_ms"] = ms
        print("\npeak RSS growth (MB) during propagation, by stack depth (ours: embedding "
              "LRU capped at 64 MB)")
        print(f"{'depth':>6} {'bare':>8} {'ours':>8} {'ours session':>13} {'ours LRU':>9}")
        mem = []
        for depth in args.depths:
            b = spawn("bare", model, depth, args.side)
            o = spawn("ours", model, depth, args.side)
            mem.append({"depth": depth, "bare_mb": b["peak_growth_mb"],
                        "ours_mb": o["peak_growth_mb"], "ours_session_mb": o["session_mb"],
                        "ours_lru_mb": o["embedding_lru_mb"]})
            print(f"{depth:6d} {b['peak_growth_mb']:8.0f} {o['peak_growth_mb']:8.0f} "
                  f"{o['session_mb']:13.2f} {o['embedding_lru_mb']:9.1f}")
        results["memory"] = mem
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
