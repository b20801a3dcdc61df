"""Sam3Segmenter: SAM3 promptable segmentation of 2D images, NumPy in, NumPy out.

The image is encoded once (the expensive part) and kept in a cache keyed by
its pixels; every later prompt only runs the prompt encoder and mask decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .cache import MemoryLRU, content_key
from .model import DEFAULT_MODEL, load_tracker, resolve_device
from .normalize import to_rgb_uint8
from .postprocess import DEFAULTS, masks_to_labels
from .prompts import ObjectPrompt, PromptError, box_to_xyxy, rowcol_to_xy

_MASK_EPS = 1e-3  # binary mask prompt -> logits of about +-6.9, as micro-sam does


@dataclass
class ImageEmbedding:
    """The decoder inputs of one encoded image: three feature levels, batch 1."""

    key: str
    features: list  # torch tensors (1, C, h, w), on the model's device and dtype
    image_shape: tuple[int, int]  # (H, W) of the encoded image

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)


@dataclass
class MaskPrediction:
    """One object's result: mask logits at image resolution and SAM's scores."""

    logits: np.ndarray  # (H, W) float32; the mask is logits > 0
    iou_score: float
    object_score: float  # > 0: SAM thinks an object is present


def add_no_memory_embedding(model, pixel_values):
    """``model.get_image_embeddings`` with the no-memory term on the decoder's last level.

    transformers 5.2x adds ``no_memory_embedding`` to feature level [-1] of the
    vision neck, a level it then drops (4 neck levels, 3 used), so the 72x72
    level the decoder attends to never gets it; the original SAM3 predictor and
    transformers' video tracker add it there. We capture that level as the neck
    returns it and add the term only if transformers did not, so a release that
    fixes the defect is not corrected twice.
    """
    import torch

    level = len(model.backbone_feature_sizes) - 1
    seen = {}

    def grab(_module, _inputs, output):
        seen["raw"] = output.fpn_hidden_states[level]

    handle = model.vision_encoder.register_forward_hook(grab)
    try:
        emb = list(model.get_image_embeddings(pixel_values))
    finally:
        handle.remove()
    raw = seen.get("raw")
    if raw is not None and raw.shape == emb[-1].shape and torch.equal(raw, emb[-1]):
        emb[-1] = emb[-1] + model.no_memory_embedding.reshape(1, -1, 1, 1).to(emb[-1].dtype)
    return emb


class Sam3Segmenter:
    """SAM3 point/box/mask segmentation with cached image embeddings.

    Build with :meth:`from_pretrained`. Coordinates are NumPy/napari (row, col).
    """

    def __init__(self, model, processor, device: str = "cpu", cache_bytes: int = 2 << 30,
                 model_id: str = ""):
        self.model = model
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self.memory = MemoryLRU(cache_bytes, lambda e: e.nbytes)
        self.encoder_calls = 0

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device: str = "auto", dtype=None,
                        cache_bytes: int = 2 << 30) -> Sam3Segmenter:
        """Load a SAM3 tracker from a hub id (default ``facebook/sam3``) or a local folder."""
        dev = resolve_device(device)
        net, processor = load_tracker(model, dev, dtype)
        return cls(net, processor, dev, cache_bytes=cache_bytes, model_id=str(model))

    # -- encoding ---------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Side of the square model input (1008 for SAM3)."""
        return int(self.processor.image_processor.size["height"])

    @property
    def dtype(self):
        return self.model.dtype

    def prepare(self, image, limits=None) -> np.ndarray:
        """The (H, W, 3) uint8 image the processor receives (see ``normalize``)."""
        return to_rgb_uint8(image, limits)

    def embedding_key(self, rgb: np.ndarray) -> str:
        return content_key(rgb, self.model_id, self.input_size, str(self.dtype))

    def cached_embedding(self, image, limits=None) -> ImageEmbedding | None:
        """The embedding of ``image`` if it is cached, without encoding."""
        rgb = self.prepare(image, limits)
        return self.memory.get(self.embedding_key(rgb))

    def encode(self, image, limits=None) -> ImageEmbedding:
        """Encode an image, or return its cached embedding."""
        rgb = self.prepare(image, limits)
        key = self.embedding_key(rgb)
        hit = self.memory.get(key)
        if hit is not None:
            return hit
        emb = self.encode_rgb(rgb, key)
        self.memory.put(key, emb)
        return emb

    def encode_rgb(self, rgb: np.ndarray, key: str = "") -> ImageEmbedding:
        """Run the image encoder on an (H, W, 3) uint8 image (no cache)."""
        import torch

        inputs = self.processor(images=rgb, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            feats = add_no_memory_embedding(self.model, pixels)
        self.encoder_calls += 1
        return ImageEmbedding(key=key, features=feats, image_shape=tuple(rgb.shape[:2]))

    # -- decoding ---------------------------------------------------------------------------
    def predict(self, embedding: ImageEmbedding, prompts: Sequence[ObjectPrompt]
                ) -> list[MaskPrediction]:
        """Decode each object's mask from a cached embedding.

        An object with exactly one point and no box/mask uses multimask output and
        keeps the mask with the highest predicted IoU; every other object uses
        single-mask output. Objects with the same kind of prompt are decoded in one
        batch; mask prompts are decoded one by one (a transformers limit).
        """
        prompts = list(prompts)
        for p in prompts:
            p.check_inside(embedding.image_shape)
        results: list[MaskPrediction | None] = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            sig = ("mask", i) if p.mask is not None else (
                p.uses_multimask, p.box is not None, len(p.points))
            groups.setdefault(sig, []).append(i)
        for idx in groups.values():
            for i, pred in zip(idx, self._decode_group(embedding, [prompts[i] for i in idx]),
                               strict=True):
                results[i] = pred
        return results

    def _prompt_tensors(self, shape, prompts: Sequence[ObjectPrompt]) -> dict:
        """Processor tensors for one batch of objects: the only route from prompts to SAM."""
        kwargs = {"original_sizes": [list(shape)], "return_tensors": "pt"}
        if len(prompts[0].points):
            kwargs["input_points"] = [[rowcol_to_xy(p.points) for p in prompts]]
            kwargs["input_labels"] = [[p.point_labels.tolist() for p in prompts]]
        if prompts[0].box is not None:
            kwargs["input_boxes"] = [[box_to_xyxy(p.box) for p in prompts]]
        enc = self.processor(**kwargs)
        return {k: enc[k] for k in ("input_points", "input_labels", "input_boxes") if k in enc}

    def _mask_logits(self, mask: np.ndarray):
        import torch
        import torch.nn.functional as F

        side = self.model.prompt_encoder.mask_input_size
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
        m = F.interpolate(m, size=tuple(side), mode="area").clamp(_MASK_EPS, 1 - _MASK_EPS)
        return torch.logit(m)

    def _decode_group(self, embedding: ImageEmbedding, prompts: Sequence[ObjectPrompt]):
        import torch

        multimask = prompts[0].uses_multimask
        tensors = {}
        if len(prompts[0].points) or prompts[0].box is not None:
            tensors = self._prompt_tensors(embedding.image_shape, prompts)
        if prompts[0].mask is not None:
            tensors["input_masks"] = self._mask_logits(prompts[0].mask)
        tensors = {k: v.to(self.device, self.dtype) if v.is_floating_point() else
                   v.to(self.device) for k, v in tensors.items()}
        with torch.inference_mode():
            out = self.model(image_embeddings=embedding.features, multimask_output=multimask,
                             **tensors)
            masks, ious = out.pred_masks[0], out.iou_scores[0]  # (P, M, h, w), (P, M)
            best = ious.argmax(dim=-1)
            rows = torch.arange(masks.shape[0], device=masks.device)
            masks = masks[rows, best][:, None].float()  # (P, 1, h, w)
            best_iou = ious[rows, best].float()
            logits = self.processor.post_process_masks(
                [masks.cpu()], [list(embedding.image_shape)], binarize=False)[0][:, 0]
            obj = out.object_score_logits[0, :, 0].float().cpu()
        return [MaskPrediction(logits=logits[i].numpy(), iou_score=float(best_iou[i]),
                               object_score=float(obj[i])) for i in range(len(prompts))]

    # -- one call ---------------------------------------------------------------------------
    def segment(self, image, prompts: Sequence[ObjectPrompt], *,
                max_hole_area: int = DEFAULTS.max_hole_area,
                max_sprinkle_area: int = DEFAULTS.max_sprinkle_area,
                limits=None) -> np.ndarray:
        """Labels for ``prompts`` on ``image``: int32, 0 background, object i -> id i+1.

        ``image`` is (H, W) or (H, W, C). Repeated calls on the same image reuse
        its embedding. Overlaps go to the object with the highest mask logit.
        """
        prompts = [p if isinstance(p, ObjectPrompt) else ObjectPrompt(**p) for p in prompts]
        image = np.asarray(image)
        shape = image.shape[:2]
        if not prompts:
            return np.zeros(shape, dtype=np.int32)
        for p in prompts:
            p.check_inside(shape)
        emb = self.encode(image, limits)
        preds = self.predict(emb, prompts)
        return masks_to_labels(np.stack([p.logits for p in preds]),
                               max_hole_area=max_hole_area, max_sprinkle_area=max_sprinkle_area)


__all__ = ["Sam3Segmenter", "ImageEmbedding", "MaskPrediction", "PromptError"]
