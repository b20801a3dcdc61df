"""Checks of the public API's arguments, each failing with one clear ValueError.

Whole numbers are Python or NumPy integers; booleans, floats (even ``2.0``) and strings
are refused rather than rounded, so a mistyped argument never silently means another.
"""

from __future__ import annotations

import math

import numpy as np

from .defaults import MAX_ID


def is_whole(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def whole_number(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, if it is a whole number from ``low`` to ``high`` (inclusive)."""
    if not is_whole(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def finite_number(name: str, value) -> float:
    """``value`` as a float, if it is a finite real number (not a boolean)."""
    real = isinstance(value, int | float | np.integer | np.floating)
    if not real or isinstance(value, bool | np.bool_) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def label_ids(ids, n: int) -> list[int]:
    """One label id per object, each from 1 to MAX_ID (0 is the background)."""
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(f"ids must be a sequence of label ids, got {ids!r}") from None
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} prompts: give one label id per prompt")
    return [whole_number(f"ids[{i}]", v, 1, MAX_ID) for i, v in enumerate(ids)]


def labels_shape(name: str, out, shape) -> None:
    """``out`` (an array to write labels into) has exactly ``shape``."""
    got = getattr(out, "shape", None)
    if got is None or tuple(got) != tuple(shape):
        raise ValueError(
            f"{name} has shape {None if got is None else tuple(got)}, the labels are "
            f"{tuple(int(s) for s in shape)}"
        )


def cleanup_areas(max_hole_area, max_sprinkle_area) -> None:
    """The post-processing bounds: whole numbers of pixels, 0 or more (0 = off)."""
    whole_number("max_hole_area", max_hole_area, 0)
    whole_number("max_sprinkle_area", max_sprinkle_area, 0)
