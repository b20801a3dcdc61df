"""Propagation at full size on the CPU: our loop against the bare transformers video loop.

Random full-size weights (``Sam3TrackerVideoConfig()``, saved once as a checkpoint that
both loops load). The encoder never runs: every slice gets a random embedding of the
encoder's shapes, put where each loop looks for it:

* ``ours``  ``Sam3Segmenter.iter_propagate``; the embedding sits in the segmenter's
            in-memory cache under the key our loop computes for the slice (the image
            encoder is replaced by a function that raises, so a key miss fails loudly);
* ``bare``  transformers' documented loop on the same video model and the same tensors:
            ``init_video_session(video=frames)``, the embeddings handed to
            ``session.cache.cache_vision_features`` (the video model has no vision
            encoder, so a miss fails too), ``add_inputs_to_inference_session``,
            ``model(...)`` on the prompted slice, ``propagate_in_video_iterator``
            forward and ``post_process_masks`` per slice.

Timing: the two loops advance one slice each in turn (interleaved per slice, one
process, after a warm-up of both; which goes first alternates per slice); the figure is
the median over the tracked slices (the prompted slice is reported apart, as
"conditioning"), with the share of the CPU other processes took. Time inside the video
model's forward is recorded too, so "outside the model" shows our own work. Both loops'
mask logits are compared slice by slice (they should be identical).

Memory: each loop runs in its own process on stacks of several depths; the figures are
resident-memory growth after the models, the stack and the embeddings are in memory:
peak (sampled) and retained at the end, and the bytes of tensors the session holds.

Usage::

    python benchmarks/bench_propagate_full.py [--slices 20] [--objects 1 5]
        [--depths 10 20 40] [--memory-objects 1] [--model-dir DIR] [--json out.json]
    python benchmarks/bench_propagate_full.py --tiny      # the tiny model: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _machine import cpu_snapshot, loadavg, machine_info, other_load, rss_mb
from bench_propagate import make_stack, session_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

HERE = Path(__file__).resolve()
SEEDS = [(0.5, 0.25), (0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)]  # (row, col) fractions


def build_checkpoint(folder: Path, tiny: bool) -> Path:
    """A random video-tracker checkpoint (full size, or tiny); kept if already there."""
    from napari_sam3.core.torch_import import prepare_torch_import

    prepare_torch_import()
    from napari_sam3.testing import save_random_video_tracker

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    if tiny:
        return save_random_video_tracker(folder, seed=0)
    from transformers import Sam3TrackerVideoConfig

    return save_random_video_tracker(folder, Sam3TrackerVideoConfig(), seed=0)


class Setup:
    """Models, stack, prompts and the random slice embeddings, shared by both loops."""

    def __init__(self, model_dir: str, depth: int, n_objects: int):
        import torch

        from napari_sam3 import ObjectPrompt, Sam3Segmenter

        torch.set_flush_denormal(True)  # random weights may produce denormals on CPU
        self.seg = Sam3Segmenter.from_pretrained(model_dir, device="cpu", cache_bytes=8 << 30)
        self.engine = self.seg.video_tracker()
        self.net, self.proc = self.engine.model, self.engine.processor
        self.side = self.seg.input_size  # one tile per slice
        self.stack = make_stack(depth, self.side)
        pts = [(int(self.side * r), int(self.side * c)) for r, c in SEEDS[:n_objects]]
        self.points = pts
        self.prompts = {0: {i + 1: ObjectPrompt(points=[p]) for i, p in enumerate(pts)}}
        self.feats = self.inject(depth)
        self.pos = self.engine.position_embeddings(self.feats[0])

        def no_encoder(*_a, **_k):
            raise RuntimeError("the image encoder was called: an injected key did not match")

        self.seg.encode_rgb = no_encoder

    def inject(self, depth: int) -> list:
        """Random raw features per slice, cached under the keys our loop looks up."""
        import torch

        from napari_sam3.core.propagation import StackFrames, _Grid, stack_limits
        from napari_sam3.core.segmenter import ImageEmbedding, with_no_memory
        from napari_sam3.core.tiling import TileGrid

        frames = StackFrames(self.stack)
        limits = stack_limits(frames, None)
        grid = TileGrid(frames.shape[:2], self.seg.tile_size, self.seg.overlap)
        if len(grid) != 1:
            raise RuntimeError("the benchmark's slices must be one tile")
        tile = grid.tiles[0]
        padded = grid.padded_shape(tile)
        model = self.seg.model
        sizes = model.config.vision_config.backbone_feature_sizes
        channels = [
            model.mask_decoder.conv_s0.out_channels,
            model.mask_decoder.conv_s1.out_channels,
            model.config.vision_config.fpn_hidden_size,
        ]
        gen = torch.Generator().manual_seed(0)
        out = []
        for k in range(depth):
            raw = [
                torch.randn((1, c, *hw), generator=gen).to(self.seg.dtype)
                for c, hw in zip(channels, sizes, strict=True)
            ]
            key = self.seg.embedding_key(
                self.seg.tile_rgb(frames[k], _Grid(tile, padded), tile, limits)
            )
            self.seg.memory.put(
                key,
                ImageEmbedding(
                    key=key, raw=raw, features=with_no_memory(model, raw), image_shape=tuple(padded)
                ),
            )
            out.append(raw)
        if len(self.seg.memory) != depth:
            raise RuntimeError("two slices share a cache key: the stack has equal slices")
        return out


def ours_iter(s: Setup):
    """Our loop: one (index, [logits (H, W) per object]) per slice."""
    for r in s.seg.iter_propagate(s.stack, s.prompts, direction="forward", stop_after=10**9):
        yield r.index, r.logits  # stacked outside the timing


def bare_iter(s: Setup, holder: dict | None = None):
    """transformers' loop on the same model and embeddings: one (index, logits) per slice."""
    import torch

    h, w = s.stack.shape[1:3]
    depth = len(s.stack)
    # no inference_mode block around the yields (it would stay on for the caller):
    # transformers' forward and iterator set it themselves
    session = s.proc.init_video_session(
        video=list(s.stack),
        inference_device="cpu",
        dtype=s.seg.dtype,
        max_vision_features_cache_size=depth,
    )
    if holder is not None:
        holder["session"] = session
    for k, raw in enumerate(s.feats[:depth]):
        session.cache.cache_vision_features(
            k,
            {
                "vision_feats": [f.flatten(2).permute(2, 0, 1) for f in raw],
                "vision_pos_embeds": s.pos,
            },
        )
    s.proc.add_inputs_to_inference_session(
        session,
        frame_idx=0,
        obj_ids=list(range(1, len(s.points) + 1)),
        input_points=[[[[c, r]] for r, c in s.points]],
        input_labels=[[[1] for _ in s.points]],
    )
    s.net(inference_session=session, frame_idx=0)
    for out in s.net.propagate_in_video_iterator(session, start_frame_idx=0):
        with torch.inference_mode():
            masks = s.proc.post_process_masks([out.pred_masks], [[h, w]], binarize=False)[0]
        yield out.frame_idx, masks[:, 0].float().numpy()


class ModelClock:
    """Seconds spent inside the video model's forward (hooks on the top module)."""

    def __init__(self, net):
        self.inside = 0.0
        self._t = None
        net.register_forward_pre_hook(self._start)
        net.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.inside += time.perf_counter() - self._t


def timing(model_dir: str, slices: int, n_objects: int, warmup: int) -> dict:
    """Both loops, one slice each in turn; per-slice ms, model ms and logit differences."""
    t0 = time.perf_counter()
    s = Setup(model_dir, slices, n_objects)
    setup_s = time.perf_counter() - t0
    clock = ModelClock(s.net)
    full = s.stack
    if warmup:
        s.stack = full[:warmup]
        for it in (bare_iter(s), ours_iter(s)):
            for _ in it:
                pass
        s.stack = full
    runs = {"bare": bare_iter(s), "ours": ours_iter(s)}
    ms = {k: [] for k in runs}
    model_ms = {k: [] for k in runs}
    worst, flipped = 0.0, 0
    others = []
    for k in range(slices):
        got = {}
        snap = cpu_snapshot()
        for name in ("bare", "ours") if k % 2 == 0 else ("ours", "bare"):  # order alternates
            t0, m0 = time.perf_counter(), clock.inside
            got[name] = next(runs[name])
            ms[name].append(1000 * (time.perf_counter() - t0))
            model_ms[name].append(1000 * (clock.inside - m0))
        others.append(other_load(snap))
        (kb, lb), (ko, lo) = got["bare"], got["ours"]
        lo = np.stack(lo)
        if kb != k or ko != k:
            raise RuntimeError(f"slice order differs: bare {kb}, ours {ko}, expected {k}")
        worst = max(worst, float(np.abs(lb - lo).max()))
        flipped += int(((lb > 0) != (lo > 0)).sum())
        print(
            f"  {n_objects} obj slice {k:3d}: bare {ms['bare'][-1]:9.1f} ms  ours "
            f"{ms['ours'][-1]:9.1f} ms  other processes {100 * others[-1]:3.0f}% of the CPU",
            flush=True,
        )
    if s.seg.encoder_calls:
        raise RuntimeError("the image encoder ran")
    tracked = slice(1, None)
    ratios = [o / b for o, b in zip(ms["ours"][tracked], ms["bare"][tracked], strict=True)]
    res = {
        "objects": n_objects,
        "slices": slices,
        "setup_s": setup_s,
        "conditioning_ms": {k: v[0] for k, v in ms.items()},
        "median_ms": {k: float(np.median(v[tracked])) for k, v in ms.items()},
        "median_model_ms": {k: float(np.median(v[tracked])) for k, v in model_ms.items()},
        "median_ratio": float(np.median(ratios)) if ratios else float("nan"),
        "per_slice_ms": ms,
        "per_slice_model_ms": model_ms,
        "per_slice_other_load": others,
        "max_other_load": max(others[1:], default=0.0),
        "max_abs_logit_diff": worst,
        "mask_pixels_differing": flipped,
    }
    res["median_outside_model_ms"] = {
        k: float(np.median(np.subtract(ms[k], model_ms[k])[tracked])) for k in ms
    }
    return res


class PeakSampler:
    """The highest resident memory seen while running (sampled every 10 ms)."""

    def __init__(self):
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def child(args) -> None:
    """One memory measurement in a fresh process: prints a JSON line."""
    from napari_sam3.core.heap import trim_heap

    s = Setup(args.model, args.depth, args.memory_objects)
    gc.collect()
    trim_heap()
    base = rss_mb()  # after imports, models, stack and embeddings: growth = propagation
    holder: dict = {}
    with PeakSampler() as peak:
        for _ in bare_iter(s, holder) if args.child == "bare" else ours_iter(s):
            pass
    gc.collect()
    trim_heap()
    session = holder["session"] if args.child == "bare" else s.engine.last_session
    held = session_bytes(SimpleNamespace(last_session=session)) / 2**20
    print(
        json.dumps(
            {
                "depth": args.depth,
                "peak_growth_mb": peak.peak - base,
                "retained_mb": rss_mb() - base,
                "session_mb": held,
            }
        )
    )


def spawn(kinds, args, model: str, depth: int, together: bool) -> list[dict]:
    """One child process per loop in ``kinds`` at ``depth``; ``together``: at once (their
    memory is measured apart, so only the wall time changes)."""

    def start(kind):
        cmd = [
            sys.executable,
            str(HERE),
            "--child",
            kind,
            "--model",
            model,
            "--depth",
            str(depth),
            "--memory-objects",
            str(args.memory_objects),
        ]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(kind, proc) -> dict:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{kind} child at depth {depth} failed:\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    if together:
        procs = [(kind, start(kind)) for kind in kinds]
        return [finish(kind, proc) for kind, proc in procs]
    return [finish(kind, start(kind)) for kind in kinds]


def per_slice_mb(rows: list, key: str) -> float:
    """Slope of ``key`` against depth (least squares), MB per tracked slice."""
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit([r["depth"] for r in rows], [r[key] for r in rows], 1)[0])


def table(results: dict) -> str:
    lines = [
        "| objects | bare ms/slice | ours ms/slice | ratio (median per slice) | "
        "outside the model: bare / ours ms | conditioning bare / ours ms | "
        "max logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["timing"]:
        lines.append(
            f"| {r['objects']} | {r['median_ms']['bare']:.0f} | {r['median_ms']['ours']:.0f} | "
            f"{r['median_ratio']:.3f} | {r['median_outside_model_ms']['bare']:.1f} / "
            f"{r['median_outside_model_ms']['ours']:.1f} | {r['conditioning_ms']['bare']:.0f} / "
            f"{r['conditioning_ms']['ours']:.0f} | {r['max_abs_logit_diff']:.2g} |"
        )
    mem = results.get("memory")
    if mem:
        loops = [kind for kind in ("bare", "ours") if kind in mem]
        lines += ["", "| depth | " + " | ".join(f"{k} peak / retained MB" for k in loops)
                  + " | session tensors " + " / ".join(loops) + " MB |",
                  "|---" * (len(loops) + 2) + "|"]
        for rows in zip(*(mem[k] for k in loops), strict=True):
            lines.append(f"| {rows[0]['depth']} | " + " | ".join(
                f"{r['peak_growth_mb']:.0f} / {r['retained_mb']:.0f}" for r in rows)
                + " | " + " / ".join(f"{r['session_mb']:.1f}" for r in rows) + " |")
        lines.append("| MB per slice | " + " | ".join(
            f"{mem[f'{k}_retained_mb_per_slice']:.2f} retained" for k in loops) + " | "
            + " / ".join(f"{mem[f'{k}_session_mb_per_slice']:.2f}" for k in loops) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny model (checks the script)")
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--objects", type=int, nargs="*", default=[1, 5], choices=range(1, 6))
    ap.add_argument("--warmup", type=int, default=2, help="slices of a warm-up run per loop")
    ap.add_argument(
        "--depths",
        type=int,
        nargs="*",
        default=None,
        help="memory runs (default 10 20 40, tiny: 10 20; none given: skip)",
    )
    ap.add_argument("--memory-objects", type=int, default=1, choices=range(1, 6))
    ap.add_argument("--loops", nargs="+", default=["bare", "ours"], choices=["bare", "ours"],
                    help="which loops the memory runs measure (default both)")
    ap.add_argument("--model-dir", help="where the random checkpoint is saved (kept, reused)")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    default_depths = [10, 20] if args.tiny else [10, 20, 40]
    depths = default_depths if args.depths is None else args.depths
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / "video"
        t0 = time.perf_counter()
        model = str(build_checkpoint(folder, args.tiny))
        results: dict = {
            "machine": machine_info(),
            "model": "tiny"
            if args.tiny
            else "full-size Sam3TrackerVideoConfig(), random weights, fp32",
            "checkpoint_s": time.perf_counter() - t0,
            "timing": [],
        }
        print(f"checkpoint ready in {results['checkpoint_s']:.0f} s", flush=True)
        for n in args.objects:
            results["timing"].append(timing(model, args.slices, n, args.warmup))
        if depths:
            loops = tuple(args.loops)
            mem = {"objects": args.memory_objects} | {kind: [] for kind in loops}
            for depth in depths:  # tiny: both children at once, to stay under a minute
                for kind, row in zip(loops, spawn(loops, args, model, depth, args.tiny),
                                     strict=True):
                    mem[kind].append(row)
                    print(f"  memory {kind} depth {depth}: {row}", flush=True)
            for kind in loops:
                mem[f"{kind}_retained_mb_per_slice"] = per_slice_mb(mem[kind], "retained_mb")
                mem[f"{kind}_session_mb_per_slice"] = per_slice_mb(mem[kind], "session_mb")
            results["memory"] = mem
        results["loadavg_end"] = loadavg()
    print(
        json.dumps(
            {k: v for k, v in results.items() if k != "timing"}
            | {
                "timing": [
                    {k: v for k, v in r.items() if not k.startswith("per_slice")}
                    for r in results["timing"]
                ]
            },
            indent=2,
        )
    )
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
