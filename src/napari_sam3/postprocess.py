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
    """Fill small holes, then remove small islands."""
    return remove_islands(fill_holes(mask, max_hole_area), max_sprinkle_area)


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
    n = logits.shape[0]
    ids = np.arange(1, n + 1, dtype=np.int32) if ids is None else np.asarray(ids, dtype=np.int32)
    labels = np.zeros(logits.shape[1:], dtype=np.int32)
    if n == 0:
        return labels
    masks = np.stack(
        [clean_mask(lg > 0, max_hole_area, max_sprinkle_area) for lg in logits]
    )
    score = np.where(masks, logits, -np.inf)
    best = np.argmax(score, axis=0)
    any_fg = masks.any(axis=0)
    labels[any_fg] = ids[best[any_fg]]
    return labels


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
