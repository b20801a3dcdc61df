"""Prompts for one object, in NumPy/napari (row, col) pixel coordinates.

This module is the one place where (row, col) becomes SAM's (x, y): see
:func:`rowcol_to_xy` and :func:`box_to_xyxy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class PromptError(ValueError):
    """A prompt that cannot be used (outside the image, malformed, empty)."""


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _numbers(values, what: str) -> np.ndarray:
    """``values`` as a float64 array; anything that is not numbers is a PromptError."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise PromptError(f"{what}, got {_short(values)}") from None


_INTEGER = (int, np.integer, np.bool_)  # bool is an int


def check_box(box, what: str = "a box") -> np.ndarray:
    """``box`` as (row0, col0, row1, col1) float64 with sorted corners: four finite
    numbers, else a PromptError (the one rule for prompt boxes and exemplar boxes)."""
    arr = _numbers(box, f"{what} is (row0, col0, row1, col1)").reshape(-1)
    if arr.shape != (4,):
        raise PromptError(f"{what} is (row0, col0, row1, col1), got {_short(box)}")
    if not np.isfinite(arr).all():
        raise PromptError(f"{what}'s coordinates must be finite numbers, got {_short(box)}")
    r0, c0, r1, c1 = arr
    return np.array([min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1)])


def binary_labels(labels, what: str = "point labels") -> np.ndarray:
    """Labels as int64: exactly 0 or 1, as integers or booleans (NumPy's too).

    Floats are refused, never rounded: 0.5 or 1.9 is a mistake, not a click.
    """
    flat = PromptError(f"{what} must be a flat list of 0 and 1, got {_short(labels)}")
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError):  # ragged nesting
        raise flat from None
    if arr.ndim > 1:
        raise flat
    arr = arr.reshape(-1)
    if arr.dtype.kind not in "biu" or not np.isin(arr, (0, 1)).all():
        bad = [v for v in arr.tolist() if not (isinstance(v, _INTEGER) and v in (0, 1))]
        if bad:
            raise PromptError(
                f"{what} must be 1 (positive) or 0 (negative), as integers or "
                f"booleans; got {_short(bad[0])}"
            )
    return arr.astype(np.int64)


def as_prompts(prompts, shape=None, ids=None) -> list[ObjectPrompt]:
    """``prompts`` as ObjectPrompts (a dict is taken as keyword arguments), each inside an
    image of ``shape`` if given; an error names the object: ``object N: ...``, N its id in
    ``ids`` or its position from 1."""
    out = []
    for i, p in enumerate(prompts):
        try:
            if isinstance(p, dict):
                p = ObjectPrompt(**p)
            elif not isinstance(p, ObjectPrompt):
                raise PromptError(f"expected an ObjectPrompt or a dict, got {type(p).__name__}")
            if shape is not None:
                p.check_inside(tuple(shape))
        except TypeError as e:  # unknown keyword arguments
            raise PromptError(f"object {i + 1 if ids is None else ids[i]}: {e}") from None
        except PromptError as e:
            raise PromptError(f"object {i + 1 if ids is None else ids[i]}: {e}") from None
        out.append(p)
    return out


@dataclass
class ObjectPrompt:
    """Prompts for one object.

    Parameters
    ----------
    points
        ``[(row, col), ...]`` pixel coordinates of clicks.
    point_labels
        One per point: 1 positive (inside the object), 0 negative (outside).
        Defaults to all positive.
    box
        ``(row0, col0, row1, col1)``: two opposite corners of a rectangle.
    mask
        A boolean (or 0/1) array the size of the image: a previous mask to refine.
    """

    points: Sequence[Sequence[float]] = field(default_factory=list)
    point_labels: Sequence[int] | None = None
    box: Sequence[float] | None = None
    mask: np.ndarray | None = None

    def __post_init__(self):
        pts = _numbers(self.points, "points are (row, col) pairs of numbers")
        if pts.size % 2:
            raise PromptError("points are (row, col) pairs of numbers")
        pts = pts.reshape(-1, 2)
        self.points = pts
        if self.point_labels is None:
            labels = np.ones(len(pts), dtype=np.int64)
        else:
            labels = binary_labels(self.point_labels)
        if len(labels) != len(pts):
            raise PromptError(f"{len(pts)} points but {len(labels)} point labels")
        self.point_labels = labels
        if not np.isfinite(pts).all():
            raise PromptError("point coordinates must be finite numbers")
        if self.box is not None:
            self.box = check_box(self.box)
        if self.mask is not None:
            self.mask = np.asarray(self.mask).astype(bool)
        if not len(pts) and self.box is None and self.mask is None:
            raise PromptError("an object needs at least one point, a box or a mask")
        if not len(pts) and self.box is None and not self.mask.any():
            raise PromptError("empty mask: no pixel is set, and there is no point or box")

    @property
    def uses_multimask(self) -> bool:
        """One point and no box: ambiguous, so pick the best of SAM's three masks."""
        return len(self.points) == 1 and self.box is None and self.mask is None

    def check_inside(self, shape: tuple[int, int]) -> None:
        """Raise :class:`PromptError` if a point or box lies outside an image of ``shape``."""
        h, w = shape
        for r, c in self.points:
            if not (0 <= r < h and 0 <= c < w):
                raise PromptError(f"point (row {r:g}, col {c:g}) is outside the {h}x{w} image")
        if self.box is not None:
            r0, c0, r1, c1 = self.box
            if r1 < 0 or c1 < 0 or r0 >= h or c0 >= w:
                raise PromptError(
                    f"box (rows {r0:g}-{r1:g}, cols {c0:g}-{c1:g}) is outside the {h}x{w} image"
                )
        if self.mask is not None and self.mask.shape != tuple(shape):
            raise PromptError(f"mask shape {self.mask.shape} differs from the image {h}x{w}")

    def shifted(self, row0: float, col0: float) -> ObjectPrompt:
        """The same prompt in a frame whose origin is (row0, col0) of this one."""
        off = np.array([row0, col0])
        return ObjectPrompt(
            points=self.points - off if len(self.points) else [],
            point_labels=self.point_labels,
            box=None if self.box is None else self.box - np.tile(off, 2),
            mask=self.mask,
        )

    @classmethod
    def from_dict(cls, d: dict) -> ObjectPrompt:
        """From the JSON form ``{"points": [[row, col]], "labels": [1], "box": [r0, c0, r1, c1]}``."""
        if not isinstance(d, dict):
            raise PromptError("each object must be a JSON object with points/labels/box")
        unknown = set(d) - {"points", "labels", "box", "slice"}
        if unknown:
            raise PromptError(f"unknown prompt keys: {', '.join(sorted(unknown))}")
        try:
            return cls(points=d.get("points") or [], point_labels=d.get("labels"), box=d.get("box"))
        except (TypeError, ValueError) as e:
            raise PromptError(str(e)) from None


def prompt_bbox(prompt: ObjectPrompt) -> tuple[float, float, float, float]:
    """(row0, col0, row1, col1) around all of an object's points, box and mask."""
    rows, cols = [], []
    if len(prompt.points):
        rows += list(prompt.points[:, 0])
        cols += list(prompt.points[:, 1])
    if prompt.box is not None:
        rows += [prompt.box[0], prompt.box[2]]
        cols += [prompt.box[1], prompt.box[3]]
    if prompt.mask is not None and prompt.mask.any():
        rr, cc = np.nonzero(prompt.mask)
        rows += [rr.min(), rr.max()]
        cols += [cc.min(), cc.max()]
    if not rows:
        raise PromptError("empty mask: no pixel is set, and there is no point or box")
    return min(rows), min(cols), max(rows), max(cols)


def prompt_in_tile(prompt: ObjectPrompt, tile, padded_shape, mask: bool = True
                   ) -> ObjectPrompt:
    """``prompt`` in the frame of ``tile`` (padded to ``padded_shape``); ``mask=False``
    leaves out a mask prompt's crop (for checking points and boxes only)."""
    local = prompt.shifted(tile.r0, tile.c0)
    if prompt.mask is not None and not mask:
        local.mask = None
    elif prompt.mask is not None:
        crop = np.zeros(padded_shape, dtype=bool)
        h, w = tile.shape
        crop[:h, :w] = prompt.mask[tile.slices]
        local.mask = crop
    if local.box is not None:  # a box sticking out of the tile is clipped to it
        h, w = tile.shape
        local.box = np.clip(local.box, 0, [h - 1, w - 1, h - 1, w - 1])
    if len(local.points):
        keep = ((local.points >= 0) & (local.points < tile.shape)).all(axis=1)
        if keep.any():
            local.points, local.point_labels = local.points[keep], local.point_labels[keep]
    return local


def rowcol_to_xy(points_rc: np.ndarray) -> list[list[float]]:
    """(row, col) -> SAM (x, y) = (col, row). The only place this swap happens."""
    pts = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
    return pts[:, ::-1].tolist()


def box_to_xyxy(box_rc: np.ndarray) -> list[float]:
    """(row0, col0, row1, col1) -> SAM (x0, y0, x1, y1)."""
    r0, c0, r1, c1 = (float(v) for v in box_rc)
    x0, y0 = rowcol_to_xy([[r0, c0]])[0]
    x1, y1 = rowcol_to_xy([[r1, c1]])[0]
    return [x0, y0, x1, y1]
