"""Concept and segment-everything mode per tile, against the transformers calls they wrap.

Three parts, all in one run, variants interleaved (shuffled order in every round) and
medians over rounds; ratios are ours / reference from the same rounds:

1. **Per tile, tiny random models** (the test configs: 112 px model input), on a
   112x112 uint8 RGB tile and on a 1008x1008 one squashed into the model (so our
   normalisation, cache key hashing and mask upsampling run at the real tile size).

   Concept (``ConceptSegmenter.detect(image, text="cell")``, candidates above the
   0.05 floor) against:

   * ``recipe``: transformers' documented recipe, ``Sam3Processor(images, text)`` ->
     ``Sam3Model`` -> ``post_process_instance_segmentation(threshold=0.05)``; it
     recomputes everything on every call;
   * ``bare, feats given``: ``Sam3Model(vision_embeds=..., text_embeds=...)`` with
     ``get_vision_features`` / ``get_text_features`` computed once beforehand, then the
     same post-processing: the least transformers itself can do on a cached tile.

   Ours runs **cold** (memory cache and text cache emptied before each call: ViT, text
   encoder, neck and detector run) and **warm** (the cached ViT trunk output and text
   features are reused; the neck and the detector run). ``+labels`` is the user-level
   ``segment_concept`` (detect + threshold 0.5 + tile merge + clean-up + labels), warm.

   Everything (``segment_everything(seg, image, points_per_side=16)``, 256 prompts in
   batches of 64) against:

   * ``pipeline``: ``pipeline("mask-generation", ...)`` called with the same settings
     (``points_per_crop``, ``points_per_batch``, ``pred_iou_thresh``,
     ``stability_score_thresh``, ``stability_score_offset``, ``crops_nms_thresh``) and
     built as in ``tests/test_everything.py`` (plus its one-line no-memory correction);
     it encodes the image on every call;
   * ``pipeline, emb given``: the pipeline's own ``forward`` + ``postprocess`` on the
     model inputs its ``preprocess`` produced once (embedding included): the pipeline
     minus the encoder;
   * ``bare decoder``: only ``model(image_embeddings=..., input_points=batch,
     input_labels=..., multimask_output=True)`` per batch of 64, tensors built once.

   Ours runs **cold** (memory cache emptied: the encoder runs) and **cached** (the tile
   embedding is in memory). Filter settings: ``default`` (pred IoU 0.88, stability
   0.95, NMS 0.7: with random weights no mask passes, so this is the decoder and the
   filtering) and ``open`` (pred IoU 0, stability 0, NMS 0.7: every mask goes through
   upsampling, filtering and NMS, the worst case for post-processing; on the 112 tile
   only, since on a 1008 tile it upsamples 768 masks per call, ~15 s ours and ~35 s the
   pipeline's: the full-size rows show that cost). Ours also applies its own defaults
   the pipeline lacks (masks over half the tile dropped, objects under 25 px dropped,
   holes and specks cleaned, labels written).

2. **Full-size architectures, random weights, no image encoder** (the ViT takes ~2 min
   per 1008 tile on a 2-core CPU). Everything: ``Sam3TrackerConfig()``; random features
   of the decoder's input shapes are put into the segmenter's memory cache under the
   tile's key, and ``segment_everything(points_per_side=8)`` (64 prompts, one batch) is
   timed against the pipeline minus its encoder (the same features handed to it) and
   the bare batched decoder call. Concept: ``Sam3Config()``; a random ViT trunk output
   (1, 72*72, 1024) is put into the detector's memory cache under the tile's key (as
   ``ConceptSegmenter.trunk`` caches it), so ``detect`` runs the neck, the text encoder
   (cached after the first call), the DETR encoder/decoder and the mask decoder; it is
   timed against ``Sam3Model(vision_embeds=..., text_embeds=...)`` + post-processing
   with the neck output and text features computed once beforehand.

3. **Growth with image size**, tiny models, ``tile_size=112`` (overlap 28): total time
   of ``segment_everything(points_per_side=8)`` and ``segment_concept(text="cell")`` on
   224, 448 and 896 px uint16 fluorescence-like images, cold (every tile encoded) and
   cached/warm, with the tile counts.

torch runs on one thread by default (``--threads``): on a 2-core machine shared with
other jobs, two threads made the same call 3-10x slower whenever a neighbour was busy,
while one thread stays steady and compares ours and the reference on equal terms.
Timing windows during which other processes used more of the CPU than the cores torch
leaves idle plus 15% (from ``/proc/stat``) are discarded and rerun, as in
``bench_click.py``; calls longer than a second are checked one by one. The count of
discarded windows is printed. A variant whose rounds would take more than a minute
runs in the first rounds only (at least 3; N shows "all/fewest").

Usage::

    python benchmarks/bench_everything.py            # all parts (full models: ~9 GB RAM)
    python benchmarks/bench_everything.py --quick    # tiny models only, fewer rounds
    python benchmarks/bench_everything.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _machine import cpu_snapshot, loadavg, machine_info, other_load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TEXT = "cell"
BATCH = 64  # points per decoder call, ours and the pipeline's default
FILTERS = {
    "default": dict(pred_iou_thresh=0.88, stability_score_thresh=0.95,
                    stability_score_offset=1.0, box_nms_thresh=0.7),
    "open": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0,
                 stability_score_offset=1.0, box_nms_thresh=0.7),
}
# The tracker decoder's inputs for the full config (see bench_click.py).
FULL_FEATURE_SHAPES = [(1, 32, 288, 288), (1, 64, 144, 144), (1, 256, 72, 72)]


# -- machine ---------------------------------------------------------------------------------


# -- timing ----------------------------------------------------------------------------------
MAX_OTHER = 0.15  # share of the CPU other processes may use beyond the cores we leave idle
WINDOW_S = 0.25  # short calls are grouped into windows of at least this long
LONG_S = 1.0  # rounds longer than this are checked call by call
DISCARD_CAP = 3  # at most this many discarded windows (or calls) per requested round
SLOW_BUDGET_S = 60.0  # a variant gets fewer rounds (>= 3) when its rounds would take longer
CONTENTION = {"discarded": 0, "kept": 0, "contended": False}


def allowed_other() -> float:
    """Other processes' CPU share tolerated in a window: ``MAX_OTHER`` plus the share of
    the cores torch leaves idle (with 1 thread on 2 cores, a neighbour on the other core
    barely slows us; with 2 threads it can slow us down 10x)."""
    import torch

    cores = os.cpu_count() or 1
    return MAX_OTHER + max(0, cores - torch.get_num_threads()) / cores


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                seed: int = 0) -> dict[str, list[float]]:
    """Every variant ``repeats`` times in a shuffled order each round; times in ms.

    Short rounds are grouped into windows of ~``WINDOW_S``, and a window in which
    other processes used the CPU is rerun; in rounds over ``LONG_S`` each call is
    checked and rerun on its own. A variant whose ``repeats`` calls would take more
    than ``SLOW_BUDGET_S`` runs in the first rounds only (at least 3): the lists of
    every variant start with the same rounds, so per-round ratios pair up.
    """
    t_warm = {n: 0.0 for n in variants}
    for _ in range(warmup):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            t_warm[name] += (time.perf_counter() - t) / max(warmup, 1)
    wanted = {n: repeats if t * repeats <= SLOW_BUDGET_S else
              max(min(3, repeats), min(repeats, int(SLOW_BUDGET_S / t)))
              for n, t in t_warm.items()}
    times: dict[str, list[float]] = {n: [] for n in variants}
    rng = random.Random(seed)
    done = 0
    for k in sorted(set(wanted.values())):  # phases: all variants, then the faster ones
        names = [n for n in variants if wanted[n] >= k]
        _run(variants, names, k - done, sum(t_warm[n] for n in names), times, rng)
        done = k
    return times


def _run(variants, names, rounds: int, per_round: float, times, rng) -> None:
    names = list(names)
    budget = DISCARD_CAP * rounds
    limit = allowed_other()
    if per_round > LONG_S:
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                while True:
                    snap = cpu_snapshot()
                    t = time.perf_counter()
                    variants[name]()
                    ms = (time.perf_counter() - t) * 1e3
                    if other_load(snap) > limit and ms > 100:
                        if budget > 0:
                            budget -= 1
                            CONTENTION["discarded"] += 1
                            continue
                        CONTENTION["contended"] = True
                    CONTENTION["kept"] += 1
                    times[name].append(ms)
                    break
        return
    per_window = max(1, math.ceil(WINDOW_S / max(per_round, 1e-6)))
    kept = 0
    while kept < rounds:
        snap = cpu_snapshot()
        window: dict[str, list[float]] = {n: [] for n in names}
        n_rounds = min(per_window, rounds - kept)
        for _ in range(n_rounds):
            rng.shuffle(names)
            for name in names:
                t = time.perf_counter()
                variants[name]()
                window[name].append((time.perf_counter() - t) * 1e3)
        if other_load(snap) > limit:
            if budget > 0:
                budget -= 1
                CONTENTION["discarded"] += 1
                continue
            CONTENTION["contended"] = True
        for name in names:
            times[name] += window[name]
        kept += n_rounds
        CONTENTION["kept"] += 1


def counts(times: dict[str, list[float]]) -> dict[str, int]:
    return {k: len(v) for k, v in times.items()}


def n_text(row: dict) -> str:
    ns = row["n"].values()
    return str(max(ns)) if max(ns) == min(ns) else f"{max(ns)}/{min(ns)}"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b (robust to load drifting between rounds), over
    the rounds both ran (the first ones: see ``interleaved``)."""
    n = min(len(a), len(b))
    return statistics.median(x / y for x, y in zip(a[:n], b[:n], strict=True))


# -- images and models -----------------------------------------------------------------------
def textured(shape, seed=0) -> np.ndarray:
    """uint8 RGB with structure (as in tests/test_everything.py)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.sin(rows / 5.0) * np.cos(cols / 7.0) * 100 + 128
    img = np.stack([base, base[::-1], np.roll(base, 11, axis=1)], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def cells(side: int) -> np.ndarray:
    """A uint16 fluorescence-like image, as a microscope gives it."""
    from napari_sam3._sample_data import make_cells_image

    return make_cells_image((side, side), n_cells=40, seed=0)[0]


def tiny_models(tmp: Path, tile_size: int):
    """(Sam3Segmenter, ConceptSegmenter, tracker folder) from the tiny test checkpoints."""
    from napari_sam3.core.concept import ConceptSegmenter
    from napari_sam3.core.segmenter import Sam3Segmenter
    from napari_sam3.testing import save_random_tracker
    from napari_sam3.testing_concept import save_random_concept_model

    tdir, cdir = tmp / "tracker", tmp / "concept"
    if not tdir.exists():
        save_random_tracker(tdir, seed=0)
        save_random_concept_model(cdir, seed=0)
    seg = Sam3Segmenter.from_pretrained(str(tdir), device="cpu", dtype="float32",
                                        tile_size=tile_size)
    cs = ConceptSegmenter.from_pretrained(str(cdir), device="cpu", dtype="float32",
                                          tile_size=tile_size)
    return seg, cs, tdir


def corrected_pipeline(model=None, folder=None, image_processor=None):
    """transformers' mask-generation pipeline with the no-memory correction of the tests."""
    from transformers import pipeline

    if folder is not None:
        gen = pipeline("mask-generation", model=str(folder), device="cpu")
    else:
        gen = pipeline("mask-generation", model=model, image_processor=image_processor,
                       device="cpu")
    net = gen.model
    plain = type(net).get_image_embeddings

    def with_no_memory(pixel_values, **kwargs):
        emb = list(plain(net, pixel_values, **kwargs))
        emb[-1] = emb[-1] + net.no_memory_embedding.reshape(1, -1, 1, 1)
        return emb

    net.get_image_embeddings = with_no_memory
    return gen


# -- concept, one tile -----------------------------------------------------------------------
def concept_tile(label: str, cs, rgb: np.ndarray, repeats: int, *, full: bool = False) -> dict:
    """Ours (cold, warm, +labels) vs the recipe and the bare model with features given."""
    import torch

    from napari_sam3.core.defaults import DEFAULT_MIN_SCORE

    model, proc = cs.model, cs.processor
    sizes = [tuple(rgb.shape[:2])]
    tok = proc(text=TEXT, return_tensors="pt")
    with torch.inference_mode():
        if full:  # no ViT: the neck on the injected trunk output, as ours computes it
            vision = cs.vision_embeds(rgb)
        else:
            pix = proc(images=rgb, return_tensors="pt")["pixel_values"]
            vision = model.get_vision_features(pixel_values=pix)
        text_feats = model.get_text_features(input_ids=tok["input_ids"],
                                             attention_mask=tok["attention_mask"])

    def post(out):
        return proc.post_process_instance_segmentation(
            out, threshold=DEFAULT_MIN_SCORE, mask_threshold=0.5, target_sizes=sizes)[0]

    def recipe():
        inputs = proc(images=rgb, text=TEXT, return_tensors="pt")
        with torch.inference_mode():
            return post(model(**inputs))

    def bare_feats():
        with torch.inference_mode():
            return post(model(vision_embeds=vision, text_embeds=text_feats,
                              attention_mask=tok["attention_mask"]))

    def ours_cold():
        cs.memory.clear()
        cs._text_cache.clear()
        return cs.detect(rgb, TEXT)

    def ours_warm():
        return cs.detect(rgb, TEXT)

    def ours_labels():
        return cs.segment_concept(rgb, TEXT)

    # same candidates? ours drops empty masks, as the tests compare
    theirs = bare_feats()
    ref = sorted((float(s) for s, m in zip(theirs["scores"], theirs["masks"], strict=True)
                  if m.any()), reverse=True)
    mine = sorted((x.score for x in ours_warm().candidates), reverse=True)
    same = len(ref) == len(mine) and all(np.float32(a) == np.float32(b)
                                         for a, b in zip(ref, mine, strict=True))

    variants = {"ours warm": ours_warm, "+labels": ours_labels, "bare feats": bare_feats}
    if not full:
        variants |= {"ours cold": ours_cold, "recipe": recipe}
    times = interleaved(variants, repeats)
    hits = {"trunk key (hash)": lambda: cs._trunk_key(rgb),
            "vision_embeds (hash + cache hit + neck)": lambda: cs.vision_embeds(rgb)}
    parts = {k: med(v) for k, v in interleaved(hits, repeats).items()}
    row = {"config": label, "tile": f"{rgb.shape[0]}x{rgb.shape[1]}",
           "candidates": len(mine), "same_as_bare": same, "n": counts(times),
           **{f"{k} ms": med(v) for k, v in times.items()}, "parts_ms": parts}
    row["warm/bare feats"] = paired(times["ours warm"], times["bare feats"])
    if not full:
        row["cold/recipe"] = paired(times["ours cold"], times["recipe"])
        row["warm/recipe"] = paired(times["ours warm"], times["recipe"])
    return row


# -- everything, one tile --------------------------------------------------------------------
def everything_tile(label: str, seg, gen, rgb: np.ndarray, pps: int, filters: str,
                    repeats: int, *, full: bool = False) -> dict:
    """Ours (cold, cached) vs the pipeline, the pipeline minus its encoder, bare decoder."""
    import torch
    from PIL import Image

    from napari_sam3.core.everything import EverythingSettings, _grid_points, segment_everything
    from napari_sam3.core.prompts import rowcol_to_xy

    f = FILTERS[filters]
    settings = EverythingSettings(points_per_side=pps, points_per_batch=BATCH, **f)
    pil = Image.fromarray(rgb)
    call = dict(points_per_crop=pps, points_per_batch=BATCH,
                pred_iou_thresh=f["pred_iou_thresh"],
                stability_score_thresh=f["stability_score_thresh"],
                stability_score_offset=f["stability_score_offset"],
                crops_nms_thresh=f["box_nms_thresh"])
    pre, fwd, post = gen._sanitize_parameters(**call)
    staged = list(gen.preprocess(pil, **pre))  # the pipeline's inputs, embedding included

    def pipe_full():
        return gen(pil, **call)

    def pipe_cached():
        return gen.postprocess([gen.forward(dict(mi), **fwd) for mi in staged], **post)

    h, w = rgb.shape[:2]
    emb = seg.encode(rgb)  # tiny: encoded and cached; full: the injected random features
    points = _grid_points(pps, (h, w))
    batches = []
    for start in range(0, len(points), BATCH):
        b = points[start:start + BATCH]
        enc = seg.processor(original_sizes=[[h, w]],
                            input_points=[[[xy] for xy in rowcol_to_xy(b)]],
                            input_labels=[[[1] for _ in range(len(b))]], return_tensors=None)
        batches.append((torch.as_tensor(enc["input_points"]).to(seg.dtype),
                        torch.as_tensor(enc["input_labels"])))

    def bare():
        with torch.inference_mode():
            return [seg.model(image_embeddings=emb.features, input_points=p, input_labels=lab,
                              multimask_output=True) for p, lab in batches]

    def ours_cold():
        seg.memory.clear()
        return segment_everything(seg, rgb, settings=settings)

    def ours_cached():
        return segment_everything(seg, rgb, settings=settings)

    n_pipe = len(pipe_cached()["masks"])
    n_ours = int(ours_cached().max())
    variants = {"ours cached": ours_cached, "pipeline emb given": pipe_cached, "bare": bare}
    if not full:
        variants |= {"ours cold": ours_cold, "pipeline": pipe_full}
    calls = seg.encoder_calls
    times = interleaved(variants, repeats)
    if full:
        assert seg.encoder_calls == calls, "the injected embedding was not used"
    row = {"config": label, "tile": f"{h}x{w}", "filters": filters, "prompts": pps * pps,
           "pipeline masks": n_pipe, "our labels": n_ours, "n": counts(times),
           **{f"{k} ms": med(v) for k, v in times.items()}}
    row["cached/pipe emb"] = paired(times["ours cached"], times["pipeline emb given"])
    row["cached/bare"] = paired(times["ours cached"], times["bare"])
    if not full:
        row["cold/pipeline"] = paired(times["ours cold"], times["pipeline"])
    return row


# -- full-size models without their image encoder --------------------------------------------
def full_everything(rows: list, repeats: int) -> None:
    import torch
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    from napari_sam3.core.segmenter import ImageEmbedding, Sam3Segmenter, with_no_memory
    from napari_sam3.testing import full_tracker_config

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Sam3TrackerModel(full_tracker_config()).eval()
    with torch.no_grad():
        model.no_memory_embedding.normal_(0.0, 1.0)
    side = model.config.vision_config.backbone_config.image_size
    improc = Sam3ImageProcessor(size={"height": side, "width": side})
    seg = Sam3Segmenter(model, Sam3TrackerProcessor(image_processor=improc), "cpu",
                        model_id="random-full")
    print(f"(full tracker built in {time.perf_counter() - t0:.0f} s)")

    def no_encoder(*_a, **_k):
        raise RuntimeError("the full image encoder must not run in this benchmark")

    seg.encode_rgb = no_encoder
    rgb = textured((side, side))
    gen = torch.Generator().manual_seed(1)
    raw = [torch.randn(s, generator=gen) for s in FULL_FEATURE_SHAPES]
    emb = ImageEmbedding(key=seg.embedding_key(seg.prepare(rgb)), raw=raw,
                         features=with_no_memory(model, raw), image_shape=(side, side))
    seg.memory.put(emb.key, emb)
    pipe = corrected_pipeline(model=model, image_processor=improc)
    model.get_image_embeddings = lambda *_a, **_k: list(emb.features)  # the same features
    for filters in FILTERS:
        rows.append(everything_tile("full", seg, pipe, rgb, 8, filters, repeats, full=True))
        print_everything(rows[-1:])
    del seg, pipe, model


def full_concept(rows: list, repeats: int) -> None:
    import torch
    from transformers import Sam3Config, Sam3Model

    from napari_sam3.core.concept import ConceptSegmenter
    from napari_sam3.testing_concept import tiny_concept_processor

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Sam3Model(Sam3Config()).eval()
    side = model.config.vision_config.backbone_config.image_size
    # the tiny byte-level tokenizer: its ids are valid in the full vocabulary
    cs = ConceptSegmenter(model, tiny_concept_processor(side), "cpu", model_id="random-full")
    print(f"(full detector built in {time.perf_counter() - t0:.0f} s)")

    def no_vit(*_a, **_k):
        raise RuntimeError("the full ViT must not run in this benchmark")

    model.vision_encoder.backbone.forward = no_vit
    rgb = textured((side, side))
    vit = model.config.vision_config.backbone_config
    grid = side // vit.patch_size
    gen = torch.Generator().manual_seed(2)
    cs.memory.put(cs._trunk_key(rgb), torch.randn(1, grid * grid, vit.hidden_size,
                                                  generator=gen))
    rows.append(concept_tile("full", cs, rgb, repeats, full=True))
    print_concept(rows[-1:])
    del cs, model


# -- growth with image size ------------------------------------------------------------------
def growth(tmp: Path, sides, repeats: int) -> list[dict]:
    from napari_sam3.core.everything import segment_everything

    seg, cs, _ = tiny_models(tmp, tile_size=112)
    images = {s: cells(s) for s in sides}
    variants, tiles = {}, {}
    for s, img in images.items():
        tiles[s] = len(seg.tiles(img))
        assert tiles[s] == len(cs.tiles(img))

        def ev_cold(img=img):
            seg.memory.clear()
            return segment_everything(seg, img, points_per_side=8)

        def ev_cached(img=img):
            return segment_everything(seg, img, points_per_side=8)

        def co_cold(img=img):
            cs.memory.clear()
            cs._text_cache.clear()
            return cs.segment_concept(img, TEXT)

        def co_warm(img=img):
            return cs.segment_concept(img, TEXT)

        variants |= {(s, "everything cold"): ev_cold, (s, "everything cached"): ev_cached,
                     (s, "concept cold"): co_cold, (s, "concept warm"): co_warm}
    names = {f"{s} {k}": fn for (s, k), fn in variants.items()}
    times = interleaved(names, repeats)
    rows = []
    for s in sides:
        row = {"image": f"{s}x{s}", "tiles": tiles[s],
               "n": {k: len(v) for k, v in times.items() if k.startswith(f"{s} ")}}
        for k in ("everything cold", "everything cached", "concept cold", "concept warm"):
            row[f"{k} ms"] = med(times[f"{s} {k}"])
        rows.append(row)
    return rows


# -- report ----------------------------------------------------------------------------------
def print_table(header: list[str], body: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()


def _ms(row: dict, key: str) -> str:
    v = row.get(f"{key} ms")
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _x(row: dict, key: str) -> str:
    v = row.get(key)
    return "-" if v is None else (f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x")


def print_concept(rows: list[dict]) -> None:
    print_table(
        ["config", "tile", "ours cold", "ours warm", "+labels", "recipe", "bare feats",
         "cold/recipe", "warm/recipe", "warm/bare feats", "cands", "same", "N"],
        [[r["config"], r["tile"], _ms(r, "ours cold"), _ms(r, "ours warm"), _ms(r, "+labels"),
          _ms(r, "recipe"), _ms(r, "bare feats"), _x(r, "cold/recipe"), _x(r, "warm/recipe"),
          _x(r, "warm/bare feats"), str(r["candidates"]), "yes" if r["same_as_bare"] else "NO",
          n_text(r)] for r in rows])


def print_everything(rows: list[dict]) -> None:
    print_table(
        ["config", "tile", "filters", "prompts", "ours cold", "ours cached", "pipeline",
         "pipeline emb given", "bare decoder", "cold/pipeline", "cached/pipe emb",
         "cached/bare", "masks (pipe / ours)", "N"],
        [[r["config"], r["tile"], r["filters"], str(r["prompts"]), _ms(r, "ours cold"),
          _ms(r, "ours cached"), _ms(r, "pipeline"), _ms(r, "pipeline emb given"),
          _ms(r, "bare"), _x(r, "cold/pipeline"), _x(r, "cached/pipe emb"),
          _x(r, "cached/bare"), f"{r['pipeline masks']} / {r['our labels']}",
          n_text(r)] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models only, fewer rounds")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine, 2 threads "
                         "make every timing hostage to the neighbours; 0: torch's default)")
    args = ap.parse_args(argv)
    reps_tile, reps_full, reps_growth = (5, 0, 2) if args.quick else (15, 5, 5)
    global SLOW_BUDGET_S
    if args.quick:
        SLOW_BUDGET_S = 20.0

    import torch

    torch.set_flush_denormal(True)  # random weights may produce denormals on CPU
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: python {' '.join(['benchmarks/bench_everything.py', *sys.argv[1:]])}\n")

    concept_rows, everything_rows = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        seg, cs, tdir = tiny_models(tmp, tile_size=1008)  # 112 and 1008 px: one tile
        gen = corrected_pipeline(folder=tdir)
        print("1. Per tile, tiny models (median ms; ratios: median of per-round ratios)\n")
        for side in (112, 1008):
            rgb = textured((side, side), seed=side)
            concept_rows.append(concept_tile("tiny", cs, rgb, reps_tile))
            # open filters on a 1008 tile: 768 masks upsampled to 1008x1008 per call
            # (~15 s ours, ~35 s pipeline); the full model's row below shows that cost
            for filters in FILTERS if side == 112 else ("default",):
                everything_rows.append(everything_tile("tiny", seg, gen, rgb, 16, filters,
                                                       reps_tile))
        print("Concept, text 'cell' (candidates above 0.05)\n")
        print_concept(concept_rows)
        print("Everything, points_per_side=16, batches of 64\n")
        print_everything(everything_rows)
        del seg, cs, gen

        if not args.quick:
            print("2. Full-size architectures, random weights, encoder not run\n")
            full_everything(everything_rows, reps_full)
            full_concept(concept_rows, reps_full)

        print("3. Growth with image size, tiny models, tile_size=112, overlap 28 "
              "(total ms per image)\n")
        growth_rows = growth(tmp, (224, 448, 896), reps_growth)
    base = growth_rows[0]
    body = []
    for r in growth_rows:
        cols = [r["image"], str(r["tiles"])]
        for k in ("everything cold", "everything cached", "concept cold", "concept warm"):
            v = r[f"{k} ms"]
            cols.append(f"{v:.0f} ({v / r['tiles']:.1f}/tile, x{v / base[f'{k} ms']:.1f})")
        body.append(cols)
    print_table(["image", "tiles", "everything cold", "everything cached", "concept cold",
                 "concept warm"], body)
    print("(each cell: total ms (ms per tile, x time of the smallest image))\n")

    print("Concept parts (median ms)\n")
    print_table(["config", "tile", "part", "ms"],
                [[r["config"], r["tile"], k, f"{v:.2f}"] for r in concept_rows
                 for k, v in r["parts_ms"].items()])

    info["loadavg_end"] = loadavg()
    info["contention"] = dict(CONTENTION, max_other=allowed_other(), window_s=WINDOW_S)
    print(f"load average (1 min): {info['loadavg_start']} at start, {info['loadavg_end']} at "
          f"end; timing windows kept {CONTENTION['kept']}, discarded because other processes "
          f"used > {allowed_other():.0%} of the CPU: {CONTENTION['discarded']}")
    if CONTENTION["contended"]:
        print("WARNING: the machine stayed busy; some windows were kept despite other load")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "concept": concept_rows, "everything": everything_rows,
                       "growth": growth_rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
