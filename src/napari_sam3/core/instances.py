"""Instances found tile by tile, merged into one instance label image (NumPy only).

Used by automatic mask generation (:mod:`napari_sam3.everything`) and concept
segmentation (:mod:`napari_sam3.concept`). An :class:`Instance` is a boolean mask
cropped to its bounding box, an offset into the image, a score and the tile that
produced it.

Merging across tiles (:func:`merge_tiles`) is seam-aware. A tile *seam* is an edge
of a tile shared with a neighbouring tile (image borders are not seams). An
instance whose mask reaches a seam of its tile may be cut there; one that does
not is *whole*. Two instances from different tiles are the same object when their
masks agree (IoU above ``match_iou``) inside the area both tiles see. Then:

* whole beats cut: a cut copy of an object that a neighbouring tile holds whole
  is dropped;
* between two whole copies, the one from the tile where it lies farthest from a
  seam is kept (it saw the most context);
* two cut pieces of an object too large for the overlap (no tile holds it whole)
  are stitched into one instance (their union).

Within one tile nothing is merged here (the caller runs its own NMS, if any).

Writing (:func:`paint_labels`) goes in order of decreasing score: instance k gets
id ``start_id + k``, a pixel claimed by several instances goes to the highest
score, labels already in ``out`` are kept unless ``overwrite``, and an instance
left with fewer than ``min_area`` visible pixels is not written (ids stay
consecutive).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .postprocess import clean_mask

Box = tuple[int, int, int, int]  # (row0, col0, row1, col1), end exclusive


@dataclass
class Instance:
    """One object: ``mask`` (bool, cropped to its bounding box) placed at ``offset``."""

    mask: np.ndarray
    offset: tuple[int, int]
    score: float
    tile: int = 0  # index of the producing tile in ``TileGrid.tiles`` (0 when untiled)
    extra: dict = field(default_factory=dict)  # e.g. iou_score, stability_score

    @classmethod
    def from_mask(cls, mask: np.ndarray, score: float, offset=(0, 0), tile: int = 0,
                  **extra) -> Instance | None:
        """Crop a full (tile- or image-sized) mask to its bounding box; None if empty."""
        mask = np.asarray(mask, dtype=bool)
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(np.ascontiguousarray(mask[r0:r1, c0:c1]),
                   (int(offset[0] + r0), int(offset[1] + c0)), float(score), int(tile), extra)

    @property
    def bbox(self) -> Box:
        r, c = self.offset
        h, w = self.mask.shape
        return r, c, r + h, c + w

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def slices(self) -> tuple[slice, slice]:
        r0, c0, r1, c1 = self.bbox
        return slice(r0, r1), slice(c0, c1)

    def crop(self, box: Box) -> np.ndarray:
        """The mask over ``box`` (image coordinates), False outside the instance."""
        r0, c0, r1, c1 = box
        out = np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), dtype=bool)
        b = intersect(self.bbox, box)
        if b is None:
            return out
        a0, b0, a1, b1 = b
        out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = self.mask[
            a0 - self.offset[0]:a1 - self.offset[0], b0 - self.offset[1]:b1 - self.offset[1]]
        return out

    def full(self, shape) -> np.ndarray:
        """The mask as a full boolean array of ``shape``."""
        return self.crop((0, 0, int(shape[0]), int(shape[1])))


# -- geometry ---------------------------------------------------------------------------------
def intersect(a: Box, b: Box) -> Box | None:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    return (r0, c0, r1, c1) if r0 < r1 and c0 < c1 else None


def union_box(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def box_iou(a: Box, b: Box) -> float:
    """IoU of two (row0, col0, row1, col1) boxes with exclusive ends."""
    i = intersect(a, b)
    if i is None:
        return 0.0
    inter = (i[2] - i[0]) * (i[3] - i[1])
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def mask_iou(a: Instance, b: Instance, region: Box | None = None) -> float:
    """IoU of two instances' masks, counting only pixels inside ``region`` if given."""
    box = union_box(a.bbox, b.bbox)
    if region is not None:
        box = intersect(box, region)
        if box is None:
            return 0.0
    ma, mb = a.crop(box), b.crop(box)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def nms(instances: Sequence[Instance], iou_threshold: float, by: str = "mask"
        ) -> list[Instance]:
    """Greedy non-maximum suppression in order of decreasing score.

    An instance is dropped when its IoU (``by`` = "mask" or "box") with a kept,
    higher-scoring one is above ``iou_threshold``.
    """
    order = sorted(instances, key=lambda x: -x.score)
    kept: list[Instance] = []
    for inst in order:
        for k in kept:
            if intersect(inst.bbox, k.bbox) is None:
                continue
            iou = mask_iou(inst, k) if by == "mask" else box_iou(inst.bbox, k.bbox)
            if iou > iou_threshold:
                break
        else:
            kept.append(inst)
    return kept


# -- seams ------------------------------------------------------------------------------------
def tile_box(tile) -> Box:
    return tile.r0, tile.c0, tile.r1, tile.c1


def seam_sides(tile, image_shape) -> tuple[bool, bool, bool, bool]:
    """Which edges of ``tile`` (top, left, bottom, right) are seams with a neighbour."""
    h, w = image_shape[:2]
    return tile.r0 > 0, tile.c0 > 0, tile.r1 < h, tile.c1 < w


def touches_seam(inst: Instance, tile, image_shape, tol: int = 1) -> bool:
    """True when ``inst`` reaches within ``tol`` pixels of a seam of ``tile``."""
    r0, c0, r1, c1 = inst.bbox
    top, left, bottom, right = seam_sides(tile, image_shape)
    return ((top and r0 <= tile.r0 + tol) or (left and c0 <= tile.c0 + tol)
            or (bottom and r1 >= tile.r1 - tol) or (right and c1 >= tile.c1 - tol))


def seam_margin(inst: Instance, tile, image_shape) -> float:
    """Distance in pixels from ``inst`` to the nearest seam of ``tile`` (inf: no seams)."""
    r0, c0, r1, c1 = inst.bbox
    top, left, bottom, right = seam_sides(tile, image_shape)
    sides = [d for d, s in ((r0 - tile.r0, top), (c0 - tile.c0, left),
                            (tile.r1 - r1, bottom), (tile.c1 - c1, right)) if s]
    return float(min(sides)) if sides else float("inf")


def _same_object(a: Instance, b: Instance, tiles, match_iou: float) -> bool:
    """Copies of one object: masks agree inside the area both producing tiles see."""
    if a.tile == b.tile or intersect(a.bbox, b.bbox) is None:
        return False
    shared = intersect(tile_box(tiles[a.tile]), tile_box(tiles[b.tile]))
    return shared is not None and mask_iou(a, b, shared) > match_iou


def merge_tiles(instances: Iterable[Instance], grid, match_iou: float = 0.5,
                seam_tol: int = 1) -> list[Instance]:
    """Merge per-tile instances of one image into one set without duplicates or cut objects.

    ``grid`` is the :class:`~napari_sam3.tiling.TileGrid` whose tile indices the
    instances carry. See the module docstring for the rules. In three steps:

    1. whole instances, by decreasing distance to a seam: a copy of a kept one from
       another tile is dropped;
    2. cut instances that are copies of a kept whole one are dropped;
    3. the remaining cut pieces that are copies of each other are grouped (strongest
       agreement first, at most one piece per tile in a group) and each group becomes
       one instance, the union of its pieces (``extra["tiles"]`` lists their tiles).

    Returns the merged instances in order of decreasing score.
    """
    instances = list(instances)
    if len(grid) <= 1:
        return sorted(instances, key=lambda x: -x.score)
    shape, tiles = grid.shape, grid.tiles
    cell = max(16, grid.overlap or grid.tile_size // 4)
    whole, cut = [], []
    for x in instances:
        (cut if touches_seam(x, tiles[x.tile], shape, seam_tol) else whole).append(x)
    whole.sort(key=lambda x: (-seam_margin(x, tiles[x.tile], shape), -x.score))
    kept: list[Instance] = []
    index = _SpatialIndex(cell)
    for x in whole:
        if not any(_same_object(x, kept[k], tiles, match_iou) for k in index.near(x.bbox)):
            index.add(len(kept), x.bbox)
            kept.append(x)
    pieces = [x for x in cut
              if not any(_same_object(x, kept[k], tiles, match_iou) for k in index.near(x.bbox))]
    return sorted(kept + _stitch(pieces, tiles, match_iou, cell), key=lambda x: -x.score)


def _stitch(pieces: list[Instance], tiles, match_iou: float, cell: int) -> list[Instance]:
    """Group cut pieces that are copies of each other (one per tile) and unite each group."""
    index = _SpatialIndex(cell)
    for i, x in enumerate(pieces):
        index.add(i, x.bbox)
    edges = []
    for i, x in enumerate(pieces):
        for j in index.near(x.bbox):
            if j > i and _same_object(x, pieces[j], tiles, match_iou):
                shared = intersect(tile_box(tiles[x.tile]), tile_box(tiles[pieces[j].tile]))
                edges.append((-mask_iou(x, pieces[j], shared), i, j))
    parent = list(range(len(pieces)))
    members = {i: {pieces[i].tile} for i in range(len(pieces))}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, i, j in sorted(edges):
        ri, rj = root(i), root(j)
        if ri != rj and not members[ri] & members[rj]:
            parent[rj] = ri
            members[ri] |= members.pop(rj)
    groups: dict[int, list[Instance]] = {}
    for i, x in enumerate(pieces):
        groups.setdefault(root(i), []).append(x)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        box = group[0].bbox
        for x in group[1:]:
            box = union_box(box, x.bbox)
        mask = np.zeros((box[2] - box[0], box[3] - box[1]), dtype=bool)
        for x in group:
            mask |= x.crop(box)
        best = max(group, key=lambda x: x.score)
        out.append(Instance(mask, (box[0], box[1]), best.score, best.tile,
                            {**best.extra, "stitched": True,
                             "tiles": tuple(sorted(x.tile for x in group))}))
    return out


class _SpatialIndex:
    """Buckets of bounding boxes on a coarse grid, to find overlapping candidates fast."""

    def __init__(self, cell: int):
        self.cell = int(cell)
        self.buckets: dict[tuple[int, int], list[int]] = {}

    def _cells(self, box: Box):
        r0, c0, r1, c1 = box
        s = self.cell
        for i in range(r0 // s, (r1 - 1) // s + 1):
            for j in range(c0 // s, (c1 - 1) // s + 1):
                yield i, j

    def add(self, key: int, box: Box) -> None:
        for cell in self._cells(box):
            bucket = self.buckets.setdefault(cell, [])
            if key not in bucket:
                bucket.append(key)

    def near(self, box: Box) -> list[int]:
        found: set[int] = set()
        for cell in self._cells(box):
            found.update(self.buckets.get(cell, ()))
        return sorted(found)


# -- clean-up and writing ---------------------------------------------------------------------
def clean_instances(instances: Iterable[Instance], min_area: int = 0, max_hole_area: int = 0,
                    max_sprinkle_area: int = 0) -> list[Instance]:
    """Fill small holes, remove small islands, then drop instances under ``min_area`` pixels."""
    out = []
    for inst in instances:
        if max_hole_area > 0 or max_sprinkle_area > 0:
            cleaned = Instance.from_mask(clean_mask(inst.mask, max_hole_area, max_sprinkle_area),
                                         inst.score, inst.offset, inst.tile, **inst.extra)
            if cleaned is None:
                continue
            inst = cleaned
        if inst.area >= max(min_area, 1):
            out.append(inst)
    return out


def next_label(out) -> int:
    """One above the largest label in ``out`` (NumPy, Zarr or dask), 1 for an empty array."""
    arr = np.asarray(out)
    return int(arr.max()) + 1 if arr.size else 1


@dataclass
class Painted:
    """What :func:`paint_labels` wrote: label ids and the instances behind them."""

    ids: list[int]
    instances: list[Instance]
    areas: list[int]

    def features(self, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """A napari features table: ``index`` (label id), ``score``, ``area`` and ``keys``
        taken from each instance's ``extra``."""
        table = {"index": np.asarray(self.ids, dtype=np.int64),
                 "score": np.asarray([x.score for x in self.instances], dtype=np.float32),
                 "area": np.asarray(self.areas, dtype=np.int64)}
        for k in keys:
            table[k] = np.asarray([x.extra.get(k, np.nan) for x in self.instances],
                                  dtype=np.float32)
        return table


def paint_labels(instances: Iterable[Instance], shape=None, out=None, *, overwrite: bool = False,
                 start_id: int | None = None, min_area: int = 0) -> tuple[np.ndarray, Painted]:
    """Write instances into an int32 label image in order of decreasing score.

    ``out``: an existing (H, W) label array (NumPy or Zarr) to write into, window by
    window; otherwise a new zero array of ``shape``. Existing labels are kept unless
    ``overwrite``; new ids start at ``start_id`` (default: one above the largest label
    in ``out``, so they never collide with existing objects). Pixels claimed by several
    new instances go to the highest score. Instances with fewer than ``min_area``
    visible pixels are skipped.
    """
    if out is None:
        if shape is None:
            raise ValueError("give the label image shape or an array to write into")
        out = np.zeros(tuple(shape[:2]), dtype=np.int32)
        first = 1 if start_id is None else int(start_id)
    else:
        first = next_label(out) if start_id is None else int(start_id)
    if first < 1:
        raise ValueError("label ids start at 1")
    h, w = out.shape[:2]
    ordered = sorted(instances, key=lambda x: -x.score)
    painted = Painted([], [], [])
    next_id = first
    for inst in ordered:
        box = intersect(inst.bbox, (0, 0, h, w))
        if box is None:
            continue
        window = (slice(box[0], box[2]), slice(box[1], box[3]))
        current = np.asarray(out[window])
        mask = inst.crop(box)
        # free pixels: background, or (overwrite) anything but a new, higher-scoring instance
        writable = mask & ((current < first) if overwrite else (current == 0))
        area = int(np.count_nonzero(writable))
        if area == 0 or area < min_area:
            continue
        current = current.copy()
        current[writable] = next_id
        out[window] = current
        painted.ids.append(next_id)
        painted.instances.append(inst)
        painted.areas.append(area)
        next_id += 1
    return out, painted


# -- results of concept detection and segment-everything --------------------------------------
class InstanceResult:
    """What a concept result and a segment-everything result share: the instances of one
    2D image, painted into labels on demand (no model call).

    ``items``: every instance that can be painted (a concept's candidates above its
    ``min_score``, everything's instances); ``min_score``: the lowest score kept (0.0 for
    everything); ``painted``: what the last :meth:`paint` wrote; ``features``: its napari
    features table (painting first if nothing was painted yet).
    """

    feature_keys: tuple[str, ...] = ()  # columns of ``features`` from each instance's extra
    painted: Painted | None
    min_score: float

    @property
    def items(self) -> list[Instance]:
        raise NotImplementedError

    def paint(self, out=None, *, threshold: float | None = None, overwrite: bool = False,
              start_id: int | None = None) -> np.ndarray:
        """int32 labels of the instances (above ``threshold``, for a concept), by
        decreasing score; ``out``, ``overwrite``, ``start_id`` as in :func:`paint_labels`."""
        raise NotImplementedError

    @property
    def features(self) -> dict[str, np.ndarray]:
        """napari features of the last :meth:`paint`: index, score, area and the result's
        own columns."""
        if self.painted is None:
            self.paint()
        return self.painted.features(self.feature_keys)


def paint_in_sequence(pairs: Iterable[tuple[InstanceResult, object]], *, start_id: int,
                      overwrite: bool = False, threshold: float | None = None) -> int:
    """Paint each ``(result, out)`` pair in turn with ids continuing across them: the
    first pair's new ids start at ``start_id``, each next one's above the last id painted
    before it. Returns the next free id (``start_id`` when nothing was painted).

    ``out``: the labels of that result's plane (NumPy, Zarr, ``planes.OffsetView``),
    written in place; ``overwrite``, ``threshold`` as in :meth:`InstanceResult.paint`.
    ``pairs`` may be a generator: each pair is painted before the next is drawn.
    """
    next_id = int(start_id)
    for result, out in pairs:
        result.paint(out, threshold=threshold, overwrite=overwrite, start_id=next_id)
        if result.painted.ids:
            next_id = result.painted.ids[-1] + 1
    return next_id


__all__ = ["Instance", "Painted", "box_iou", "mask_iou", "nms", "merge_tiles", "touches_seam",
           "seam_margin", "clean_instances", "paint_labels", "next_label", "InstanceResult",
           "paint_in_sequence"]
