"""Concept segmentation: every instance of a text prompt and/or exemplar boxes.

SAM3's detector (transformers' ``Sam3Model`` + ``Sam3Processor``) returns, per
image, up to 200 candidate instances with a mask, a box and a score
``sigmoid(logit) * sigmoid(presence)``. :class:`ConceptSegmenter` runs it tile by
tile over large images and keeps every candidate above a low floor
(``min_score``) in a :class:`ConceptResult`; the user's threshold is applied
afterwards by :meth:`ConceptResult.paint`, so moving it never runs the model
again. Tiles are merged by :func:`napari_sam3.instances.merge_tiles` (an object on a
seam is taken whole from the tile that holds it best; no duplicates).

On one tile the candidates are exactly transformers' documented recipe::

    inputs = processor(images=rgb, text=text, input_boxes=..., input_boxes_labels=...)
    outputs = model(**inputs)
    processor.post_process_instance_segmentation(outputs, threshold, 0.5, [(H, W)])

Caching: the detector's vision neck differs from the tracker's, so the tracker
embeddings of :class:`~napari_sam3.segmenter.Sam3Segmenter` cannot serve it. What is
cached (memory LRU, then the same Zarr store format, under its own keys) is the
output of the ViT trunk (1024 x 72 x 72 for SAM3, 10.6 MB per tile in float16),
the expensive part; the neck (a few convolutions) runs again on each use. That is
five times smaller than caching the neck's three levels (55.7 MB per tile).

Exemplar boxes are encoded (the geometry encoder pools image features inside the box)
in the tile that holds them best, and those prompt tokens are reused on every other
tile: one box around a cell finds similar cells across a slide. torch and transformers
are imported inside functions only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .cache import MemoryLRU
from .defaults import DEFAULT_MIN_SCORE, DEFAULT_MODEL, DEFAULT_THRESHOLD
from .embedding_store import EmbeddingStore
from .everything import is_stack, segment_stack, stack_limits
from .instances import (
    Instance,
    InstanceResult,
    Painted,
    clean_instances,
    merge_tiles,
    nms,
    paint_labels,
)
from .model import (
    ModelLoadError,
    checkpoint_type,
    first_line,
    load_checkpoint,
    load_processor,
    model_fingerprint,
    prepare_model,
    resolve_device,
    resolve_dtype,
)
from .normalize import image_limits, to_rgb_uint8
from .postprocess import DEFAULTS as CLEANUP
from .prompts import PromptError, binary_labels, box_to_xyxy, check_box
from .tiling import TiledModel, TileGrid, pad_to

MASK_THRESHOLD = 0.5  # on the sigmoid of the mask logits, as in post_process_instance_segmentation
FEATURE_KEYS = ("presence",)
_TRUNK_KIND = "sam3-detector-vit-trunk"


# -- loading ----------------------------------------------------------------------------------
def load_concept_model(model: str = DEFAULT_MODEL, device: str = "cpu", dtype=None):
    """Load ``(Sam3Model, Sam3Processor)`` from a hub id or a local folder (safetensors only).

    ``facebook/sam3`` holds the detector and the tracker; a folder with a
    ``Sam3Model`` checkpoint (``model_type`` "sam3") works too. A tracker-only
    checkpoint, or one missing detector weights, is refused with a clear message.
    """
    source = prepare_model(model)
    kind = checkpoint_type(source)
    if kind is not None and kind not in ("sam3", "sam3_video"):
        raise ModelLoadError(
            f"'{source.name}' holds a '{kind}' checkpoint, not SAM3's concept detector: text and "
            "exemplar prompts need a full SAM3 checkpoint (facebook/sam3) or a Sam3Model folder"
        )
    from transformers import Sam3Model, Sam3Processor

    def missing_message(missing, total):
        return (f"'{source.name}' is not a complete SAM3 concept checkpoint: {len(missing)} of "
                f"{total} detector weights are missing (e.g. {missing[0]})")

    net = load_checkpoint(Sam3Model, source, "SAM3's concept detector", missing_message,
                          dtype=resolve_dtype(dtype, device))
    try:
        processor = load_processor(Sam3Processor, source)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the concept processor of '{source.name}': "
                             f"{first_line(e)}") from e
    return net.to(device).eval(), processor


# -- prompts ----------------------------------------------------------------------------------
def _exemplar_array(exemplars, labels, shape) -> tuple[np.ndarray, np.ndarray]:
    """Exemplar boxes (N, 4) as (row0, col0, row1, col1), sorted corners, and 0/1 labels."""
    if exemplars is None or len(exemplars) == 0:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    if np.ndim(exemplars) == 1 and len(exemplars) == 4 and np.isscalar(exemplars[0]):
        exemplars = [exemplars]  # one box
    boxes = np.array([check_box(b, f"exemplar box {i + 1}") for i, b in enumerate(exemplars)])
    lab = np.ones(len(boxes), dtype=np.int64) if labels is None else (
        binary_labels(labels, "exemplar labels"))
    if len(lab) != len(boxes):
        raise PromptError(f"{len(boxes)} exemplar boxes but {len(lab)} exemplar labels")
    h, w = shape
    for r0, c0, r1, c1 in boxes:
        if r1 < 0 or c1 < 0 or r0 >= h or c0 >= w:
            raise PromptError(f"exemplar box (rows {r0:g}-{r1:g}, cols {c0:g}-{c1:g}) is "
                              f"outside the {h}x{w} image")
    # a box sticking out of the image is the part inside it (huge corners break ROI pooling)
    return np.clip(boxes, 0, [h - 1, w - 1, h - 1, w - 1]), lab


# -- results ----------------------------------------------------------------------------------
@dataclass
class ConceptResult(InstanceResult):
    """Every candidate instance of one 2D image; :meth:`paint` applies a threshold.

    ``candidates`` (its ``items``) are per tile, unmerged, with score above ``min_score``.
    Changing the threshold only filters, merges tiles and writes labels: no model call.
    """

    feature_keys: ClassVar[tuple[str, ...]] = FEATURE_KEYS

    shape: tuple[int, int]
    grid: TileGrid
    candidates: list[Instance]
    min_score: float
    threshold: float = DEFAULT_THRESHOLD
    min_area: int = 0
    max_hole_area: int = CLEANUP.max_hole_area
    max_sprinkle_area: int = CLEANUP.max_sprinkle_area
    nms_iou: float | None = None
    match_iou: float = 0.5
    painted: Painted | None = field(default=None, repr=False)
    skipped: list = field(default_factory=list)  # boxes of tiles skipped as empty

    def instances(self, threshold: float | None = None) -> list[Instance]:
        """Instances scoring above ``threshold``, merged across tiles and cleaned."""
        threshold = self.threshold if threshold is None else float(threshold)
        if threshold < self.min_score:
            raise ValueError(f"threshold {threshold:g} is below the {self.min_score:g} kept at "
                             "detection; detect again with a lower min_score")
        chosen = [x for x in self.candidates if x.score > threshold]
        if self.nms_iou is not None:
            by_tile: dict[int, list[Instance]] = {}
            for x in chosen:
                by_tile.setdefault(x.tile, []).append(x)
            chosen = [y for xs in by_tile.values() for y in nms(xs, self.nms_iou, "mask")]
        merged = merge_tiles(chosen, self.grid, match_iou=self.match_iou)
        return clean_instances(merged, self.min_area, self.max_hole_area, self.max_sprinkle_area)

    @property
    def items(self) -> list[Instance]:
        return self.candidates

    def paint(self, out=None, *, threshold: float | None = None, overwrite: bool = False,
              start_id: int | None = None) -> np.ndarray:
        """int32 labels of the instances above ``threshold`` (default: :attr:`threshold`),
        ids by decreasing score.

        ``out``: labels to add to (kept unless ``overwrite``, new ids above their
        maximum), else a new array. Updates :attr:`threshold` and :attr:`features`
        (index, score, area, presence).
        """
        chosen = self.instances(threshold)
        if threshold is not None:
            self.threshold = float(threshold)
        out, self.painted = paint_labels(chosen, self.shape, out, overwrite=overwrite,
                                         start_id=start_id, min_area=self.min_area)
        return out



# -- the segmenter ----------------------------------------------------------------------------
@dataclass
class _Prompt:
    text: str
    boxes: np.ndarray  # (N, 4) image (row0, col0, row1, col1)
    labels: np.ndarray  # (N,)


def _make_prompt(text, exemplars, exemplar_labels, shape) -> _Prompt:
    boxes, labels = _exemplar_array(exemplars, exemplar_labels, shape)
    if text is None and not len(boxes):
        raise PromptError("give a text prompt, exemplar boxes or both")
    if text is not None and not str(text).strip():
        raise PromptError("the text prompt is empty")
    return _Prompt(str(text) if text is not None else "visual", boxes, labels)


class ConceptSegmenter(TiledModel):
    """SAM3 concept segmentation (text and/or exemplar boxes) with cached ViT features.

    Build with :meth:`from_pretrained` or :meth:`for_segmenter`. NumPy in, NumPy out;
    coordinates are (row, col). Large images are tiled like ``Sam3Segmenter``.
    """

    def __init__(self, model, processor, device: str = "cpu", *, model_id: str = "",
                 fingerprint: dict | None = None, store: EmbeddingStore | None = None,
                 cache_bytes: int = 1 << 30, tile_size: int | None = None,
                 overlap: int | None = None):
        super().__init__(model, processor, device, model_id=model_id, fingerprint=fingerprint,
                         store=store,
                         memory=MemoryLRU(cache_bytes, lambda t: t.numel() * t.element_size()),
                         tile_size=tile_size, overlap=overlap)
        self._text_cache: dict[str, tuple] = {}
        # encoder_calls counts ViT trunk runs
        self.shares_backbone = False  # True: the ViT is the tracker's (see share_backbone)
        self.decoder_calls = 0  # detector (DETR + mask decoder) runs

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device: str = "auto", dtype=None, *,
                        cache=None, cache_dtype: str = "float16", cache_bytes: int = 1 << 30,
                        tile_size: int | None = None, overlap: int | None = None,
                        on_cache_warning=None) -> ConceptSegmenter:
        """Load SAM3's detector; options as ``Sam3Segmenter.from_pretrained``."""
        dev = resolve_device(device)
        net, processor = load_concept_model(model, dev, dtype)
        store = None if cache is None else EmbeddingStore(cache, cache_dtype, on_cache_warning)
        return cls(net, processor, dev, model_id=str(model), store=store,
                   fingerprint=model_fingerprint(str(model), net, processor),
                   cache_bytes=cache_bytes,
                   tile_size=tile_size, overlap=overlap)

    @classmethod
    def for_segmenter(cls, segmenter, model: str | None = None) -> ConceptSegmenter:
        """The detector matching a ``Sam3Segmenter``: same checkpoint (unless ``model``),
        device, dtype, tiling and on-disk cache folder."""
        store = getattr(segmenter, "store", None)
        cache = store.path if store is not None else None
        dtype = str(segmenter.dtype).replace("torch.", "")
        cs = cls.from_pretrained(model or segmenter.model_id, segmenter.device, dtype,
                                 cache=cache,
                                 cache_dtype=store.storage_dtype.name if store else "float16",
                                 tile_size=segmenter.tile_size, overlap=segmenter.overlap)
        cs.shares_backbone = share_backbone(cs.model, segmenter.model)
        return cs

    # -- features ---------------------------------------------------------------------------
    def _trunk_key(self, rgb: np.ndarray) -> str:
        return self.feature_key(rgb, _TRUNK_KIND)

    def trunk(self, rgb: np.ndarray, meta: dict | None = None):
        """ViT output (1, h*w, C) for an (H, W, 3) uint8 image: memory, disk, or the ViT."""
        import torch

        def compute():
            pixels = self.processor.image_processor(images=rgb, return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, self.dtype)
            with torch.inference_mode():
                hidden = self.model.vision_encoder.backbone(pixels).last_hidden_state
            self.encoder_calls += 1
            return hidden

        def load(feats):
            return torch.from_numpy(np.asarray(feats[0]))[None].to(self.device, self.dtype)

        def stored_meta() -> dict:
            return {"model": self.fingerprint, "input_size": self.input_size,
                    "compute_dtype": str(self.dtype), "kind": _TRUNK_KIND,
                    "image_shape": list(rgb.shape[:2]), **(meta or {})}

        return self.feature_cache.get_or_compute(
            self._trunk_key(rgb), compute, load,
            lambda hidden: [hidden[0].float().cpu().numpy()], stored_meta)

    def vision_embeds(self, rgb: np.ndarray, meta: dict | None = None):
        """``Sam3VisionEncoderOutput`` for ``rgb`` from the cached trunk (the neck runs here);
        equal to ``model.get_vision_features(pixel_values)``."""
        import torch
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        hidden = self.trunk(rgb, meta)
        enc = self.model.vision_encoder
        side = self.input_size // enc.config.backbone_config.patch_size
        spatial = hidden.view(hidden.shape[0], side, side, -1).permute(0, 3, 1, 2)
        with torch.inference_mode():
            fpn, pos = enc.neck(spatial)
        return Sam3VisionEncoderOutput(last_hidden_state=hidden, fpn_hidden_states=fpn,
                                       fpn_position_encoding=pos)

    def text_embeds(self, text: str):
        """(``get_text_features`` output, attention mask) for ``text``, cached per string."""
        import torch

        hit = self._text_cache.get(text)
        if hit is None:
            enc = self.processor(text=text, return_tensors="pt")
            ids = enc["input_ids"].to(self.device)
            mask = enc["attention_mask"].to(self.device)
            with torch.inference_mode():
                feats = self.model.get_text_features(input_ids=ids, attention_mask=mask)
            hit = (feats, mask)
            if len(self._text_cache) > 64:
                self._text_cache.clear()
            self._text_cache[text] = hit
        return hit

    def _box_tensors(self, boxes_rc: np.ndarray, labels: np.ndarray, model_shape) -> dict:
        """Processor tensors for boxes in a frame of ``model_shape`` (cxcywh, normalised)."""
        enc = self.processor(original_sizes=[list(model_shape)],
                             input_boxes=[[box_to_xyxy(b) for b in boxes_rc]],
                             input_boxes_labels=[labels.tolist()], return_tensors="pt")
        return {"input_boxes": enc["input_boxes"].to(self.device, self.dtype),
                "input_boxes_labels": enc["input_boxes_labels"].to(self.device)}

    def _geometry(self, vision, boxes_rc, labels, model_shape):
        """The geometry encoder's prompt tokens for boxes in one tile, as ``forward`` makes them."""
        import torch

        t = self._box_tensors(boxes_rc, labels, model_shape)
        box_labels = t["input_boxes_labels"]
        with torch.inference_mode():
            return self.model.geometry_encoder(
                box_embeddings=t["input_boxes"], box_mask=box_labels != -10,
                box_labels=torch.where(box_labels == -10, 0, box_labels),
                img_feats=vision.fpn_hidden_states[:-1],
                img_pos_embeds=vision.fpn_position_encoding[:-1])

    def _forward(self, vision, text_feats, text_mask, geometry):
        """``Sam3Model.forward`` with cached vision/text features and given prompt tokens."""
        import torch

        kwargs = {"vision_embeds": vision, "text_embeds": text_feats, "attention_mask": text_mask}
        handle = None
        if geometry is not None:
            # forward() encodes boxes itself; hand it the tokens computed in the exemplars'
            # own tile(s) instead (a dummy box switches the geometry path on)
            n = geometry.last_hidden_state.shape[1] - 1
            kwargs["input_boxes"] = torch.full((1, max(n, 1), 4), 0.5, device=self.device,
                                               dtype=self.dtype)
            kwargs["input_boxes_labels"] = torch.ones((1, max(n, 1)), dtype=torch.long,
                                                      device=self.device)
            handle = self.model.geometry_encoder.register_forward_hook(
                lambda _m, _i, _o: geometry)
        try:
            with torch.inference_mode():
                out = self.model(**kwargs)
        finally:
            if handle is not None:
                handle.remove()
        self.decoder_calls += 1
        return out

    # -- detection --------------------------------------------------------------------------
    def _tile_views(self, image, limits):
        """(index, tile or None, rgb handed to the model, model shape, valid shape, origin)."""
        grid = self.tiles(image)
        shape = tuple(int(v) for v in image.shape[:2])
        if grid.single:
            rgb = to_rgb_uint8(image, limits)
            return grid, [(0, None, lambda: rgb, shape, shape, (0, 0))]
        lim = image_limits(image, limits)

        def view(t):
            return lambda: pad_to(to_rgb_uint8(grid.read(image, t), lim), grid.padded_shape(t))

        return grid, [(k, t, view(t), grid.padded_shape(t), t.shape, (t.r0, t.c0))
                      for k, t in enumerate(grid.tiles)]

    def _exemplar_tokens(self, prompt: _Prompt, grid, views):
        """Prompt tokens of the exemplars, each group encoded in the tile that holds it best."""
        import torch

        if not len(prompt.boxes):
            return None
        groups: dict[int, list[int]] = {}
        for i, (r0, c0, r1, c1) in enumerate(prompt.boxes):
            k = 0 if grid.single else grid.tiles.index(grid.route((r0, c0, r1, c1)))
            groups.setdefault(k, []).append(i)
        parts = []
        for k, idx in sorted(groups.items()):
            _, _, rgb, model_shape, valid, (r, c) = views[k]
            boxes = prompt.boxes[idx] - np.array([r, c, r, c], dtype=np.float64)
            h, w = valid
            if not grid.single:  # a box sticking out of its tile is clipped to it
                boxes = np.clip(boxes, 0, [h - 1, w - 1, h - 1, w - 1])
            vision = self.vision_embeds(rgb(), {"tile": [r, c]})
            parts.append(self._geometry(vision, boxes, prompt.labels[idx], model_shape))
        if len(parts) == 1:
            return parts[0]
        out = parts[0]
        out.last_hidden_state = torch.cat([p.last_hidden_state for p in parts], dim=1)
        out.attention_mask = torch.cat([p.attention_mask for p in parts], dim=1)
        return out

    def detect(self, image, text: str | None = None, exemplars=None, *, exemplar_labels=None,
               min_score: float = DEFAULT_MIN_SCORE, threshold: float = DEFAULT_THRESHOLD,
               limits=None, min_area: int = 0, max_hole_area: int = CLEANUP.max_hole_area,
               max_sprinkle_area: int = CLEANUP.max_sprinkle_area, nms_iou: float | None = None,
               match_iou: float = 0.5, progress: Callable | None = None, client=None,
               skip=None) -> ConceptResult:
        """Run the detector over ``image`` (2D, (H, W) or (H, W, C)) and keep every candidate.

        ``text``: a noun phrase ("nucleus"); ``exemplars``: boxes (row0, col0, row1, col1)
        of example objects, with ``exemplar_labels`` 1 (positive, default) or 0
        (negative); give text, exemplars or both. Candidates scoring above
        ``min(min_score, threshold)`` are kept; ``threshold`` is the result's initial
        threshold. ``nms_iou``: optional mask NMS within a tile (SAM3 needs none).
        ``progress(done, total)`` after each tile; ``client``, ``skip``: as in
        ``everything.generate_everything``.
        """
        shape = tuple(int(v) for v in image.shape[:2])
        prompt = _make_prompt(text, exemplars, exemplar_labels, shape)
        floor = min(float(min_score), float(threshold))
        grid = self.tiles(image)
        if not grid.single:
            limits = image_limits(image, limits)
        if client is not None:
            from .distributed.run import concept_candidates
            found, skipped = concept_candidates(client, self, image, grid, prompt, limits,
                                                floor, progress, skip)
        else:
            found, skipped, memo = [], [], {}
            for k, t in enumerate(grid.tiles):
                part = self.tile_candidates(image, prompt, k, limits, floor, skip, memo)
                if part is None:
                    skipped.append((t.r0, t.c0, t.r1, t.c1))
                else:
                    found += part
                if progress is not None:
                    progress(k + 1, len(grid))
        return ConceptResult(shape, grid, found, floor, float(threshold), int(min_area),
                             int(max_hole_area), int(max_sprinkle_area), nms_iou, match_iou,
                             skipped=skipped)

    def tile_candidates(self, image, prompt: _Prompt, k: int, limits, floor: float,
                        skip=None, memo: dict | None = None) -> list[Instance] | None:
        """Candidates above ``floor`` on tile ``k`` (None: skipped as empty), here and on
        workers; ``memo`` keeps an image's views, text and exemplar tokens over its tiles."""
        memo = {} if memo is None else memo
        grid, views = memo.get("views") or memo.setdefault("views", self._tile_views(image, limits))
        if skip is not None and skip.empty(image, grid, grid.tiles[k], limits):
            return None
        if "geometry" not in memo:
            memo["text"] = self.text_embeds(prompt.text)
            memo["geometry"] = self._exemplar_tokens(prompt, grid, views)
        _, _tile, rgb, model_shape, valid, origin = views[k]
        vision = self.vision_embeds(rgb(), {"tile": list(origin)})
        out = self._forward(vision, *memo["text"], memo["geometry"])
        return self._instances(out, model_shape, valid, origin, k, floor)

    def _instances(self, out, model_shape, valid, origin, tile, floor) -> list[Instance]:
        """Candidates of one tile above ``floor``, as post_process_instance_segmentation."""
        import torch
        import torch.nn.functional as F

        scores = out.pred_logits[0].float().sigmoid()
        presence = torch.ones(()) if out.presence_logits is None else (
            out.presence_logits[0].float().sigmoid())
        scores = (scores * presence).cpu()
        keep = torch.nonzero(scores > floor).flatten()
        h, w = valid
        found = []
        for chunk in keep.split(16):
            with torch.inference_mode():
                probs = out.pred_masks[0, chunk.to(out.pred_masks.device)].float().sigmoid()
                probs = F.interpolate(probs[None], size=tuple(model_shape), mode="bilinear",
                                      align_corners=False)[0]
                binary = (probs[:, :h, :w] > MASK_THRESHOLD).cpu().numpy()
            for j, q in enumerate(chunk.tolist()):
                inst = Instance.from_mask(binary[j], float(scores[q]), origin, tile, query=q,
                                          presence=float(presence))
                if inst is not None:
                    found.append(inst)
        return found

    # -- one call ---------------------------------------------------------------------------
    def segment_concept(self, image, text: str | None = None, exemplars=None,
                        threshold: float = DEFAULT_THRESHOLD, *, exemplar_labels=None,
                        out=None, overwrite: bool = False, rgb: bool | None = None,
                        limits=None, **options) -> np.ndarray:
        """int32 instance labels of every object matching the concept (0: background).

        ``image``: 2D or a stack (Z, H, W[, C]), segmented slice by slice with ids unique
        across slices. Ids follow decreasing score. ``out``: labels to add to, kept unless
        ``overwrite``. Other options as in :meth:`detect`.
        """
        if is_stack(image, rgb):
            lim = stack_limits(image, limits, rgb)

            def detect(plane) -> ConceptResult:
                return self.detect(plane, text, exemplars, exemplar_labels=exemplar_labels,
                                   threshold=threshold, limits=lim, **options)

            return segment_stack(detect, image, out, overwrite=overwrite)
        res = self.detect(image, text, exemplars, exemplar_labels=exemplar_labels,
                          threshold=threshold, limits=limits, **options)
        return res.paint(out, overwrite=overwrite)


# -- sharing the ViT trunk with the tracker -----------------------------------------------------
_CONFIG_NOISE = {"_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version",
                 "architectures", "_commit_hash", "_attn_implementation_autoset"}


def _trunk_config(backbone) -> dict:
    return {k: v for k, v in backbone.config.to_dict().items() if k not in _CONFIG_NOISE}


def share_backbone(concept_model, tracker_model) -> bool:
    """Make the detector use the tracker's ViT trunk when both are the same weights.

    In ``facebook/sam3`` the detector and the tracker share one ViT (only their necks
    differ); loaded separately it would sit twice in memory (~0.45 B parameters).
    Returns True when shared (weights, buffers and settings equal), else changes nothing.
    """
    import torch

    mine, theirs = concept_model.vision_encoder.backbone, tracker_model.vision_encoder.backbone
    if mine is theirs:
        return True
    if type(mine) is not type(theirs) or _trunk_config(mine) != _trunk_config(theirs):
        return False
    a, b = mine.state_dict(), theirs.state_dict()
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if v.shape != w.shape or v.dtype != w.dtype or v.device != w.device:
            return False
        if not torch.equal(v, w):
            return False
    concept_model.vision_encoder.backbone = theirs
    return True


def tracker_embeddings_from_trunk(tracker_model, trunk) -> list:
    """The tracker's decoder inputs (3 levels, with the no-memory term on the last, as
    ``Sam3Segmenter`` makes them) from a ViT trunk output (1, h*w, C), e.g. the one
    :meth:`ConceptSegmenter.trunk` caches, when :func:`share_backbone` holds: the tracker
    then needs no second ViT run on that tile."""
    import torch

    enc = tracker_model.vision_encoder
    side = int(round(trunk.shape[1] ** 0.5))
    spatial = trunk.view(trunk.shape[0], side, side, -1).permute(0, 3, 1, 2)
    with torch.inference_mode():
        fpn, _ = enc.neck(spatial)
        levels = len(tracker_model.backbone_feature_sizes)
        feats = list(fpn[:levels])
        feats[0] = tracker_model.mask_decoder.conv_s0(feats[0])
        feats[1] = tracker_model.mask_decoder.conv_s1(feats[1])
        feats[-1] = feats[-1] + tracker_model.no_memory_embedding.reshape(1, -1, 1, 1).to(
            feats[-1].dtype)
    return feats


# -- attached to a Sam3Segmenter ---------------------------------------------------------------
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def concept_for(segmenter, model: str | None = None) -> ConceptSegmenter:
    """The :class:`ConceptSegmenter` used with ``segmenter`` (loaded once, then reused)."""
    cs = _ATTACHED.get(segmenter)
    if cs is None or (model is not None and cs.model_id != str(model)):
        cs = ConceptSegmenter.for_segmenter(segmenter, model)
        _ATTACHED[segmenter] = cs
    return cs


def attach_concept(segmenter, concept: ConceptSegmenter) -> None:
    """Use ``concept`` for ``segmenter.segment_concept`` (e.g. a detector loaded elsewhere)."""
    _ATTACHED[segmenter] = concept


def segment_concept(segmenter, image, text: str | None = None, exemplars=None,
                    threshold: float = DEFAULT_THRESHOLD, *, concept_model: str | None = None,
                    **options) -> np.ndarray:
    """``Sam3Segmenter.segment_concept``: see :meth:`ConceptSegmenter.segment_concept`.

    The detector comes from the segmenter's checkpoint (``concept_model`` to override)
    and shares its device, dtype, tiling and cache folder.
    """
    return concept_for(segmenter, concept_model).segment_concept(
        image, text, exemplars, threshold, **options)


def detect_concept(segmenter, image, text: str | None = None, exemplars=None, *,
                   concept_model: str | None = None, **options) -> ConceptResult:
    """Like :func:`segment_concept` but returns the :class:`ConceptResult` (re-thresholdable)."""
    return concept_for(segmenter, concept_model).detect(image, text, exemplars, **options)


__all__ = ["ConceptSegmenter", "ConceptResult", "load_concept_model", "concept_for",
           "attach_concept", "segment_concept", "detect_concept", "share_backbone",
           "tracker_embeddings_from_trunk", "DEFAULT_THRESHOLD", "DEFAULT_MIN_SCORE"]
