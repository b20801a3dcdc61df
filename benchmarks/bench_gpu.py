"""The GPU run of issue 13: encoder, clicks, propagation, concepts and precompute on CUDA.

Run through ``bash benchmarks/gpu_run.sh`` (it brings what the machine lacks). Random
full-size weights, built here (no download): the SAM3 video tracker's architecture
(``Sam3TrackerVideoConfig()``: clicks load its image tracker, propagation its memory)
and SAM3's detector (``Sam3Config()``). Every figure is a median of repeats after a
warm-up, with the device synchronised before each clock read. Measured:

* encoder ms per 1008 px tile: float32, bfloat16, float16; 1, 4 and 8 tiles per forward
  (``batch_encode.encode_pixels``: the forward and the per-tile copies);
* warm click ms (embedding cached), in the default CUDA dtype: ``segment`` with a point
  and a box (API), the widget's click job (``widget.jobs.segment_job``, no Qt), and
  transformers' own recipe (decoder + ``post_process_masks``) for the ratio; the click
  in a napari viewer under Xvfb only where napari and a display exist (else skipped);
* propagation ms per slice at full size, 1 and 5 objects (slice embeddings cached);
* concept ms per tile, warm (the ViT trunk cached: neck, text, DETR, masks);
* precompute tiles/s with batches into a Zarr cache, against the bare batched encoder
  call on the same tiles (the goal: >= 90%), and without a cache;
* boundary checks: the click, mask, everything and propagation paths under
  ``model.device_guard`` on the GPU (every tensor we hand the model on its device).

``--dry-run`` runs every measurement with the tiny test models on the CPU in seconds
(the figures mean nothing; ``make test`` runs it so this script cannot rot).

Usage::

    bash benchmarks/gpu_run.sh [--dry-run] [--out DIR]
    python benchmarks/bench_gpu.py [--dry-run] [--out DIR]   # when everything is installed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DTYPES = ("float32", "bfloat16", "float16")
BATCHES = (1, 4, 8)


@dataclasses.dataclass
class Plan:
    """Sizes of one run: full size on a GPU, tiny for ``--dry-run``."""

    dry: bool
    device: str
    side: int  # the model's input (tile) side
    budget_s: float  # time for the repeats of one measurement
    slices: int  # propagation stack depth
    precompute_tiles: int  # per side of the precompute image's grid
    reps: int = 20  # at most this many repeats per measurement
    min_reps: int = 3
    warmup: int = 1
    dtype: str | None = None  # clicks, propagation, concepts: None is the device's default

    @property
    def overlap(self) -> int:
        return self.side // 4


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn, plan: Plan, warmup: int | None = None) -> float:
    """Median wall time of ``fn()`` in ms: ``warmup`` runs (default ``plan.warmup``), then
    repeats until ``plan.reps`` or ``plan.budget_s`` (at least ``plan.min_reps``)."""
    for _ in range(plan.warmup if warmup is None else warmup):
        fn()
    sync(plan.device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < plan.min_reps or (len(times) < plan.reps and time.perf_counter() - start
                             < plan.budget_s):
        t = time.perf_counter()
        fn()
        sync(plan.device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cells(shape, seed: int = 0) -> np.ndarray:
    """A uint8 image with blobs: masks with structure, whatever the random weights."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    img = np.full(shape, 40.0)
    for _ in range(max(4, shape[0] * shape[1] // 20000)):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        rad = rng.uniform(0.03, 0.08) * min(shape)
        img[(rows - r) ** 2 + (cols - c) ** 2 <= rad ** 2] = rng.uniform(120, 230)
    return np.clip(img + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)


# -- models ------------------------------------------------------------------------------------
def build_tracker(folder: Path, plan: Plan) -> Path:
    """A random video-tracker checkpoint (full size, or tiny for a dry run), saved."""
    import torch

    from napari_sam3.testing import save_random_video_tracker

    if plan.dry:
        return save_random_video_tracker(folder, seed=0)
    from transformers import Sam3TrackerVideoConfig

    with torch.device(plan.device):  # random init on the GPU: seconds, not a minute
        return save_random_video_tracker(folder, Sam3TrackerVideoConfig(), seed=0)


def load_concept(folder: Path, plan: Plan):
    """SAM3's detector with random weights, in the device's default dtype."""
    from napari_sam3.core.concept import ConceptSegmenter

    if plan.dry:
        from napari_sam3.testing_concept import save_random_concept_model

        save_random_concept_model(folder, seed=0)
        return ConceptSegmenter.from_pretrained(str(folder), device=plan.device,
                                                dtype=plan.dtype, tile_size=plan.side)
    import torch
    from transformers import Sam3Config, Sam3Model

    from napari_sam3.core.model import resolve_dtype
    from napari_sam3.testing_concept import tiny_concept_processor

    torch.manual_seed(0)
    with torch.device(plan.device):  # not saved: 3.4 GB of random weights
        net = Sam3Model(Sam3Config()).eval()
    net = net.to(resolve_dtype(plan.dtype, plan.device))
    return ConceptSegmenter(net, tiny_concept_processor(plan.side), plan.device,
                            model_id="random full Sam3Model", tile_size=plan.side)


# -- measurements ------------------------------------------------------------------------------
def encoder_ms(folder: Path, plan: Plan) -> tuple[dict, dict]:
    """ms per tile for each dtype and batch size, and peak GPU memory (MB)."""
    import torch

    from napari_sam3 import Sam3Segmenter
    from napari_sam3.core.batch_encode import encode_pixels, pixel_batch

    rng = np.random.default_rng(0)
    tiles = [(rng.random((plan.side, plan.side, 3)) * 255).astype(np.uint8)
             for _ in range(max(BATCHES))]
    out, memory = {}, {}
    for dtype in DTYPES:
        seg = Sam3Segmenter.from_pretrained(str(folder), device=plan.device, dtype=dtype)
        out[dtype], memory[dtype] = {}, {}
        for b in BATCHES:
            pixels = pixel_batch(seg, tiles[:b])
            shapes = [t.shape[:2] for t in tiles[:b]]
            if plan.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            ms = timed_ms(lambda s=seg, px=pixels, sh=shapes: encode_pixels(s, px, sh), plan)
            out[dtype][str(b)] = ms / b
            if plan.device.startswith("cuda"):
                memory[dtype][str(b)] = torch.cuda.max_memory_allocated() / 2 ** 20
            print(f"encoder {dtype} batch {b}: {ms / b:.1f} ms/tile", flush=True)
        del seg
        if plan.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out, memory


def _job_click(seg, image, prompt):
    """The widget's click job (its worker-thread generator) on a cached image."""
    from napari_sam3.widget import jobs

    fields = {f.name for f in dataclasses.fields(jobs.ClickRequest)}
    values = {"image": image, "lead": (), "spatial_shape": tuple(image.shape[:2]),
              "limits": None, "prompt": prompt, "obj_id": 1, "max_hole_area": 0,
              "max_sprinkle_area": 0, "image_layer": None, "ignored": 0}
    req = jobs.ClickRequest(**{k: values.get(k) for k in fields})
    lock = threading.Lock()

    def click():
        gen = jobs.segment_job(seg, lock, req)
        try:
            while True:
                next(gen)
        except StopIteration as done:
            return done.value

    return click


def click_ms(seg, plan: Plan) -> dict:
    """Warm clicks on one tile: our API, the widget's job, transformers' recipe."""
    import torch

    from napari_sam3 import ObjectPrompt
    from napari_sam3.core.segmenter import add_no_memory_embedding

    image = cells((plan.side, plan.side), seed=1)
    seg.encode(image)  # cached from here on
    point = ObjectPrompt(points=[(plan.side * 0.4, plan.side * 0.5)])
    box = ObjectPrompt(box=(plan.side * 0.2, plan.side * 0.3, plan.side * 0.6, plan.side * 0.7))
    out = {"api_point": timed_ms(lambda: seg.segment(image, [point]), plan),
           "api_box": timed_ms(lambda: seg.segment(image, [box]), plan)}
    try:
        out["job_point"] = timed_ms(_job_click(seg, image, point), plan)
        out["job_box"] = timed_ms(_job_click(seg, image, box), plan)
    except Exception as e:  # noqa: BLE001 - the widget's API moved: say so, keep the rest
        out["job_point"] = out["job_box"] = f"skipped: {type(e).__name__}: {e}"
    out["widget"] = widget_viewer_status()
    proc, model = seg.processor, seg.model
    rgb = np.repeat(image[..., None], 3, axis=-1)
    inputs = proc(images=rgb, input_points=[[[[plan.side * 0.5, plan.side * 0.4]]]],
                  input_labels=[[[1]]], return_tensors="pt")
    with torch.inference_mode():
        emb = add_no_memory_embedding(model, inputs["pixel_values"].to(seg.device, seg.dtype))
    points = inputs["input_points"].to(seg.device, seg.dtype)
    labels = inputs["input_labels"].to(seg.device)

    def recipe():
        with torch.inference_mode():
            res = model(image_embeddings=emb, input_points=points, input_labels=labels)
            return proc.post_process_masks(res.pred_masks.float().cpu(),
                                           inputs["original_sizes"])

    out["recipe_point"] = timed_ms(recipe, plan)
    out["ratio_api_point_recipe"] = out["api_point"] / out["recipe_point"]
    print(f"clicks: {out}", flush=True)
    return out


def widget_viewer_status() -> str:
    """A click in a napari viewer is measured by bench_viewer_large.py, not here."""
    try:
        import napari  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: no viewer on this machine
        return "skipped: napari is not installed on this machine"
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "skipped: no display (run under xvfb-run)"
    return ("skipped: a viewer click is measured by benchmarks/bench_viewer_large.py "
            "(the job path above is what its worker thread runs)")


def propagation_ms(seg, plan: Plan) -> dict:
    """ms per slice of ``propagate`` forward through a stack, embeddings cached."""
    from napari_sam3 import ObjectPrompt

    base = cells((plan.side, plan.side), seed=2)
    stack = np.stack([np.roll(base, 6 * z, axis=1) for z in range(plan.slices)])
    seeds = [(0.3, 0.3), (0.3, 0.7), (0.5, 0.5), (0.7, 0.3), (0.7, 0.7)]
    out = {}
    seg.propagate(stack, {0: [ObjectPrompt(points=[(plan.side * 0.5, plan.side * 0.5)])]},
                  direction="forward")  # encodes every slice and loads the video model
    for n in (1, 5):
        prompts = {0: [ObjectPrompt(points=[(plan.side * r, plan.side * c)])
                       for r, c in seeds[:n]]}
        ms = timed_ms(lambda p=prompts: seg.propagate(stack, p, direction="forward"), plan,
                      warmup=0)
        out[str(n)] = ms / plan.slices
        print(f"propagation {n} objects: {out[str(n)]:.1f} ms/slice", flush=True)
    return out


def concept_ms(folder: Path, plan: Plan) -> float:
    concept = load_concept(folder, plan)
    image = cells((plan.side, plan.side), seed=3)
    concept.detect(image, "cell")  # the trunk is cached from here on
    before = concept.encoder_calls
    ms = timed_ms(lambda: concept.detect(image, "cell"), plan)
    assert concept.encoder_calls == before, "the warm concept call ran the ViT"
    print(f"concept warm: {ms:.1f} ms/tile", flush=True)
    return ms


def precompute_rates(seg, folder: Path, plan: Plan) -> dict:
    """tiles/s: precompute batched into a fresh Zarr cache, into memory only, and the
    bare batched encoder call over the same tiles."""
    from napari_sam3.core.batch_encode import default_batch_size, encode_pixels, pixel_batch
    from napari_sam3.core.embedding_store import EmbeddingStore

    n = plan.precompute_tiles
    side = plan.side + (n - 1) * (plan.side - plan.overlap)
    image = cells((side, side), seed=4)
    grid = seg.tiles(image)
    batch = max(BATCHES)
    out = {"tiles": len(grid), "batch_size": batch,
           "default_batch_size": default_batch_size(plan.device)}

    def run(store_dir):
        seg.feature_cache.store = None if store_dir is None else EmbeddingStore(store_dir)
        seg.memory.clear()
        seg.tile_keys.clear()
        sync(plan.device)
        t = time.perf_counter()
        steps = list(seg.precompute(image, batch_size=batch))
        sync(plan.device)
        assert all(new for _, _, new in steps), "a tile was found cached"
        return len(steps) / (time.perf_counter() - t)

    limits = seg.resolve_limits(image)
    rgbs = [seg.tile_rgb(image, grid, t, limits) for t in grid.tiles]
    pixels = [pixel_batch(seg, rgbs[i:i + batch]) for i in range(0, len(rgbs), batch)]

    def bare():
        for px in pixels:
            encode_pixels(seg, px, [(plan.side, plan.side)] * len(px))

    bare()  # warm-up
    run(folder / "warmup-cache")
    sync(plan.device)
    t = time.perf_counter()
    bare()
    sync(plan.device)
    out["bare_tiles_per_s"] = len(rgbs) / (time.perf_counter() - t)
    out["tiles_per_s"] = run(folder / "cache")
    out["memory_only_tiles_per_s"] = run(None)
    out["ratio"] = out["tiles_per_s"] / out["bare_tiles_per_s"]
    out["ratio_memory_only"] = out["memory_only_tiles_per_s"] / out["bare_tiles_per_s"]
    seg.feature_cache.store = None
    print(f"precompute: {out}", flush=True)
    return out


def boundary_checks(seg, plan: Plan) -> dict:
    """The click, mask, everything and propagation paths under ``device_guard``."""
    from napari_sam3 import ObjectPrompt
    from napari_sam3.core.model import device_guard

    image = cells((plan.side, plan.side), seed=5)
    rows, cols = np.mgrid[0:plan.side, 0:plan.side]
    mask = (rows - plan.side / 2) ** 2 + (cols - plan.side / 2) ** 2 <= (plan.side / 6) ** 2
    checks = {
        "points_and_box": lambda: seg.segment(image, [
            ObjectPrompt(points=[(plan.side * 0.4, plan.side * 0.4)]),
            ObjectPrompt(box=(10, 10, plan.side // 2, plan.side // 2))]),
        "mask": lambda: seg.segment(image, [ObjectPrompt(mask=mask)]),
        "everything": lambda: seg.segment_everything(image, points_per_side=4),
    }
    out = {}
    for name, fn in checks.items():
        with device_guard(seg.model):
            fn()
        out[name] = "ok"
    stack = np.stack([image, np.roll(image, 5, axis=1)])
    with device_guard(seg.video_tracker().model, dtype_depth=0):
        seg.propagate(stack, {0: [ObjectPrompt(points=[(plan.side * 0.4, plan.side * 0.4)])]})
    out["propagation"] = "ok"
    return out


# -- report ------------------------------------------------------------------------------------
def device_info(plan: Plan) -> dict:
    import platform

    import torch
    import transformers

    info = {"device": plan.device, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if plan.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), memory_gb=props.total_memory / 2 ** 30,
                    cuda=torch.version.cuda,
                    tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        from _machine import cpu_name

        info.update(name=f"CPU: {cpu_name()} (dry run, tiny models)")
    return info


def _fmt(v, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else str(v)


def markdown(result: dict) -> str:
    dev = result["device"]
    lines = [f"## GPU run: {dev['name']}", "",
             f"torch {dev['torch']}, transformers {dev['transformers']}, {dev['date']}"
             + (" (dry run: tiny models on the CPU, figures meaningless)"
                if result["dry_run"] else ""), ""]
    enc = result.get("encoder_ms_per_tile")
    if isinstance(enc, dict) and "error" not in enc:
        lines += ["| encoder ms per tile | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
                  "|---|" + "---:|" * len(BATCHES)]
        for dtype, per in enc.items():
            lines.append(f"| {dtype} | " + " | ".join(_fmt(per[str(b)]) for b in BATCHES) + " |")
        lines.append("")
    lines += ["| measurement | value |", "|---|---:|"]
    clicks = result.get("click_ms", {})
    for k, v in clicks.items():
        lines.append(f"| click {k}" + (" (x)" if k.startswith("ratio") else " ms") +
                     f" | {_fmt(v, 2)} |")
    for n, v in (result.get("propagation_ms_per_slice") or {}).items():
        lines.append(f"| propagation ms per slice, {n} object{'s' * (n != '1')} | {_fmt(v)} |")
    lines.append(f"| concept ms per tile, warm | {_fmt(result.get('concept_ms_per_tile_warm'))} |")
    pre = result.get("precompute") or {}
    for k in ("tiles_per_s", "memory_only_tiles_per_s", "bare_tiles_per_s", "ratio",
              "ratio_memory_only"):
        if k in pre:
            lines.append(f"| precompute {k} (batch {pre.get('batch_size')}, "
                         f"{pre.get('tiles')} tiles) | {_fmt(pre[k], 2)} |")
    for k, v in (result.get("boundary_checks") or {}).items():
        lines.append(f"| device check {k} | {v} |")
    for k, v in result.get("errors", {}).items():
        lines.append(f"| ERROR in {k} | {v} |")
    lines.append(f"| wall time of the run, s | {_fmt(result.get('wall_s'))} |")
    return "\n".join(lines) + "\n"


def tracker_sections(result: dict, section, folder: Path, tmp: Path, plan: Plan) -> None:
    """Clicks, propagation, precompute and the device checks, on one segmenter in the
    device's default dtype (freed on return, before the detector is built)."""
    from napari_sam3 import Sam3Segmenter

    seg = Sam3Segmenter.from_pretrained(str(folder), device=plan.device, dtype=plan.dtype,
                                        tile_size=plan.side, overlap=plan.overlap)
    result["default_dtype"] = str(seg.dtype).replace("torch.", "")
    section("click_ms", lambda: click_ms(seg, plan))
    section("propagation_ms_per_slice", lambda: propagation_ms(seg, plan))
    section("precompute", lambda: precompute_rates(seg, tmp, plan))
    section("boundary_checks", lambda: boundary_checks(seg, plan))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny models on the CPU, seconds: checks every measurement runs")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench-results",
                    help="folder for gpu_bench.json and gpu_bench.md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine
    from napari_sam3.core.torch_import import prepare_torch_import

    prepare_torch_import()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; use --dry-run to check the script on a CPU",
              file=sys.stderr)
        return 2
    from napari_sam3.testing import TINY_IMAGE_SIZE

    # the dry run uses bfloat16 where the GPU run uses its default (bfloat16 on CUDA)
    plan = (Plan(True, "cpu", TINY_IMAGE_SIZE, budget_s=0.0, slices=3, precompute_tiles=2,
                 reps=1, min_reps=1, warmup=0, dtype="bfloat16") if args.dry_run else
            Plan(False, "cuda", 1008, budget_s=2.0, slices=8, precompute_tiles=4))
    t0 = time.perf_counter()
    result: dict = {"dry_run": plan.dry, "device": device_info(plan), "errors": {}}

    def section(name, fn):
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    with tempfile.TemporaryDirectory(prefix="napari-sam3-gpu-") as tmp:
        tmp = Path(tmp)
        folder = build_tracker(tmp / "tracker", plan)
        print(f"checkpoint built: {time.perf_counter() - t0:.1f} s", flush=True)

        def encoder():
            ms, memory = encoder_ms(folder, plan)
            result["encoder_peak_memory_mb"] = memory
            return ms

        section("encoder_ms_per_tile", encoder)
        tracker_sections(result, section, folder, tmp, plan)
        section("concept_ms_per_tile_warm", lambda: concept_ms(tmp / "concept", plan))
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    (out / "gpu_bench.md").write_text(table)
    print(table)
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
