"""Segment everything: automatic instance segmentation with a grid of point prompts.

The recipe of transformers' ``mask-generation`` pipeline (SAM's automatic mask
generator), run tile by tile on a :class:`~napari_sam3.segmenter.Sam3Segmenter`:

1. each tile's image embedding comes from the segmenter, i.e. from its memory and
   Zarr caches (the same embeddings that point and box prompts use), and is only
   computed when missing;
2. a ``points_per_side`` x ``points_per_side`` grid of single positive points is
   placed on the tile (on its image part, not on the zero padding) and decoded
   ``points_per_batch`` points at a time, three masks per point;
3. masks are kept when their predicted IoU is above ``pred_iou_thresh`` and their
   stability score (IoU of the mask thresholded at ``mask_threshold`` +- ``offset``)
   above ``stability_score_thresh``; within a tile, duplicates are removed by box
   NMS (``box_nms_thresh``, torchvision's ``batched_nms`` as in the pipeline);
4. tiles are merged by :func:`napari_sam3.instances.merge_tiles` (seam-aware: an
   object is taken from the tile that holds it whole, farthest from a seam);
5. masks are cleaned (small holes filled, specks removed), objects smaller than
   ``min_area`` pixels dropped, and the rest written as instance labels in order of
   decreasing predicted IoU, never over existing labels unless ``overwrite``.

On one tile, with ``min_area=0``, no clean-up and ``max_area_fraction=None``, the
masks and scores equal the pipeline's (tests check this), except that empty masks
are dropped and the no-memory embedding is added as the segmenter does.

torch is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .instances import (
    Instance,
    InstanceResult,
    Painted,
    clean_instances,
    merge_tiles,
    next_label,
    paint_in_sequence,
    paint_labels,
)
from .planes import plane_of
from .postprocess import DEFAULTS as CLEANUP
from .prompts import rowcol_to_xy

# A prompt every 4 pixels of a 1008 px tile (65,536 per tile, hours of decoding per tile on
# a CPU): denser grids find nothing new. Larger values are refused up front, before any
# grid is built (100,000 per side would allocate tens of GB for the grid alone).
MAX_POINTS_PER_SIDE = 256


@dataclass(frozen=True)
class EverythingSettings:
    """Settings of automatic mask generation; defaults suit microscopy on 1008 px tiles.

    ``points_per_side`` points per tile side (32: one prompt every ~31 px on a SAM3
    tile; raise it for small, dense cells). ``min_area``: objects smaller than this
    (pixels) are dropped. ``max_area_fraction``: masks covering more than this
    fraction of a tile are dropped before NMS (SAM often offers "the background" as
    a mask); None keeps them. ``points_per_side`` is at most ``MAX_POINTS_PER_SIDE``
    (256).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    min_area: int = 25
    max_area_fraction: float | None = 0.5
    max_hole_area: int = CLEANUP.max_hole_area
    max_sprinkle_area: int = CLEANUP.max_sprinkle_area
    match_iou: float = 0.5

    def __post_init__(self):
        if self.points_per_side < 1:
            raise ValueError("points_per_side must be at least 1")
        if self.points_per_side > MAX_POINTS_PER_SIDE:
            raise ValueError(
                f"points_per_side must be at most {MAX_POINTS_PER_SIDE} (a point every 4 px "
                f"of a 1008 px tile), got {self.points_per_side}")
        if self.points_per_batch < 1:
            raise ValueError("points_per_batch must be at least 1")


SETTINGS = EverythingSettings()
FEATURE_KEYS = ("iou_score", "stability_score")


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float32 fractions (row, col) of a tile, cell centres, row by row.

    Built exactly as transformers' ``_build_point_grid`` (same float32 values and
    order), so one tile matches the pipeline bit for bit.
    """
    import torch

    offset = 1 / (2 * n_per_side)
    side = torch.linspace(offset, 1 - offset, n_per_side)
    cols = torch.tile(side[None, :], (n_per_side, 1))
    rows = torch.tile(side[:, None], (1, n_per_side))
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).numpy()


def _grid_points(n_per_side: int, shape) -> np.ndarray:
    """The grid in pixels (row, col) of an image part of ``shape``, float32 like the pipeline."""
    import torch

    frac = torch.from_numpy(point_grid(n_per_side))
    return (frac * torch.tensor([int(shape[0]), int(shape[1])])).numpy()


def decode_tile(segmenter, embedding, model_shape, valid_shape, settings: EverythingSettings,
                *, offset=(0, 0), tile: int = 0, progress: Callable | None = None
                ) -> list[Instance]:
    """Every mask the point grid finds in one encoded tile, after filtering and box NMS.

    ``model_shape``: the (H, W) handed to the model (the padded tile); ``valid_shape``:
    its image part (top-left), where points go and masks are kept. Instances are in
    image coordinates (``offset`` = the tile's origin), in NMS order.
    """
    import torch
    from torchvision.ops import batched_nms

    s = settings
    model, proc = segmenter.model, segmenter.processor
    h, w = (int(v) for v in valid_shape)
    big, bw = (int(v) for v in model_shape)
    points = _grid_points(s.points_per_side, (h, w))
    max_area = None if s.max_area_fraction is None else s.max_area_fraction * h * w
    found: list[Instance] = []
    starts = range(0, len(points), s.points_per_batch)
    for b, start in enumerate(starts):
        batch = points[start:start + s.points_per_batch]
        # original sizes as Python ints (return_tensors=None): the processor then scales
        # the points in double precision, exactly as the pipeline does
        enc = proc(original_sizes=[[big, bw]], input_points=[[[xy] for xy in rowcol_to_xy(batch)]],
                   input_labels=[[[1] for _ in range(len(batch))]], return_tensors=None)
        with torch.inference_mode():
            out = model(image_embeddings=embedding.features,
                        input_points=enc["input_points"].to(segmenter.device, segmenter.dtype),
                        input_labels=enc["input_labels"].to(segmenter.device),
                        multimask_output=True)
            low = out.pred_masks[0].flatten(0, 1).float()  # (P*3, m, m), point-major
            ious = out.iou_scores[0].flatten(0, 1).float()
            cand = torch.arange(len(ious), device=ious.device)
            if s.pred_iou_thresh > 0.0:  # before upsampling: same result, far less work
                cand = cand[ious > s.pred_iou_thresh]
            for chunk in cand.split(16):
                found += _filter_chunk(proc, low[chunk], ious[chunk], (big, bw), (h, w), s,
                                       offset, tile, max_area)
        if progress is not None:
            progress(b + 1, len(starts))
    if not found:
        return []
    boxes = torch.tensor([_xyxy_inclusive(x) for x in found], dtype=torch.float32)
    scores = torch.tensor([x.score for x in found], dtype=torch.float32)
    keep = batched_nms(boxes, scores, torch.zeros(len(found), dtype=torch.int64),
                       s.box_nms_thresh)
    return [found[i] for i in keep.tolist()]


def _filter_chunk(proc, low, ious, model_shape, valid_shape, s, offset, tile, max_area):
    import torch

    h, w = valid_shape
    # upsampled on the model's device (as the pipeline does), cut to the tile's image part
    up = proc.post_process_masks([low[:, None]], [list(model_shape)], binarize=False)[0]
    up = up[:, 0, :h, :w]
    ious = ious.cpu()
    keep = torch.ones(len(up), dtype=torch.bool)
    inter = (up > s.mask_threshold + s.stability_score_offset).flatten(1).sum(1)
    union = (up > s.mask_threshold - s.stability_score_offset).flatten(1).sum(1)
    stability = torch.nan_to_num(inter / union).cpu()  # 0/0 (nothing above the low cut): 0
    if s.stability_score_thresh > 0.0:
        keep &= stability > s.stability_score_thresh
    binary = (up > s.mask_threshold).cpu().numpy()
    out = []
    for i in torch.nonzero(keep).flatten().tolist():
        inst = Instance.from_mask(binary[i], float(ious[i]), offset, tile,
                                  iou_score=float(ious[i]), stability_score=float(stability[i]))
        if inst is None:  # empty mask (the pipeline keeps it with a zero box)
            continue
        if max_area is not None and inst.area > max_area:
            continue
        out.append(inst)
    return out


def _xyxy_inclusive(inst: Instance) -> list[float]:
    """The pipeline's box convention: (x0, y0, x1, y1) of the first and last mask pixels."""
    r0, c0, r1, c1 = inst.bbox
    return [c0, r0, c1 - 1, r1 - 1]


@dataclass
class EverythingResult(InstanceResult):
    """Instances of one 2D image; :meth:`paint` writes them (cheap, no model)."""

    shape: tuple[int, int]
    instances: list[Instance]  # merged across tiles and cleaned, by decreasing score
    settings: EverythingSettings
    painted: Painted | None = field(default=None, repr=False)
    skipped: list = field(default_factory=list)  # boxes of tiles skipped as empty
    feature_keys: ClassVar[tuple[str, ...]] = FEATURE_KEYS
    min_score: ClassVar[float] = 0.0  # every instance is painted

    @property
    def items(self) -> list[Instance]:
        return self.instances

    def paint(self, out=None, *, threshold: float | None = None, overwrite: bool = False,
              start_id: int | None = None, min_area: int | None = None) -> np.ndarray:
        """int32 instance labels (ids by decreasing predicted IoU); see ``paint_labels``.
        ``threshold`` is not used (every instance is painted); ``min_area`` defaults to
        the settings'. Updates :attr:`features` (index, score, area, iou/stability)."""
        min_area = self.settings.min_area if min_area is None else min_area
        out, self.painted = paint_labels(self.instances, self.shape, out, overwrite=overwrite,
                                         start_id=start_id, min_area=min_area)
        return out



def _settings(settings: EverythingSettings | None, overrides: dict) -> EverythingSettings:
    base = settings or SETTINGS
    if not overrides:
        return base
    unknown = set(overrides) - set(EverythingSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return EverythingSettings(**{**base.__dict__, **overrides})


def tile_instances(segmenter, image, grid, k: int, limits, settings: EverythingSettings, *,
                   progress: Callable | None = None, skip=None) -> list[Instance] | None:
    """Every instance the point grid finds in tile ``k`` of ``grid`` (the whole image,
    resized to the model input, when the grid is one tile), or None when ``skip`` (an
    ``EmptyTiles``) finds the tile empty. The same step in this process and on workers."""
    tile = grid.tiles[k]
    if skip is not None and skip.empty(image, grid, tile, limits):
        return None
    if grid.single:
        shape = tuple(int(v) for v in image.shape[:2])
        emb, model_shape, valid, origin = segmenter.encode(image, limits), shape, shape, (0, 0)
    else:
        emb = segmenter.encode_tile(image, grid, tile, limits)
        model_shape, valid, origin = grid.padded_shape(tile), tile.shape, (tile.r0, tile.c0)
    return decode_tile(segmenter, emb, model_shape, valid, settings, offset=origin, tile=k,
                       progress=progress)


def generate_everything(segmenter, image, *, settings: EverythingSettings | None = None,
                        limits=None, progress: Callable | None = None, client=None,
                        skip=None, **overrides) -> EverythingResult:
    """Find every object in a 2D image ((H, W) or (H, W, C); NumPy, Zarr or dask).

    Settings: an :class:`EverythingSettings` and/or its fields as keywords.
    ``progress(done, total)`` is called after each batch of points (raise from it to
    stop). Tiles already in the segmenter's caches are not encoded again.
    ``client``: a ``distributed.Client``: tiles run on its workers, merged here (the
    same labels as in this process at the same thread count); ``skip``: an
    ``EmptyTiles`` rule (skipped tiles are listed in the result's ``skipped``).
    """
    s = _settings(settings, overrides)
    shape = tuple(int(v) for v in image.shape[:2])
    grid = segmenter.tiles(image)
    if not grid.single:
        limits = segmenter.resolve_limits(image, limits)
    if client is not None:
        from .distributed.run import everything_instances

        found, skipped = everything_instances(client, segmenter, image, grid, limits, s,
                                              progress, skip)
    else:
        found, skipped = _serial_instances(segmenter, image, grid, limits, s, progress, skip)
    merged = merge_tiles(found, grid, match_iou=s.match_iou)
    cleaned = clean_instances(merged, s.min_area, s.max_hole_area, s.max_sprinkle_area)
    return EverythingResult(shape, cleaned, s, skipped=skipped)


def _serial_instances(segmenter, image, grid, limits, s, progress, skip):
    n_batches = -(-s.points_per_side ** 2 // s.points_per_batch)
    total = len(grid) * n_batches
    found: list[Instance] = []
    skipped = []
    for k, tile in enumerate(grid.tiles):
        done = k * n_batches
        report = None if progress is None else (lambda i, _n, d=done: progress(d + i, total))
        part = tile_instances(segmenter, image, grid, k, limits, s, progress=report, skip=skip)
        if part is None:
            skipped.append((tile.r0, tile.c0, tile.r1, tile.c1))
        else:
            found += part
    return found, skipped


def segment_everything(segmenter, image, *, settings: EverythingSettings | None = None,
                       limits=None, out=None, overwrite: bool = False, rgb: bool | None = None,
                       progress: Callable | None = None, client=None, skip=None,
                       **overrides) -> np.ndarray:
    """int32 instance labels of every object found in ``image`` (0: background).

    ``image``: (H, W), (H, W, C) with C <= 4, or a stack (Z, H, W[, C]) segmented slice
    by slice (ids unique across slices). ``rgb`` says whether the last axis is
    channels (default: the package's rule, see :mod:`napari_sam3.normalize`).
    ``out``: existing labels to add to (kept unless ``overwrite``; new ids above its
    maximum). ``client``, ``skip``: see :func:`generate_everything`. Keyword settings as
    in :class:`EverythingSettings`.
    """
    if is_stack(image, rgb):
        lim = stack_limits(image, limits, rgb)

        def detect(plane) -> EverythingResult:
            return generate_everything(segmenter, plane, settings=settings, limits=lim,
                                       progress=progress, client=client, skip=skip,
                                       **overrides)

        return segment_stack(detect, image, out, overwrite=overwrite)
    res = generate_everything(segmenter, image, settings=settings, limits=limits,
                              progress=progress, client=client, skip=skip, **overrides)
    return res.paint(out, overwrite=overwrite)


# -- stacks (shared with concept.py) ----------------------------------------------------------
def is_stack(image, rgb: bool | None = None) -> bool:
    """True for (Z, H, W) and (Z, H, W, C) data, False for one (H, W) or (H, W, C) image.

    ``rgb``: whether the last axis holds channels; None applies the package's rule
    (a last axis of 2 to 4 is channels, see :mod:`napari_sam3.normalize`).
    """
    shape = tuple(image.shape)
    if len(shape) == 2:
        return False
    if len(shape) == 3:
        channels = shape[-1] in (2, 3, 4) if rgb is None else bool(rgb)
        return not channels
    if len(shape) == 4:
        return True
    raise ValueError(f"expected a 2D image or a stack of them, got shape {shape}")


def stack_limits(stack, limits=None, rgb: bool | None = None):
    """One set of intensity limits for every slice of a (Z, Y, X[, C]) stack: the same
    rule as propagation and precompute (:func:`napari_sam3.propagation.stack_limits`),
    so all modes share cache entries."""
    from .propagation import StackFrames
    from .propagation import stack_limits as limits_of_frames

    if rgb is None:  # (Z, Y, X, C) with 2-4 channels
        rgb = len(stack.shape) == 4 and stack.shape[-1] in (2, 3, 4)
    return limits_of_frames(StackFrames(stack, axis=0, rgb=rgb), limits)


def segment_stack(detect: Callable[[object], InstanceResult], stack, out=None, *,
                  overwrite: bool = False) -> np.ndarray:
    """Labels of ``detect(plane)`` for each plane along axis 0 of ``stack`` (a lazy
    ``planes.PlaneView``), painted slice by slice into ``out`` (default: new int32 zeros).

    New ids are unique across the stack: they start above every label already in ``out``
    and continue from slice to slice (:func:`instances.paint_in_sequence`).
    """
    shape = tuple(int(v) for v in stack.shape[:3])
    if out is None:
        out = np.zeros(shape, dtype=np.int32)
    elif tuple(out.shape[:3]) != shape:
        raise ValueError(f"labels of shape {tuple(out.shape)} do not fit the stack {shape}")
    next_id = next_label(out)
    for z in range(shape[0]):
        labels = np.array(out[z])  # the slice in memory, written back whole
        next_id = paint_in_sequence([(detect(plane_of(stack, (z,))), labels)],
                                    start_id=next_id, overwrite=overwrite)
        out[z] = labels
    return out


__all__ = ["EverythingSettings", "EverythingResult", "SETTINGS", "MAX_POINTS_PER_SIDE",
           "point_grid", "decode_tile", "tile_instances", "generate_everything", "segment_everything", "is_stack",
           "stack_limits", "segment_stack"]
