"""The SAM3 image encoder on this CPU against the machine's matrix-multiply peak (issue 13).

One run, interleaved: ``peak, encoder, peak, encoder, ..., peak``, so the encoder's
fraction of the peak is taken between two peak measurements made under the same load.

* **peak**: torch fp32 ``A @ B`` of 4096 x 4096 matrices on the same threads
  (``2 n^3`` FLOP per product, best of a few).
* **FLOPs of the encoder** (one 1008 x 1008 tile, full config), by formula:
  2 x tokens x weights for every linear layer (qkv, proj, MLP) of the 32 ViT blocks,
  plus ``QK^T`` and ``AV`` per attention layer (2 x 2 x n_q x n_k x hidden: 28
  windowed layers of 9 windows of 24 x 24 tokens, 4 global layers of 72 x 72
  tokens), the patch embedding and the FPN neck's convolutions; cross-checked
  with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no
  compute). The memory-bound ops (softmax, LayerNorm, GELU, RoPE, adds) are
  reported as time in the profile, not as FLOPs.
* **encoder**: ``Sam3Segmenter.encode_rgb`` (what a tile costs in our code: processor,
  vision encoder + neck, the no-memory term) and the bare
  ``model.get_image_embeddings`` on the same pixel values.
* ``--profile``: ``torch.profiler`` over one forward: the ops by self CPU time.
* ``--variants``: opt-in settings, each one forward: ``eager`` (attention without SDPA),
  ``threads1``, ``compile`` (``torch.compile`` of the vision encoder: compile time
  apart), ``int8`` (dynamic int8 quantisation of the ViT's linear layers, with its
  effect on the decoder's masks: max logit difference, pixels flipped, worst IoU over
  prompts), ``bf16``.

Random weights (no checkpoint can be downloaded here); ``torch.set_flush_denormal``
is on, as in the click benchmark. Usage::

    python benchmarks/bench_encoder.py [--tiny] [--rounds 2] [--profile]
        [--variants eager,threads1,compile,int8,bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import machine_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def encoder_flops(vit, neck_conv_flops: float = 0.0) -> dict:
    """FLOPs of one forward of the ViT by formula (see the module docstring)."""
    side = vit.image_size // vit.patch_size
    tokens = side * side
    d, mlp = vit.hidden_size, vit.intermediate_size
    weights = 3 * d * d + d * d + 2 * d * mlp  # qkv, proj, fc1, fc2
    linear = 2 * tokens * weights * vit.num_hidden_layers
    n_global = len(vit.global_attn_indexes)
    n_window = vit.num_hidden_layers - n_global
    w = vit.window_size
    windows = (-(-side // w)) ** 2
    per_window_layer = 2 * 2 * windows * (w * w) ** 2 * d
    per_global_layer = 2 * 2 * tokens * tokens * d
    attention = n_window * per_window_layer + n_global * per_global_layer
    patch = 2 * tokens * vit.num_channels * vit.patch_size ** 2 * d
    return {"tokens": tokens, "linear": linear, "attention": attention, "patch_embed": patch,
            "neck_conv": neck_conv_flops,
            "total": linear + attention + patch + neck_conv_flops}


def counted_flops(config) -> dict:
    """FLOPs counted by torch on the meta device: by op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Sam3TrackerModel

    with torch.device("meta"):
        model = Sam3TrackerModel(config).eval()
        x = torch.empty(1, 3, config.vision_config.backbone_config.image_size,
                        config.vision_config.backbone_config.image_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.get_image_embeddings(x)
    by_op = counter.get_flop_counts().get("Global", {})
    neck = sum(counter.get_flop_counts().get("Sam3VisionModel.neck", {}).values())
    return {"total": counter.get_total_flops(), "neck_conv": neck,
            "by_op": {str(k): v for k, v in by_op.items()}}


def peak_gflops(n: int = 4096, reps: int = 3) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mask_effect(seg, ref_emb, other_emb, n_prompts: int = 8, seed: int = 0) -> dict:
    """Decoder masks from two embeddings of one tile: max |logit diff|, pixels flipped,
    worst IoU, over ``n_prompts`` random single points."""
    from napari_sam3 import ObjectPrompt

    rng = np.random.default_rng(seed)
    h, w = ref_emb.image_shape
    worst_iou, flipped, diff = 1.0, 0, 0.0
    for r, c in rng.integers(0, min(h, w), size=(n_prompts, 2)):
        p = [ObjectPrompt(points=[(int(r), int(c))])]
        a = seg.predict(ref_emb, p)[0]
        b = seg.predict(other_emb, p)[0]
        la, lb = np.asarray(a.logits), np.asarray(b.logits)
        diff = max(diff, float(np.abs(la - lb).max()))
        ma, mb = la > 0, lb > 0
        flipped += int(np.count_nonzero(ma != mb))
        union = np.count_nonzero(ma | mb)
        worst_iou = min(worst_iou, 1.0 if union == 0 else np.count_nonzero(ma & mb) / union)
    return {"max_logit_diff": diff, "pixels_flipped": flipped, "worst_iou": worst_iou,
            "prompts": n_prompts}


def profile_forward(fn, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
             "share": e.self_cpu_time_total / total} for e in rows[:top]]


def run_variant(name, seg, model_dir, pixels, rgb, ref, bare) -> dict:
    """One opt-in setting: its forward time (and what it does to features or masks)."""
    import torch

    from napari_sam3 import Sam3Segmenter
    from napari_sam3.core.segmenter import image_features

    model = seg.model
    entry: dict = {}
    if name == "threads1":
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        entry["s"] = timed(bare)
        torch.set_num_threads(before)
    elif name == "eager":
        other = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu")
        other.model.config._attn_implementation = "eager"
        for module in other.model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = "eager"
        with torch.inference_mode():
            entry["s"] = timed(lambda: other.model.get_image_embeddings(pixels))
        del other
    elif name == "compile":
        enc = model.vision_encoder
        compiled = torch.compile(enc)
        model.vision_encoder = compiled
        try:
            entry["compile_and_first_s"] = timed(bare)
            entry["s"] = timed(bare)
            emb = seg.encode_rgb(rgb)
            entry["max_feature_diff"] = max(float((a - b).abs().max())
                                            for a, b in zip(ref.features, emb.features, strict=True))
        finally:
            model.vision_encoder = enc
    elif name == "int8":
        from torch.ao.quantization import quantize_dynamic

        other = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu")
        t0 = time.perf_counter()
        other.model.vision_encoder.backbone = quantize_dynamic(
            other.model.vision_encoder.backbone, {torch.nn.Linear}, dtype=torch.qint8)
        entry["quantize_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            entry["s"] = timed(lambda: other.model.get_image_embeddings(pixels))
            emb = other.encode_rgb(rgb)
        entry["mask_effect"] = mask_effect(seg, ref, emb)
        del other
    elif name == "bf16":
        other = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu",
                                              dtype="bfloat16")
        px = pixels.to(torch.bfloat16)
        with torch.inference_mode():
            entry["s"] = timed(lambda: image_features(other.model, px))
        del other
    else:
        raise SystemExit(f"unknown variant {name!r}")
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny test config (seconds)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variants", default="")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from napari_sam3.core.torch_import import prepare_torch_import

    prepare_torch_import()
    import torch

    from napari_sam3 import Sam3Segmenter
    from napari_sam3.testing import full_tracker_config, save_random_tracker, tiny_tracker_config

    torch.set_flush_denormal(True)
    config = tiny_tracker_config() if args.tiny else full_tracker_config()
    vit = config.vision_config.backbone_config
    counted = counted_flops(config)
    formula = encoder_flops(vit, counted["neck_conv"])
    work = Path(tempfile.mkdtemp(prefix="bench-encoder-"))
    model_dir = save_random_tracker(work / "model", config)
    seg = Sam3Segmenter.from_pretrained(str(model_dir), device="cpu")
    side = seg.tile_size
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 4000, size=(side, side), dtype=np.uint16)
    rgb = seg.prepare(tile, (0, 4000))
    pixels = seg.processor(images=rgb, return_tensors="pt")["pixel_values"]
    model = seg.model

    def bare():
        with torch.inference_mode():
            model.get_image_embeddings(pixels)

    res = {"machine": machine_info(), "config": "tiny" if args.tiny else "full",
           "threads": torch.get_num_threads(), "flops_formula": formula,
           "flops_counted": counted, "rounds": []}
    print(f"FLOPs per tile: formula {formula['total'] / 1e12:.3f} T, counted "
          f"{counted['total'] / 1e12:.3f} T", flush=True)
    seg.encode_rgb(rgb)  # first call: allocations, thread pools
    peaks = [peak_gflops()]
    for k in range(args.rounds):
        t_ours = timed(lambda: seg.encode_rgb(rgb))
        peaks.append(peak_gflops())
        t_bare = timed(bare)
        peaks.append(peak_gflops())
        peak = float(np.median(peaks[-3:]))
        row = {"ours_s": t_ours, "bare_s": t_bare, "peak_gflops": peak,
               "ours_fraction_of_peak": formula["total"] / t_ours / 1e9 / peak,
               "bare_fraction_of_peak": formula["total"] / t_bare / 1e9 / peak,
               "ours_over_bare": t_ours / t_bare, "load": os.getloadavg()[0]}
        res["rounds"].append(row)
        print(json.dumps({"round": k, **row}), flush=True)
    res["peaks_gflops"] = peaks

    if args.profile:
        res["profile"] = profile_forward(bare)
        for r in res["profile"]:
            print(f"{r['op']:40s} {r['self_ms']:10.1f} ms {r['share']:6.1%} x{r['calls']}")

    variants = [v for v in args.variants.split(",") if v]
    ref = seg.encode_rgb(rgb)
    out = {}
    for name in variants:
        entry = run_variant(name, seg, model_dir, pixels, rgb, ref, bare)
        base = float(np.median([r["bare_s"] for r in res["rounds"]]))
        entry["speedup_vs_default"] = base / entry["s"]
        out[name] = entry
        print(json.dumps({name: entry}), flush=True)
    res["variants"] = out
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
