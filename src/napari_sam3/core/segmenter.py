"""Sam3Segmenter: SAM3 promptable segmentation of 2D images, NumPy in, NumPy out.

The image is encoded once (the expensive part) and kept in a cache keyed by
its pixels; every later prompt only runs the prompt encoder and mask decoder.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import tile_keys
from .cache import MemoryLRU
from .checks import cleanup_areas, finite_number, labels_shape, whole_number
from .decode import ObjectMask, checked_objects, crops, upsample
from .defaults import DEFAULT_DIRECTION, DEFAULT_MODEL, DEFAULT_STOP_AFTER, DIRECTIONS
from .embedding_store import EmbeddingStore
from .heap import trim_heap
from .model import load_tracker, model_fingerprint, resolve_device
from .normalize import check_limits, image_limits, to_rgb_uint8
from .postprocess import DEFAULTS, Flush, paste_objects
from .prompts import (
    ObjectPrompt,
    PromptError,
    as_prompts,
    box_to_xyxy,
    prompt_bbox,
    prompt_in_tile,
    rowcol_to_xy,
)
from .propagation import write_slice
from .tiling import Tile, TiledModel, TileGrid, pad_to

_MASK_EPS = 1e-3  # binary mask prompt -> logits of about +-6.9, as micro-sam does
DECODE_BATCH = 32  # objects per mask-decoder call (it copies the image features per object)
UPSAMPLE_BYTES = 16 << 20  # full-resolution float32 logits upsampled at once (>= 1 object)


@dataclass
class ImageEmbedding:
    """The decoder inputs of one encoded image: three feature levels, batch 1."""

    key: str
    raw: list  # torch tensors (1, C, h, w) on the model's device and dtype, as cached
    features: list  # ``raw`` with the no-memory term: what the mask decoder takes
    image_shape: tuple[int, int]  # (H, W) of the encoded image

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.raw + self.features[-1:])


@dataclass
class MaskPrediction:
    """One object's result: mask logits at image resolution and SAM's scores."""

    logits: np.ndarray  # (H, W) float32; the mask is logits > 0
    iou_score: float
    object_score: float  # > 0: SAM thinks an object is present


def image_features(model, pixel_values) -> list:
    """The decoder's three feature levels of an image, without the no-memory term.

    transformers 5.2x adds ``no_memory_embedding`` to neck level [-1], which it then
    drops (4 levels, 3 used): the 72x72 level the decoder uses never gets it. That
    level is captured as the neck returns it (raw with the defect, and after a fix
    too), so :func:`with_no_memory` adds the term exactly once, where the original
    SAM3 predictor does. The cache stores raw features; the video tracker takes them.
    """
    level = len(model.backbone_feature_sizes) - 1
    seen = {}

    def grab(_module, _inputs, output):
        seen["raw"] = output.fpn_hidden_states[level]

    handle = model.vision_encoder.register_forward_hook(grab)
    try:
        emb = list(model.get_image_embeddings(pixel_values))
    finally:
        handle.remove()
    raw = seen["raw"]
    if raw.shape == emb[-1].shape:  # (B, C, h, w); otherwise transformers changed layout
        emb[-1] = raw
    return emb


def with_no_memory(model, features: list) -> list:
    """Add ``no_memory_embedding`` to the decoder's last (72x72) level: an image prompt
    has no memory of earlier frames, as in the original SAM3 image predictor."""
    last = features[-1] + model.no_memory_embedding.reshape(1, -1, 1, 1).to(features[-1].dtype)
    return list(features[:-1]) + [last]


def add_no_memory_embedding(model, pixel_values) -> list:
    """``model.get_image_embeddings`` with the no-memory term where the original adds it."""
    return with_no_memory(model, image_features(model, pixel_values))


class Sam3Segmenter(TiledModel):
    """SAM3 point/box/mask segmentation with cached image embeddings.

    Build with :meth:`from_pretrained`. Coordinates are NumPy/napari (row, col).
    Images larger than ``tile_size`` are split into overlapping tiles that are
    encoded lazily, when a prompt needs them (see :mod:`napari_sam3.tiling`).
    """

    def __init__(self, model, processor, device: str = "cpu", cache_bytes: int = 2 << 30,
                 model_id: str = "", store: EmbeddingStore | None = None,
                 tile_size: int | None = None, overlap: int | None = None,
                 fingerprint: dict | None = None):
        super().__init__(model, processor, device, model_id=model_id, fingerprint=fingerprint,
                         store=store, memory=MemoryLRU(cache_bytes, lambda e: e.nbytes),
                         tile_size=tile_size, overlap=overlap)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device: str = "auto", dtype=None, *,
                        cache=None, cache_dtype: str = "float16", cache_bytes: int = 2 << 30,
                        tile_size: int | None = None, overlap: int | None = None,
                        on_cache_warning=None) -> Sam3Segmenter:
        """Load a SAM3 tracker from a hub id (default ``facebook/sam3``) or a local folder.

        ``cache``: a folder for the Zarr embedding cache (None: memory only);
        ``cache_dtype``: float16 (default, half the disk) or float32 (exact);
        ``cache_bytes``: bound of the in-memory LRU of recent tiles;
        ``tile_size``/``overlap``: tiling of large images (default: the model's input
        size, and a quarter of the tile).
        """
        dev = resolve_device(device)
        net, processor = load_tracker(model, dev, dtype)
        store = None if cache is None else EmbeddingStore(cache, cache_dtype, on_cache_warning)
        return cls(net, processor, dev, cache_bytes=cache_bytes, model_id=str(model),
                   store=store, tile_size=tile_size, overlap=overlap,
                   fingerprint=model_fingerprint(str(model), net, processor))

    # -- encoding ---------------------------------------------------------------------------
    def resolve_limits(self, image, limits=None):
        """The intensity limits used for every tile of ``image`` (see ``normalize``).

        Sampling a lazy (Zarr, dask) image costs tens of milliseconds, so its limits are
        remembered for as long as the array object lives; NumPy arrays, which are edited
        in place, are sampled every time.
        """
        if limits is not None or isinstance(image, np.ndarray):
            return image_limits(image, limits)
        memo = getattr(self, "_limits_memo", None)
        if memo is not None and memo[0]() is image:
            return memo[1]
        found = image_limits(image)
        try:
            self._limits_memo = (weakref.ref(image), found)
        except TypeError:  # not weak-referenceable: no memo
            pass
        return found

    def prepare(self, image, limits=None) -> np.ndarray:
        """The (H, W, 3) uint8 image the processor receives (see ``normalize``)."""
        return to_rgb_uint8(image, limits)

    def embedding_key(self, rgb: np.ndarray) -> str:
        return self.feature_key(rgb)

    def _loader(self, key: str, shape):
        """Stored arrays -> the ImageEmbedding of ``key`` on the model's device and dtype."""
        def load(feats) -> ImageEmbedding:
            import torch

            raw = [torch.from_numpy(np.asarray(f))[None].to(self.device, self.dtype)
                   for f in feats]
            return ImageEmbedding(key=key, raw=raw, features=with_no_memory(self.model, raw),
                                  image_shape=tuple(shape))
        return load

    def embed_rgb(self, rgb: np.ndarray, meta: dict | None = None) -> ImageEmbedding:
        """The embedding of an (H, W, 3) uint8 image: memory, then disk, then the encoder."""
        return self._embed(self.embedding_key(rgb), rgb.shape[:2], lambda: rgb, meta)

    def _embed(self, key: str, shape, rgb, meta: dict | None) -> ImageEmbedding:
        """``key``'s embedding: memory, then disk, then the encoder on ``rgb()``."""
        def stored_meta() -> dict:
            return {"model": self.fingerprint, "input_size": self.input_size,
                    "compute_dtype": str(self.dtype), "image_shape": list(shape),
                    **(meta or {})}

        return self.feature_cache.get_or_compute(
            key, lambda: self.encode_rgb(rgb(), key), self._loader(key, shape),
            lambda emb: [f[0].float().cpu().numpy() for f in emb.raw], stored_meta)

    def image_key(self, image, limits=None) -> str:
        """The cache key of the whole image's embedding, remembered per image object and
        limits: a repeated click costs a digest of the raw pixels, not a normalisation
        and hash (the rule: :func:`tile_keys.image_key`)."""
        return tile_keys.image_key(self, image, limits)

    def cached_embedding(self, image, limits=None) -> ImageEmbedding | None:
        """The embedding of ``image`` if it is cached (memory or disk), without encoding."""
        key = tile_keys.image_key(self, image, limits)
        return self.feature_cache.get(key, self._loader(key, np.shape(image)[:2]))

    def encode(self, image, limits=None) -> ImageEmbedding:
        """Encode a whole image (resized to the model input), or return its cached embedding."""
        made: dict = {}
        key = tile_keys.image_key(self, image, limits, made)
        return self._embed(key, tuple(np.shape(image)[:2]),
                           lambda: made["rgb"] if "rgb" in made else self.prepare(image, limits),
                           {"limits": _limits_meta(limits)})

    def encode_rgb(self, rgb: np.ndarray, key: str = "") -> ImageEmbedding:
        """Run the image encoder on an (H, W, 3) uint8 image (no cache)."""
        import torch

        if (ahead := self.__dict__.get("_encoded_ahead", {}).pop(key, None)) is not None:
            return ahead  # encoded in a batch: see batch_encode
        inputs = self.processor(images=rgb, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            raw = image_features(self.model, pixels)
            feats = with_no_memory(self.model, raw)
        self.encoder_calls += 1
        return ImageEmbedding(key=key, raw=raw, features=feats, image_shape=tuple(rgb.shape[:2]))

    def tile_rgb(self, image, grid: TileGrid, tile: Tile, limits) -> np.ndarray:
        """The model's view of one tile: normalised with the image's limits, zero-padded."""
        return pad_to(self.prepare(grid.read(image, tile), limits), grid.padded_shape(tile))

    def encode_tile(self, image, grid: TileGrid, tile: Tile, limits) -> ImageEmbedding:
        """A tile's embedding; a cached one is found by its remembered key, unread."""
        hit, rgb = tile_keys.cached_tile(self, image, grid, tile, limits)
        if hit is not None:
            return hit
        meta = {"limits": _limits_meta(limits), "tile": [tile.r0, tile.c0, tile.r1, tile.c1],
                "tile_size": grid.tile_size, "overlap": grid.overlap}
        return self.embed_rgb(rgb, meta)

    def encoded_tiles(self, image, limits=None, region=None, read: bool = False) -> list:
        """Boxes (r0, c0, r1, c1) of the encoded tiles: :func:`tile_keys.encoded_tiles`."""
        return tile_keys.encoded_tiles(self, image, limits, region, read)

    def precompute(self, image, limits=None, region=None, *, client=None, skip=None,
                   report=None, batch_size: int | None = None):
        """Encode every tile of ``image`` (or those meeting ``region`` = (r0, c0, r1, c1)).

        A generator yielding ``(done, total, encoded)`` after each tile, so callers can
        show progress and stop between tiles; tiles already cached are not encoded.
        ``client``: a ``distributed.Client`` whose workers encode tiles into the shared
        store; ``skip``, ``report``: see :mod:`.distributed`; ``batch_size``: tiles per
        encoder forward (None: 4 on CUDA, else 1; see :mod:`.batch_encode`).
        """
        from .distributed import iter_precompute

        return iter_precompute(self, image, limits, region, client=client, skip=skip,
                               report=report, batch_size=batch_size)

    # -- decoding ---------------------------------------------------------------------------
    def predict(self, embedding: ImageEmbedding, prompts: Sequence[ObjectPrompt]
                ) -> list[MaskPrediction]:
        """Decode each object's mask from one embedding (prompts in its image frame).

        An object with exactly one point and no box/mask uses multimask output and
        keeps the mask with the highest predicted IoU; every other object uses
        single-mask output. Objects with the same kind of prompt are decoded together,
        ``DECODE_BATCH`` at a time; mask prompts are decoded one by one (a transformers
        limit). Each result holds logits over the whole image: for many objects use
        :meth:`segment` or :meth:`iter_objects`, which keep only each object's box.
        """
        prompts = list(prompts)
        for p in prompts:
            p.check_inside(embedding.image_shape)
        results: list[MaskPrediction | None] = [None] * len(prompts)
        for i, obj in self._decode(embedding, prompts):
            results[i] = MaskPrediction(obj.logits, obj.iou_score, obj.object_score)
        return results

    def predict_objects(self, image, prompts: Sequence[ObjectPrompt], limits=None, *,
                        crop: bool = False) -> list[ObjectMask]:
        """Each object's mask logits over the tile that holds its prompts (the whole image
        when it is not tiled), or with ``crop`` over the bounding box of its mask only.

        Works on NumPy, Zarr and dask arrays; only the tiles that prompts touch are read
        and encoded. ``limits`` as in :func:`normalize.image_limits`. Without ``crop``
        every result holds a tile of float32 logits (4 MB for a 1008 px tile): fine for
        a few objects; :meth:`iter_objects` and :meth:`segment` scale to thousands.
        """
        shape = tuple(image.shape[:2])
        prompts = as_prompts(prompts, shape)
        results: list[ObjectMask | None] = [None] * len(prompts)
        for _later, objects in self._objects_by_tile(image, prompts, limits, crop):
            for i, obj in objects:
                results[i] = obj
        return results

    def iter_objects(self, image, prompts: Sequence[ObjectPrompt], limits=None, *,
                     crop: bool = True) -> Iterator[tuple[int, ObjectMask]]:
        """Yields ``(i, ObjectMask)`` for prompt i as objects are decoded, tile by tile.

        With ``crop`` (default) each object's logits cover only the bounding box of its
        mask (logits > 0; an empty mask has a 0x0 region), so what the caller keeps
        costs the objects' sizes, and the decoder's working memory is bounded by one
        batch (``DECODE_BATCH`` objects, ``UPSAMPLE_BYTES`` of full-size logits), not
        by the number of objects. Prompts are checked before anything is decoded.
        """
        prompts = as_prompts(prompts, tuple(image.shape[:2]))
        for _later, objects in self._objects_by_tile(image, prompts, limits, crop):
            yield from objects

    def _objects_by_tile(self, image, prompts: list[ObjectPrompt], limits, crop: bool, route=None):
        """Per tile that prompts need, in grid order: ``(later, objects)``, ``later`` the
        boxes of the tiles still to come, ``objects`` a generator of ``(i, ObjectMask)`` in
        image coordinates; ``route(bbox) -> Tile`` replaces the rule. Prompts checked first."""
        shape = tuple(image.shape[:2])
        grid = self.tiles(image)
        if grid.single:
            for p in prompts:
                p.check_inside(shape)
            yield (), self._decode(self.encode(image, limits), prompts, crop=crop)
            return
        limits = self.resolve_limits(image, limits)
        by_tile: dict[Tile, list[int]] = {}
        route = route or tile_keys.router(self, image, grid, limits)  # encoded tiles first
        for i, p in enumerate(prompts):
            by_tile.setdefault(route(prompt_bbox(p)), []).append(i)
        order = [t for t in grid.tiles if t in by_tile]
        for tile in order:  # in the tile's frame too, before anything is decoded or written
            for i in by_tile[tile]:
                prompt_in_tile(prompts[i], tile, grid.padded_shape(tile), mask=False
                               ).check_inside(grid.padded_shape(tile))
        for k, tile in enumerate(order):
            later = tuple((t.r0, t.c0, t.r1, t.c1) for t in order[k + 1:])
            yield later, self._tile_objects(image, grid, tile, by_tile[tile], prompts, limits,
                                            crop)

    def _tile_objects(self, image, grid, tile: Tile, idx, prompts, limits, crop: bool):
        emb = self.encode_tile(image, grid, tile, limits)
        local = [prompt_in_tile(prompts[i], tile, grid.padded_shape(tile)) for i in idx]
        for j, obj in self._decode(emb, local, valid=tile.shape, crop=crop):
            yield idx[j], obj.shifted(tile.r0, tile.c0, (tile.r0, tile.c0, tile.r1, tile.c1))

    def _decode(self, embedding: ImageEmbedding, prompts: Sequence[ObjectPrompt],
                valid=None, crop: bool = False) -> Iterator[tuple[int, ObjectMask]]:
        """``(i, ObjectMask)`` for each prompt, in the embedding's frame, batch by batch.

        Prompts of one kind go to the decoder ``DECODE_BATCH`` at a time (it copies the
        image features for every object, ~30 MB each at full size). ``valid``: the
        (h, w) image part of the embedding (the rest is tile padding, cut off);
        ``crop``: keep only the bounding box of each mask.
        """
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            sig = ("mask", i) if p.mask is not None else (
                p.uses_multimask, p.box is not None, len(p.points))
            groups.setdefault(sig, []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), DECODE_BATCH):
                part = idx[start:start + DECODE_BATCH]
                batch = self._decode_group(embedding, [prompts[i] for i in part], valid, crop)
                yield from zip(part, batch, strict=True)

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

    def _decode_group(self, embedding: ImageEmbedding, prompts: Sequence[ObjectPrompt],
                      valid=None, crop: bool = False) -> Iterator[ObjectMask]:
        """One decoder call for prompts of one kind; the low-resolution masks are then
        upsampled to the image a few at a time (``UPSAMPLE_BYTES``), each cut to ``valid``
        (and with ``crop`` to its box) and copied, so no full-size batch outlives its
        step; freed heap memory goes back to the system after each step.

        On CUDA/MPS the masks are upsampled and cut on the device; only the crops come
        to the host (see :mod:`.decode`)."""
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
            masks = masks[rows, best][:, None]  # (P, 1, h, w), low resolution, on the device
            best_iou = ious[rows, best].float().cpu()
            obj = out.object_score_logits[0, :, 0].float().cpu()
        del out
        shape = tuple(embedding.image_shape)
        h, w = shape if valid is None else (int(valid[0]), int(valid[1]))
        step = max(1, UPSAMPLE_BYTES // (4 * shape[0] * shape[1]))
        for start in range(0, len(prompts), step):
            up = upsample(self.processor, masks[start:start + step], shape)
            parts = crops(up, (h, w), crop)
            del up  # freed before the next step (but a lone object's own logits)
            for j, (region, logits) in enumerate(parts, start):
                yield ObjectMask(region, logits, float(best_iou[j]), float(obj[j]))
            del parts
            trim_heap()  # else heap fragmentation makes resident memory grow with the count

    # -- z-stacks and time series -----------------------------------------------------------
    def video_tracker(self):
        """The propagation engine, loaded on first use from the same model argument."""
        if getattr(self, "_propagator", None) is None:
            from .model import load_video_tracker
            from .propagation import Propagator

            net, processor = load_video_tracker(self.model_id, self.device, self.dtype)
            self._propagator = Propagator(self, net, processor)
        return self._propagator

    def iter_propagate(self, stack, prompts_by_slice, axis: int = 0, direction: str = DEFAULT_DIRECTION,
                       start: int | None = None, stop: int | None = None, *, fixed=None,
                       limits=None, score_threshold: float = 0.0, stop_after: int = DEFAULT_STOP_AFTER):
        """Track objects through a stack; yields a ``SliceResult`` per slice as it comes.

        ``prompts_by_slice``: ``{slice: {id: ObjectPrompt}}`` (or ``{slice: [prompts]}``,
        ids 1, 2, ...). Every prompted slice conditions the tracker. Slices ``start`` to
        ``stop - 1`` are tracked (``stop`` exclusive, as in Python). The forward pass
        starts at the first prompted slice in that range; the backward pass at the last
        one (``"both"``: at the slice before the first, so each slice comes once). An
        object stops being followed after ``stop_after`` slices in a row with object
        score below ``score_threshold``; a pass ends when all its objects are gone.
        Arguments are checked here, before the first slice is tracked.
        """
        from .propagation import StackFrames, normalize_prompts

        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
        frames = StackFrames(stack, axis, fixed)
        depth, plane = len(frames), frames.shape[:2]
        prompts = normalize_prompts(prompts_by_slice, plane)
        start = 0 if start is None else whole_number("start", start)
        stop = depth if stop is None else whole_number("stop", stop)
        if not 0 <= start < stop <= depth:
            raise PromptError(f"slice range {start}-{stop - 1} is outside the stack of {depth}")
        for k in prompts:
            if not 0 <= k < depth:
                raise PromptError(f"slice {k} is outside the stack of {depth} slices")
        finite_number("score_threshold", score_threshold)
        stop_after = whole_number("stop_after", stop_after, 1)
        if limits is not None:
            check_limits(limits)
        return self._iter_propagate(frames, prompts, direction, start, stop, limits,
                                    score_threshold, stop_after)

    def _iter_propagate(self, frames, prompts, direction, start, stop, limits,
                        score_threshold, stop_after):
        from .propagation import stack_limits

        plane = frames.shape[:2]
        limits = stack_limits(frames, limits)
        grid = TileGrid(plane, self.tile_size, self.overlap)
        groups: dict[Tile, list[int]] = {}
        for obj_id in sorted({i for objs in prompts.values() for i in objs}):
            boxes = [prompt_bbox(objs[obj_id]) for objs in prompts.values() if obj_id in objs]
            bbox = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                    max(b[2] for b in boxes), max(b[3] for b in boxes))
            groups.setdefault(grid.route(bbox), []).append(obj_id)
        engine = self.video_tracker()
        for tile, ids in groups.items():
            sub = {k: {i: p for i, p in objs.items() if i in ids} for k, objs in prompts.items()}
            yield from engine.run(frames, {k: v for k, v in sub.items() if v}, tile=tile,
                                  padded_shape=grid.padded_shape(tile), limits=limits,
                                  direction=direction, start=start, stop=stop,
                                  score_threshold=score_threshold, stop_after=stop_after)

    def propagate(self, stack, prompts_by_slice, axis: int = 0, direction: str = DEFAULT_DIRECTION,
                  start: int | None = None, stop: int | None = None, *, out=None,
                  max_hole_area: int = DEFAULTS.max_hole_area,
                  max_sprinkle_area: int = DEFAULTS.max_sprinkle_area, **kwargs) -> np.ndarray:
        """Labels of the tracked objects, (depth, Y, X) int32 along ``axis``.

        ``out``: an existing (depth, Y, X) array (NumPy or Zarr) to update: only the
        slices propagation reaches are written, each slice whole, and pixels of other
        ids are kept. Other keywords as in :meth:`iter_propagate`.
        """
        from .propagation import StackFrames

        frames = StackFrames(stack, axis, kwargs.get("fixed"))
        shape = (len(frames),) + tuple(frames.shape[:2])
        if out is not None:
            labels_shape("out", out, shape)
        cleanup_areas(max_hole_area, max_sprinkle_area)
        results = self.iter_propagate(stack, prompts_by_slice, axis, direction, start, stop,
                                      **kwargs)
        if out is None:
            out = np.zeros(shape, dtype=np.int32)
        for result in results:
            write_slice(out, result, max_hole_area, max_sprinkle_area)
        return out

    # -- everything at once -----------------------------------------------------------------
    def segment_concept(self, image, text=None, exemplars=None, threshold=0.5, **options):
        """int32 labels of every instance of a concept: a noun phrase (``text``) and/or
        exemplar boxes (row0, col0, row1, col1); see :mod:`napari_sam3.concept`."""
        from .concept import segment_concept

        return segment_concept(self, image, text, exemplars, threshold, **options)

    def segment_everything(self, image, **options):
        """int32 labels of every object, from a grid of point prompts per tile; see
        :mod:`napari_sam3.everything`."""
        from .everything import segment_everything

        return segment_everything(self, image, **options)

    # -- one call ---------------------------------------------------------------------------
    def segment(self, image, prompts: Sequence[ObjectPrompt], *,
                max_hole_area: int = DEFAULTS.max_hole_area,
                max_sprinkle_area: int = DEFAULTS.max_sprinkle_area,
                limits=None, ids=None, out=None) -> np.ndarray:
        """Labels for ``prompts`` on ``image``: int32, 0 background, object i -> id i+1
        (or ``ids[i]``).

        ``image`` is (H, W) or (H, W, C), NumPy or lazy (Zarr, dask). Repeated calls on
        the same image reuse its embeddings. Overlaps go to the object with the highest
        mask logit. ``out``: an existing (H, W) array (e.g. Zarr) to write into, region
        by region, instead of allocating the whole label image.

        Objects are decoded tile by tile and merged as they come (a running best-logit
        map, see :func:`postprocess.paste_objects`), so memory is bounded by a tile and a
        decoder batch, not by the number of objects; the labels of a tile are written
        once no later tile overlaps them (an error midway leaves those in ``out``).
        """
        shape = tuple(image.shape[:2])
        prompts, ids = _checked_objects(prompts, shape, ids, out, max_hole_area, max_sprinkle_area)
        objects = self._paste_stream(image, prompts, limits) if prompts else []
        if out is None:
            out = np.zeros(shape, dtype=np.int32)
        paste_objects(out, objects, ids,
                      max_hole_area=max_hole_area, max_sprinkle_area=max_sprinkle_area)
        return out

    def _paste_stream(self, image, prompts, limits):
        """What :func:`paste_objects` takes from :meth:`segment`: ``(region, logits, i)``
        per object, cropped, and after each tile a :class:`Flush` of what is final."""
        for later, objects in self._objects_by_tile(image, prompts, limits, crop=True):
            for i, obj in objects:
                yield obj.region, obj.logits, i
            yield Flush(later)


_checked_objects = checked_objects  # its old name (replay)


def _limits_meta(limits):
    return None if limits is None else np.asarray(limits, dtype=float).tolist()


__all__ = ["Sam3Segmenter", "ImageEmbedding", "MaskPrediction", "ObjectMask", "PromptError"]
