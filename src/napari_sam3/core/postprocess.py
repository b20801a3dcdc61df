"""Mask clean-up and writing masks into label images (NumPy only).

Holes are background regions (4-connected) enclosed by the mask, i.e. not
touching the image border; islands are mask regions (8-connected). Areas are
in pixels and the bounds are inclusive: a hole of exactly ``max_hole_area``
pixels is filled, an island of exactly ``max_sprinkle_area`` pixels is removed.
The largest island is always kept, so a small object is never erased entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = ndi.generate_binary_structure(2, 2)


@dataclass(frozen=True)
class PostProcessing:
    """Settings shown in the widget and used by the API and CLI."""

    max_hole_area: int = 100
    max_sprinkle_area: int = 20


DEFAULTS = PostProcessing()


def _components(mask: np.ndarray, structure) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` as intp labels (so that ``bincount`` and ``take``
    need no cast) and their count."""
    return ndi.label(mask, structure=structure, output=np.intp)


def fill_holes(mask: np.ndarray, max_hole_area: int) -> np.ndarray:
    """Fill enclosed background regions of at most ``max_hole_area`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if max_hole_area <= 0 or mask.all() or not mask.any():
        return mask.copy()
    holes, n = _components(~mask, _FOUR)
    fill = np.bincount(holes.ravel(), minlength=n + 1) <= max_hole_area
    fill[0] = False
    for edge in (holes[0], holes[-1], holes[:, 0], holes[:, -1]):
        fill[edge] = False  # touches the border: not enclosed
    if not fill.any():
        return mask.copy()
    return mask | np.take(fill, holes)


def remove_islands(mask: np.ndarray, max_sprinkle_area: int) -> np.ndarray:
    """Remove mask regions of at most ``max_sprinkle_area`` pixels, keeping the largest."""
    mask = np.asarray(mask, dtype=bool)
    if max_sprinkle_area <= 0 or not mask.any():
        return mask.copy()
    islands, n = _components(mask, _EIGHT)
    areas = np.bincount(islands.ravel(), minlength=n + 1)
    areas[0] = 0
    keep = areas > max_sprinkle_area
    keep[int(np.argmax(areas))] = True
    keep[0] = False
    if keep[1:].all():
        return mask.copy()
    return np.take(keep, islands)


def clean_mask(mask: np.ndarray, max_hole_area: int = 0, max_sprinkle_area: int = 0) -> np.ndarray:
    """Fill small holes, then remove small islands.

    Works on the mask's bounding box plus a one-pixel margin (the same result as on
    the whole image, at the cost of the object's size rather than the image's).
    """
    mask = np.asarray(mask, dtype=bool)
    if (max_hole_area <= 0 and max_sprinkle_area <= 0) or not mask.any():
        return mask.copy()
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    out = np.zeros_like(mask)
    out[box] = remove_islands(fill_holes(mask[box], max_hole_area), max_sprinkle_area)
    return out


def masks_to_labels(
    logits: np.ndarray,
    ids=None,
    max_hole_area: int = 0,
    max_sprinkle_area: int = 0,
) -> np.ndarray:
    """(N, H, W) mask logits -> int32 labels; object i gets ``ids[i]`` (default i+1).

    A pixel belongs to the object with the highest logit among those above 0, so
    objects never overlap. Clean-up runs per object before the overlap is resolved.
    """
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.zeros(logits.shape[1:], dtype=np.int32)
    whole = tuple(slice(0, s) for s in labels.shape)
    paste_objects(labels, [(whole, lg) for lg in logits], ids, max_hole_area, max_sprinkle_area)
    return labels


Box = tuple[int, int, int, int]  # (row0, col0, row1, col1), end exclusive


def mask_box(mask: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of a 2D boolean mask as slices; (0:0, 0:0) when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


@dataclass(frozen=True)
class Flush:
    """An item of the stream that :func:`paste_objects` takes: every later object lies
    inside one of the ``pending`` boxes (row0, col0, row1, col1), so the labels
    anywhere else are final; they are written and their memory freed."""

    pending: tuple[Box, ...] = ()


class BestLogitMap:
    """Objects merged one at a time into labels, by the rule of :func:`paste_objects`.

    Holds, for every pixel some object's cleaned mask covers, the highest logit so far
    (float32) and the index of the object that has it (int32), in blocks of
    ``block`` x ``block`` pixels allocated where objects land. Memory is bounded by
    the area covered (8 bytes a pixel), never by the number of objects; :meth:`write`
    with ``pending`` frees the blocks that no later object can reach. An object that
    arrives while nothing else is held is kept as it is (its cleaned mask) until a
    second one comes: a single object (a click) is written without the blocks.
    """

    def __init__(self, out, ids=None, max_hole_area: int = 0, max_sprinkle_area: int = 0,
                 overwrite: bool = True, block: int = 256):
        self.out = out
        self.ids = None if ids is None else np.asarray([int(i) for i in ids], dtype=np.int64)
        self.cleanup = (max_hole_area, max_sprinkle_area)
        self.overwrite = overwrite
        self.block = int(block)
        self.shape = tuple(int(v) for v in out.shape[:2])
        self.blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.held: tuple | None = None  # (index, r0, c0, logits, mask) of a lone object

    def add(self, index: int, region, logits) -> None:
        """Object ``index`` (its place in the list: ids and ties) with ``logits`` over
        ``region`` (row slice, col slice) of the image; cleaned on its own box."""
        lg = np.asarray(logits, dtype=np.float32)
        fg = lg > 0
        box = mask_box(fg)
        lg = lg[box]
        if not lg.size:
            return
        # on the mask's own box: the same as on the whole region (see clean_mask)
        mask = remove_islands(fill_holes(fg[box], self.cleanup[0]), self.cleanup[1])
        r0 = (region[0].start or 0) + box[0].start
        c0 = (region[1].start or 0) + box[1].start
        if self.held is None and not self.blocks:
            self.held = (index, r0, c0, lg, mask)
            return
        self._release()
        self._merge(index, r0, c0, lg, mask)

    def _release(self) -> None:
        """The held object into the blocks (another object may overlap it)."""
        if self.held is not None:
            held, self.held = self.held, None
            self._merge(*held)

    def _merge(self, index: int, r0: int, c0: int, lg: np.ndarray, mask: np.ndarray) -> None:
        b = self.block
        for bi in range(r0 // b, (r0 + lg.shape[0] - 1) // b + 1):
            for bj in range(c0 // b, (c0 + lg.shape[1] - 1) // b + 1):
                rows = slice(max(r0, bi * b), min(r0 + lg.shape[0], (bi + 1) * b))
                cols = slice(max(c0, bj * b), min(c0 + lg.shape[1], (bj + 1) * b))
                mine = (slice(rows.start - r0, rows.stop - r0),
                        slice(cols.start - c0, cols.stop - c0))
                m = mask[mine]
                if not m.any():
                    continue
                fresh = (bi, bj) not in self.blocks
                best, owner = self._block(bi, bj)
                here = (slice(rows.start - bi * b, rows.stop - bi * b),
                        slice(cols.start - bj * b, cols.stop - bj * b))
                top, who, new = best[here], owner[here], lg[mine]
                # the highest logit wins; on a tie, the object first in the list
                take = m if fresh else m & ((who < 0) | (new > top)
                                            | ((new == top) & (index < who)))
                np.copyto(top, new, where=take)
                np.copyto(who, index, where=take)

    def _block(self, bi: int, bj: int):
        hit = self.blocks.get((bi, bj))
        if hit is None:
            b = self.block
            shape = (min(b, self.shape[0] - bi * b), min(b, self.shape[1] - bj * b))
            hit = (np.full(shape, -np.inf, dtype=np.float32), np.full(shape, -1, np.int32))
            self.blocks[(bi, bj)] = hit
        return hit

    def write(self, pending=None) -> None:
        """Write into ``out`` and free every block that meets none of the ``pending``
        boxes (all blocks when None)."""
        b = self.block
        if self.held is not None:
            index, r0, c0, _, mask = self.held
            h, w = mask.shape
            if not _meets(np.array([[r0, c0]]), (h, w), pending)[0]:
                self.held = None
                self._paste((slice(r0, r0 + h), slice(c0, c0 + w)), mask,
                            lambda: index + 1 if self.ids is None else self.ids[index])
        keys = list(self.blocks)
        if not keys:
            return
        waiting = _meets(np.asarray(keys, dtype=np.int64) * b, (b, b), pending)
        for (bi, bj), wait in zip(keys, waiting, strict=True):
            if wait:
                continue
            r0, c0 = bi * b, bj * b
            _, owner = self.blocks.pop((bi, bj))
            covered = owner >= 0
            rows, cols = mask_box(covered)
            window = (slice(r0 + rows.start, r0 + rows.stop), slice(c0 + cols.start,
                                                                    c0 + cols.stop))
            covered, owner = covered[rows, cols], owner[rows, cols]
            # owner is -1 where not covered: those values are never written
            self._paste(window, covered, lambda owner=owner: owner + 1 if self.ids is None
                        else np.take(self.ids, owner))

    def _paste(self, window, covered: np.ndarray, values) -> None:
        """``values()`` (an array of the window's shape, or one id) into ``out`` where
        ``covered`` (and, without ``overwrite``, where ``out`` is 0)."""
        in_place = isinstance(self.out, np.ndarray)  # else (Zarr) read, change, write
        current = self.out[window] if in_place else np.array(self.out[window])
        if not self.overwrite:
            covered = covered & (current == 0)
        if covered.any():
            np.copyto(current, values(), where=covered, casting="unsafe")
            if not in_place:
                self.out[window] = current


def _meets(starts: np.ndarray, size, pending) -> np.ndarray:
    """Which boxes of ``size`` (h, w) at ``starts`` (N, 2) meet one of the ``pending``
    boxes (row0, col0, row1, col1)."""
    if not pending:
        return np.zeros(len(starts), dtype=bool)
    p = np.asarray(pending, dtype=np.int64).reshape(-1, 4)[None]
    r, c = starts[:, :1], starts[:, 1:]
    return ((p[..., 0] < r + size[0]) & (r < p[..., 2])
            & (p[..., 1] < c + size[1]) & (c < p[..., 3])).any(axis=1)


def paste_objects(out, objects, ids=None, max_hole_area: int = 0, max_sprinkle_area: int = 0,
                  overwrite: bool = True) -> None:
    """Write objects given as ``(region, logits)`` crops into ``out`` (NumPy or Zarr).

    Object i gets ``ids[i]`` (default i+1). Each object's mask (logits > 0, cleaned
    on its bounding box) is merged as it comes: where masks overlap, the highest
    logit wins (ties: the object first in the list). With ``overwrite=False``, pixels
    already labelled in ``out`` are kept. Only the area objects cover is read and
    written, so ``out`` can be far larger than memory.

    ``objects`` may be any iterable, a generator too: objects are taken one at a time
    and not kept, so memory is bounded by the area they cover (see
    :class:`BestLogitMap`), not by their number. Items are ``(region, logits)``
    (object i is the i-th), or ``(region, logits, i)`` for objects coming in another
    order, or a :class:`Flush`, after which only the area of its pending boxes can
    still change: the rest is written then.
    """
    merged = BestLogitMap(out, ids, max_hole_area, max_sprinkle_area, overwrite)
    n = 0
    for item in objects:
        if isinstance(item, Flush):
            merged.write(item.pending)
            continue
        region, logits, *index = item
        merged.add(index[0] if index else n, region, logits)
        n += 1
    merged.write()


def paste_object(
    labels: np.ndarray, mask: np.ndarray, obj_id: int, overwrite: bool = False
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Where to write ``obj_id`` so that ``labels`` shows ``mask`` as that object.

    Returns ``(indices, values)`` for napari's undoable ``Labels.data_setitem``
    (or ``labels[indices] = values``). Pixels of other objects are kept unless
    ``overwrite``; old pixels of ``obj_id`` outside the new mask are cleared.
    """
    mask = np.asarray(mask, dtype=bool)
    writable = mask if overwrite else mask & ((labels == 0) | (labels == obj_id))
    stale = (labels == obj_id) & ~mask
    change = (writable & (labels != obj_id)) | stale
    idx = np.nonzero(change)
    values = np.where(writable[idx], obj_id, 0).astype(labels.dtype)
    return idx, values
