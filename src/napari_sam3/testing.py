"""Tiny random SAM3 checkpoints for tests and benchmarks (no download).

They are built from transformers' config classes, saved with
``save_pretrained`` (safetensors) and loaded back through the package's own
loading code, exactly like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from .core.torch_import import prepare_torch_import

TINY_IMAGE_SIZE = 112


def tiny_vision_config(fpn_hidden_size: int, image_size: int = TINY_IMAGE_SIZE):
    """The tiny SAM3 vision tower shared by all test models: ViT hidden 64, 2 layers,
    2 heads, patch 14, window 4, global attention on layer 1."""
    prepare_torch_import()  # before torch: see core.torch_import
    from transformers import Sam3VisionConfig, Sam3ViTConfig

    grid = image_size // 14  # 8 for 112
    vit = Sam3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, image_size=image_size, patch_size=14,
                        window_size=4, global_attn_indexes=[1], pretrain_image_size=56)
    return Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=fpn_hidden_size,
                            backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2])


def tiny_tracker_config(image_size: int = TINY_IMAGE_SIZE):
    prepare_torch_import()  # before torch: see core.torch_import
    from transformers import (
        Sam3TrackerConfig,
        Sam3TrackerMaskDecoderConfig,
        Sam3TrackerPromptEncoderConfig,
    )

    patch = 14
    vision = tiny_vision_config(32, image_size)
    return Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config=Sam3TrackerPromptEncoderConfig(hidden_size=32,
                                                             image_size=image_size,
                                                             patch_size=patch),
        mask_decoder_config=Sam3TrackerMaskDecoderConfig(hidden_size=32, mlp_dim=64),
    )


def tiny_video_config(image_size: int = TINY_IMAGE_SIZE):
    """A tiny Sam3TrackerVideo config. Its memory channels are fixed at 64 in
    transformers 5.2x, so hidden sizes are multiples of 64 above 64 (128)."""
    prepare_torch_import()  # before torch: see core.torch_import
    from transformers import (
        Sam3TrackerVideoConfig,
        Sam3TrackerVideoMaskDecoderConfig,
        Sam3TrackerVideoPromptEncoderConfig,
    )

    patch = 14
    grid = image_size // patch
    vision = tiny_vision_config(128, image_size)
    return Sam3TrackerVideoConfig(
        vision_config=vision,
        prompt_encoder_config=Sam3TrackerVideoPromptEncoderConfig(
            hidden_size=128, image_size=image_size, patch_size=patch),
        mask_decoder_config=Sam3TrackerVideoMaskDecoderConfig(
            hidden_size=128, mlp_dim=128, iou_head_hidden_dim=128),
        memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=128,
        memory_attention_rope_feat_sizes=[grid, grid], memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=128, memory_fuser_num_layers=1,
        num_maskmem=3, max_object_pointers_in_encoder=4,  # a short memory: tests see pruning
        image_size=image_size,  # the video config resets every sub-config's size from this
    )


def save_random_video_tracker(folder, config=None, seed: int = 0) -> Path:
    """A random Sam3TrackerVideoModel checkpoint with its processor (image + video).

    Clicks load ``Sam3TrackerModel`` from the same folder; ``no_memory_embedding`` is
    random, as in :func:`save_random_tracker`.
    """
    prepare_torch_import()  # before torch: see core.torch_import
    import torch
    from transformers import (
        Sam2VideoVideoProcessor,
        Sam3ImageProcessor,
        Sam3TrackerVideoModel,
        Sam3TrackerVideoProcessor,
    )

    config = config or tiny_video_config()
    torch.manual_seed(seed)
    model = Sam3TrackerVideoModel(config).eval()
    with torch.no_grad():
        model.no_memory_embedding.normal_(0.0, 1.0)
    side = config.vision_config.backbone_config.image_size
    processor = Sam3TrackerVideoProcessor(  # one size dict each: processors mutate them
        image_processor=Sam3ImageProcessor(size={"height": side, "width": side}),
        video_processor=Sam2VideoVideoProcessor(size={"height": side, "width": side},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3),
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def full_tracker_config():
    """The full-size SAM3 tracker architecture (random weights; for benchmarks)."""
    prepare_torch_import()  # before torch: see core.torch_import
    from transformers import Sam3TrackerConfig

    return Sam3TrackerConfig()


def save_random_tracker(folder, config=None, seed: int = 0) -> Path:
    """Build a random Sam3TrackerModel (+ processor) and save it to ``folder``.

    ``no_memory_embedding`` is set to random values: a fresh model has zeros,
    which would hide whether it is added to the right feature level.
    """
    prepare_torch_import()  # before torch: see core.torch_import
    import torch
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    config = config or tiny_tracker_config()
    torch.manual_seed(seed)
    model = Sam3TrackerModel(config).eval()
    with torch.no_grad():
        model.no_memory_embedding.normal_(0.0, 1.0)
    side = config.vision_config.backbone_config.image_size
    processor = Sam3TrackerProcessor(
        image_processor=Sam3ImageProcessor(size={"height": side, "width": side})
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def demo_model(folder, model: str = "facebook/sam3") -> str:
    """The model ``make demo`` loads without a display: ``model`` if its weights are in
    the local Hugging Face cache, else a tiny random checkpoint saved to ``folder`` (it
    proves the whole job runs; its masks mean nothing)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(model).expanduser().is_dir():
        return model
    if isinstance(try_to_load_from_cache(model, "model.safetensors"), str):
        return model
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        save_random_tracker(folder)
    return str(folder)


def reference_paste_objects(out, objects, ids=None, max_hole_area=0, max_sprinkle_area=0,
                      overwrite=True):
    """The overlap rule of ``postprocess.paste_objects`` as first written (every object
    held at once, compared pairwise): the reference the streaming merge is tested and
    benchmarked against. Highest logit wins, ties to the earlier object."""
    import numpy as np

    from .core.postprocess import clean_mask

    n = len(objects)
    ids = list(range(1, n + 1)) if ids is None else [int(i) for i in ids]
    boxes, masks, logits = [], [], []
    for region, lg in objects:
        lg = np.asarray(lg, dtype=np.float32)
        m = clean_mask(lg > 0, max_hole_area, max_sprinkle_area)
        if not m.any():
            boxes.append(None)
            masks.append(None)
            logits.append(None)
            continue
        rr, cc = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        r0, r1, c0, c1 = rr[0], rr[-1] + 1, cc[0], cc[-1] + 1
        off_r, off_c = region[0].start or 0, region[1].start or 0
        boxes.append((off_r + r0, off_c + c0, off_r + r1, off_c + c1))
        masks.append(m[r0:r1, c0:c1])
        logits.append(lg[r0:r1, c0:c1])
    for i in range(n):
        if boxes[i] is None:
            continue
        a0, b0, a1, b1 = boxes[i]
        keep = masks[i].copy()
        for j in range(n):
            if j == i or boxes[j] is None:
                continue
            c0, d0, c1, d1 = boxes[j]
            r0, r1, q0, q1 = max(a0, c0), min(a1, c1), max(b0, d0), min(b1, d1)
            if r0 >= r1 or q0 >= q1:
                continue
            mine = (slice(r0 - a0, r1 - a0), slice(q0 - b0, q1 - b0))
            theirs = (slice(r0 - c0, r1 - c0), slice(q0 - d0, q1 - d0))
            other = masks[j][theirs]
            beats = logits[j][theirs] >= logits[i][mine] if j < i else (
                logits[j][theirs] > logits[i][mine])
            keep[mine] &= ~(other & beats)
        window = (slice(a0, a1), slice(b0, b1))
        current = np.asarray(out[window])
        writable = keep if overwrite else keep & (current == 0)
        if writable.any():
            current[writable] = ids[i]
            out[window] = current


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["demo-model"] or len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m napari_sam3.testing demo-model FOLDER [MODEL]")
    chosen = demo_model(*sys.argv[2:])
    if chosen != (sys.argv[3] if len(sys.argv) == 4 else "facebook/sam3"):
        print("facebook/sam3 is not in the local Hugging Face cache: the demo uses a tiny "
              f"random checkpoint ({chosen}); its masks are meaningless", file=sys.stderr)
    print(chosen)
