"""What float16 storage in the embedding cache does to masks (measured, not guessed).

One image is encoded once (float32); masks for many prompts are decoded from that
embedding as computed, and from the same embedding after a float16 round trip (what
the Zarr cache stores by default). Reported: the largest logit difference, the share
of pixels whose mask value flips, and the mask IoU per prompt (worst and median).

Usage::

    python benchmarks/bench_cache_dtype.py            # tiny model
    python benchmarks/bench_cache_dtype.py --full     # + full-size SAM3 tracker (random
                                                      #   weights; one encoder run, ~2 min
                                                      #   on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def measure(model_dir: str, side: int, n_prompts: int, label: str) -> dict:
    import torch

    from napari_sam3 import ObjectPrompt, Sam3Segmenter
    from napari_sam3.core.segmenter import ImageEmbedding, with_no_memory

    seg = Sam3Segmenter.from_pretrained(model_dir, device="cpu", tile_size=side)
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:side, 0:side]
    image = 1000 + 600 * np.sin(rows / 23.0) * np.cos(cols / 17.0) + rng.normal(0, 60, rows.shape)
    emb32 = seg.encode(image.astype(np.float32), limits=(0, 2000))
    raw16 = [r.to(torch.float16).to(torch.float32) for r in emb32.raw]
    emb16 = ImageEmbedding(key="f16", raw=raw16, features=with_no_memory(seg.model, raw16),
                           image_shape=emb32.image_shape)
    prompts = [ObjectPrompt(points=[tuple(rng.integers(0, side, 2))]) for _ in range(n_prompts)]
    prompts += [ObjectPrompt(box=(r, c, r + side // 8, c + side // 6))
                for r, c in rng.integers(0, side - side // 6, (n_prompts, 2))]
    a = seg.predict(emb32, prompts)
    b = seg.predict(emb16, prompts)
    diff = max(float(np.abs(x.logits - y.logits).max()) for x, y in zip(a, b, strict=True))
    flips = sum(int(((x.logits > 0) != (y.logits > 0)).sum()) for x, y in zip(a, b, strict=True))
    total = sum(x.logits.size for x in a)
    ious = []
    for x, y in zip(a, b, strict=True):
        mx, my = x.logits > 0, y.logits > 0
        union = (mx | my).sum()
        ious.append(1.0 if union == 0 else float((mx & my).sum() / union))
    return {"model": label, "prompts": len(prompts), "max_logit_diff": diff,
            "flipped_pixel_share": flips / total, "worst_iou": min(ious),
            "median_iou": float(np.median(ious))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--prompts", type=int, default=20)
    args = ap.parse_args()

    import torch

    from napari_sam3.testing import full_tracker_config, save_random_tracker

    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as d:
        rows = [measure(str(save_random_tracker(Path(d) / "tiny")), 112, args.prompts, "tiny")]
        if args.full:
            full = save_random_tracker(Path(d) / "full", config=full_tracker_config())
            rows.append(measure(str(full), 1008, args.prompts, "full"))
    print(f"{'model':6} {'prompts':>7} {'max |dlogit|':>13} {'flipped px':>11} "
          f"{'worst IoU':>10} {'median IoU':>11}")
    for r in rows:
        print(f"{r['model']:6} {r['prompts']:7d} {r['max_logit_diff']:13.2e} "
              f"{100 * r['flipped_pixel_share']:10.4f}% {r['worst_iou']:10.5f} "
              f"{r['median_iou']:11.5f}")


if __name__ == "__main__":
    main()
