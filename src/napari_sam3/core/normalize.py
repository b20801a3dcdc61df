"""Map microscopy images to the 8-bit RGB the SAM3 processor expects.

Rules (also in the README):

* a uint8 RGB(A) image goes to the processor unchanged (alpha dropped);
* anything else is scaled linearly to 0..255 per channel with fixed limits
  ``(low, high)``: napari's contrast limits when the caller has them, otherwise
  the 0.5th and 99.5th percentiles of the data (``robust_limits``). Values
  outside the limits are clipped;
* a grayscale image is copied into the three channels; a two-channel image
  becomes (c0, c1, 0); more than three channels keep the first three.

The same limits must be used for every tile and slice of one image, so callers
compute them once (``robust_limits`` on the whole image or a subsample) and pass
them along.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (0.5, 99.5)
_SAMPLE_PIXELS = 4_000_000


def is_channels_last(image: np.ndarray) -> bool:
    """True for (Y, X, C) images with 2 to 4 channels, as napari's rgb layers."""
    return image.ndim == 3 and image.shape[-1] in (2, 3, 4)


def _sample(image, window: int = 512, grid: int = 4) -> np.ndarray:
    """Pixels of a large lazy 2D(+C) array-like: a grid of windows, never the whole image."""
    h, w = image.shape[:2]
    if h * w <= _SAMPLE_PIXELS or isinstance(image, np.ndarray):
        return np.asarray(image)
    rows = np.linspace(0, max(h - window, 0), grid).astype(int)
    cols = np.linspace(0, max(w - window, 0), grid).astype(int)
    return np.concatenate([np.asarray(image[r:r + window, c:c + window]).reshape(
        (-1,) + tuple(image.shape[2:])) for r in rows for c in cols])


def robust_limits(image, percentiles=PERCENTILES) -> tuple[float, float]:
    """Percentile limits of an array-like, on a subsample of large data."""
    arr = np.asarray(image)
    if arr.size > _SAMPLE_PIXELS:
        step = int(np.ceil((arr.size / _SAMPLE_PIXELS) ** 0.5))
        arr = arr[::step, ::step] if arr.ndim >= 2 else arr[::step * step]
    arr = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    if arr.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(arr, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def check_limits(limits):
    """``limits`` if it is one ``(low, high)`` pair or one pair per channel (up to 4), of
    finite numbers with low < high; else a ValueError (never silently swapped or widened)."""
    form = "limits must be (low, high) or one (low, high) pair per channel"
    try:
        arr = np.asarray(limits, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{form}, got {limits!r}") from None
    if arr.shape != (2,) and not (arr.ndim == 2 and arr.shape[1] == 2 and 1 <= len(arr) <= 4):
        raise ValueError(f"{form}, got {limits!r}")
    for lo, hi in arr.reshape(-1, 2):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"limits must be finite numbers, got ({lo:g}, {hi:g})")
        if not lo < hi:
            raise ValueError(f"limits ({lo:g}, {hi:g}): low must be below high")
    return limits


def image_limits(image, limits=None):
    """The limits to use for every tile of ``image``: None for uint8 RGB (unchanged),
    else ``limits`` as given or per-channel robust limits from a sample of the image."""
    if limits is not None:
        check_limits(limits)
    channels_last = len(image.shape) == 3 and image.shape[-1] in (2, 3, 4)
    if channels_last and image.dtype == np.uint8 and image.shape[-1] in (3, 4):
        return None
    if limits is not None:
        return limits
    sample = _sample(image)
    if not channels_last:
        return robust_limits(sample)
    return [robust_limits(sample[..., i]) for i in range(min(3, image.shape[-1]))]


def to_uint8(channel: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    lo, hi = float(limits[0]), float(limits[1])
    if hi <= lo:
        hi = lo + 1.0
    scaled = (np.asarray(channel, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def to_rgb_uint8(image, limits=None) -> np.ndarray:
    """(Y, X) or (Y, X, C) array -> (Y, X, 3) uint8 as described in the module docstring.

    ``limits`` is one ``(low, high)`` pair for all channels or one pair per channel.
    """
    if limits is not None:
        check_limits(limits)
    img = np.asarray(image)
    if img.ndim == 3 and not is_channels_last(img):
        raise ValueError(f"expected a 2D image or (Y, X, C) with C<=4, got shape {img.shape}")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image, got shape {img.shape}")
    if img.ndim == 3 and img.dtype == np.uint8 and img.shape[-1] in (3, 4):
        return np.ascontiguousarray(img[..., :3])
    channels = [img] if img.ndim == 2 else [img[..., i] for i in range(min(3, img.shape[-1]))]
    if limits is None:
        per_channel = [robust_limits(c) for c in channels]
    elif np.ndim(limits) == 1:
        per_channel = [tuple(limits)] * len(channels)
    else:
        per_channel = [tuple(lim) for lim in limits]
    out = [to_uint8(c, lim) for c, lim in zip(channels, per_channel, strict=False)]
    if len(out) == 1:
        out = out * 3
    while len(out) < 3:
        out.append(np.zeros_like(out[0]))
    return np.stack(out, axis=-1)
