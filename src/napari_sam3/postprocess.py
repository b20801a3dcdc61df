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


def fill_holes(mask: np.ndarray, max_hole_area: int) -> np.ndarray:
    """Fill enclosed background regions of at most ``max_hole_area`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if max_hole_area <= 0 or mask.all() or not mask.any():
        return mask.copy()
    holes, n = ndi.label(~mask, structure=_FOUR)
    if n == 0:
        return mask.copy()
    areas = np.bincount(holes.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = areas <= max_hole_area
    fill[0] = False
    fill[border] = False
    return mask | fill[holes]


def remove_islands(mask: np.ndarray, max_sprinkle_area: int) -> np.ndarray:
    """Remove mask regions of at most ``max_sprinkle_area`` pixels, keeping the largest."""
    mask = np.asarray(mask, dtype=bool)
    if max_sprinkle_area <= 0 or not mask.any():
        return mask.copy()
    islands, n = ndi.label(mask, structure=_EIGHT)
    areas = np.bincount(islands.ravel(), minlength=n + 1)
    areas[0] = 0
    keep = areas > max_sprinkle_area
    keep[int(np.argmax(areas))] = True
    keep[0] = False
    return keep[islands]


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


def paste_objects(out, objects, ids=None, max_hole_area: int = 0, max_sprinkle_area: int = 0,
                  overwrite: bool = True) -> None:
    """Write objects given as ``(region, logits)`` crops into ``out`` (NumPy or Zarr).

    Object i gets ``ids[i]`` (default i+1); where objects overlap, the highest logit
    wins (ties: the first object). Only the bounding box of each mask is read and
    written, so ``out`` can be far larger than memory. With ``overwrite=False``,
    pixels already labelled in ``out`` are kept.
    """
    n = len(objects)
    ids = list(range(1, n + 1)) if ids is None else [int(i) for i in ids]
    # each object's cleaned mask, cropped to its bounding box in image coordinates
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
