"""Tiny random SAM3 concept models (``Sam3Model`` + ``Sam3Processor``) for tests.

No download: the config is built from transformers' config classes and the CLIP
tokenizer from a byte-level vocabulary made here, then saved with
``save_pretrained`` (safetensors) and loaded back through
:meth:`napari_sam3.core.concept.ConceptSegmenter.from_pretrained`, like a real
``facebook/sam3`` checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from .core.torch_import import prepare_torch_import
from .testing import TINY_IMAGE_SIZE, tiny_vision_config

TINY_QUERIES = 8
_HIDDEN = 32  # FPN, geometry encoder, DETR encoder/decoder and mask decoder width


def tiny_concept_config(image_size: int = TINY_IMAGE_SIZE, num_queries: int = TINY_QUERIES,
                        vocab_size: int = 600):
    """A ~0.3M-parameter ``Sam3Config``: ViT hidden 64, 2 layers, image 112, patch 14."""
    prepare_torch_import()  # before torch: see core.torch_import
    from transformers import (
        CLIPTextConfig,
        Sam3Config,
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
    )

    vision = tiny_vision_config(_HIDDEN, image_size)
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                          projection_dim=32, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    small = dict(hidden_size=_HIDDEN, num_attention_heads=2, intermediate_size=64, dropout=0.0)
    return Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config=Sam3GeometryEncoderConfig(num_layers=1, roi_size=2, **small),
        detr_encoder_config=Sam3DETREncoderConfig(num_layers=1, **small),
        detr_decoder_config=Sam3DETRDecoderConfig(num_layers=2, num_queries=num_queries, **small),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=_HIDDEN, num_attention_heads=2,
                                                  num_upsampling_stages=3),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer (517 tokens and 3 merges): every text encodes."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("n", "u"), ("c", "l"), ("e", "u")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_concept_processor(image_size: int = TINY_IMAGE_SIZE):
    from transformers import Sam3ImageProcessor, Sam3Processor

    return Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tiny_clip_tokenizer(),
    )


def save_random_concept_model(folder, config=None, seed: int = 0) -> Path:
    """Build a random ``Sam3Model`` (+ ``Sam3Processor``) and save both to ``folder``."""
    prepare_torch_import()  # before torch: see core.torch_import
    import torch
    from transformers import Sam3Model

    config = config or tiny_concept_config()
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    side = config.vision_config.backbone_config.image_size
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_concept_processor(side).save_pretrained(folder)
    return folder


def save_random_sam3(folder, seed: int = 0) -> Path:
    """A tiny random checkpoint laid out like ``facebook/sam3``: one ``Sam3VideoModel``
    (``detector_model.*``, ``tracker_model.*``, ``tracker_neck.*``) whose detector and
    tracker share one ViT, saved with the concept processor. Returns the folder."""
    prepare_torch_import()  # before torch: see core.torch_import
    import torch
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from .testing import tiny_video_config

    detector = tiny_concept_config()
    tracker = tiny_video_config()
    tracker.vision_config = detector.vision_config  # as in facebook/sam3: one backbone
    config = Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker.to_dict())
    torch.manual_seed(seed)
    model = Sam3VideoModel(config).eval()
    with torch.no_grad():
        model.tracker_model.no_memory_embedding.normal_(0.0, 1.0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    side = detector.vision_config.backbone_config.image_size
    tiny_concept_processor(side).save_pretrained(folder)
    from transformers import Sam2VideoVideoProcessor  # propagation's frame processor

    Sam2VideoVideoProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(folder)
    return folder
