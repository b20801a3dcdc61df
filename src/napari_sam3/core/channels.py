"""Up to three single-channel images as the model's three input channels.

napari opens each fluorescence channel as its own layer. A :class:`ChannelComposite`
puts 1 to 3 of them (same shape; leading z/t axes allowed) into the R, G and B of
the model, each scaled to 0..255 with its own ``(low, high)`` limits, exactly as
:func:`normalize.to_uint8` scales one channel. It is a lazy (..., H, W, 3) uint8
array-like: indexing reads only the indexed region of each source, and indexing
leading axes with integers (``comp[z]``) gives the composite of that plane, still
lazy. Every segmenter takes it as an RGB uint8 image (``limits=None``), so the
embedding cache key, a hash of the normalised pixels, follows the layers and limits.

Channel rule, the same as :mod:`normalize` uses for one array:

* one source alone is grey, copied into R, G and B: SAM3 was trained on natural
  RGB photographs and sees a grey image best as R = G = B; and the pixels (so the
  cache entries) are those of the same layer segmented on its own with those limits;
* two sources are (c1, c2, 0), e.g. nuclei in R and membrane in G; three are (c1, c2, c3);
* a ``None`` source is a channel of zeros (e.g. ``[None, membrane]`` puts it in G only).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from .normalize import check_limits, to_uint8

MAX_CHANNELS = 3


def full_key(key, ndim: int) -> tuple:
    """``key`` as a tuple of one index per axis of an ``ndim`` array (``...`` expanded,
    missing trailing axes as ``slice(None)``)."""
    key = key if isinstance(key, tuple) else (key,)
    dots = [i for i, k in enumerate(key) if k is Ellipsis]
    if len(dots) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if dots:
        i = dots[0]
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    if len(key) > ndim:
        raise IndexError(f"too many indices for an array of {ndim} dimensions")
    return key + (slice(None),) * (ndim - len(key))


def _plane_index(k, length: int) -> int | None:
    """``k`` as an index in ``range(length)`` if it is an integer, else None."""
    try:
        k = operator.index(k)
    except TypeError:
        return None
    if not -length <= k < length:
        raise IndexError(f"index {k} is out of bounds for an axis of size {length}")
    return k % length


class ChannelView:
    """One channel of a multichannel array-like (``index`` along ``axis``), read lazily:
    for a channel of one layer, e.g. the membrane of a (C, Y, X) or (Y, X, C) image."""

    def __init__(self, data, index: int, axis: int = -1):
        shape = tuple(int(s) for s in data.shape)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for data of shape {shape}")
        self.axis = axis % len(shape)
        if not 0 <= index < shape[self.axis]:
            raise ValueError(f"channel {index} is not in axis {axis} of shape {shape}")
        self.data, self.index = data, int(index)
        self.shape = shape[:self.axis] + shape[self.axis + 1:]
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = full_key(key, self.ndim)
        return self.data[key[:self.axis] + (self.index,) + key[self.axis:]]

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self[...])
        return out if dtype is None else out.astype(dtype)


class ChannelComposite:
    """A lazy (..., H, W, 3) uint8 RGB array-like made of 1-3 sources with their own
    limits (see the module docstring). Build it with :func:`composite_from`.

    ``sources``/``limits``/``names`` hold one entry per given channel (None for a zero
    channel); ``lead`` is the index into the sources' leading axes of this plane.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, sources: tuple, limits: tuple, names: tuple, lead: tuple = ()):
        self.sources, self.limits, self.names, self.lead = sources, limits, names, lead
        first = next(s for s in sources if s is not None)
        self.shape = tuple(int(v) for v in first.shape[len(lead):]) + (3,)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        chans = ", ".join(f"{name or '-'} {lim}"
                          for name, lim in zip(self.names, self.limits, strict=True))
        return f"ChannelComposite(shape={self.shape}, channels=[{chans}])"

    def __getitem__(self, key):
        key = full_key(key, self.ndim)
        n_lead = self.ndim - 3
        plane = []
        for k, length in zip(key[:n_lead], self.shape, strict=False):
            i = _plane_index(k, length)
            if i is None:
                break
            plane.append(i)
        if plane and all(isinstance(k, slice) and k == slice(None) for k in key[len(plane):]):
            return ChannelComposite(self.sources, self.limits, self.names,
                                    self.lead + tuple(plane))
        return self._read(self.lead + key[:-1])[..., key[-1]]

    def _read(self, key) -> np.ndarray:
        """The normalised (..., 3) uint8 pixels at ``key`` of the sources."""
        chans = [None if s is None else to_uint8(np.asarray(s[key]), lim)
                 for s, lim in zip(self.sources, self.limits, strict=True)]
        like = next(c for c in chans if c is not None)
        chans = [np.zeros_like(like) if c is None else c for c in chans]
        if len(chans) == 1:
            chans *= 3
        chans += [np.zeros_like(like)] * (3 - len(chans))
        return np.stack(chans, axis=-1)

    def __array__(self, dtype=None, copy=None):
        out = self._read(self.lead)
        return out if dtype is None else out.astype(dtype)


def _label(i: int, names) -> str:
    name = names[i] if names is not None and i < len(names) else None
    return f"channel {i + 1}" + (f" '{name}'" if name else "")


def composite_from(arrays: Sequence, limits: Sequence, names: Sequence | None = None
                   ) -> ChannelComposite:
    """The composite of ``arrays`` (1-3 array-likes of one shape, or None for a zero
    channel), each scaled with its ``limits`` pair (low, high); ``names`` (e.g. the
    layer names) only for messages. Raises a one-line ValueError for anything else."""
    arrays, limits = list(arrays), list(limits)
    if not 1 <= len(arrays) <= MAX_CHANNELS:
        raise ValueError(f"choose 1 to {MAX_CHANNELS} channels, got {len(arrays)}")
    if len(limits) != len(arrays):
        raise ValueError(f"give one (low, high) pair per channel: {len(arrays)} channels, "
                         f"{len(limits)} limits")
    if all(a is None for a in arrays):
        raise ValueError("choose at least one image for the channels")
    ref = None
    pairs = []
    for i, (arr, lim) in enumerate(zip(arrays, limits, strict=True)):
        if arr is None:
            pairs.append(None)
            continue
        what, shape = _label(i, names), tuple(int(s) for s in arr.shape)
        if len(shape) < 2:
            raise ValueError(f"{what} is not an image: shape {shape}")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"{what} has data type {arr.dtype}, not numbers")
        if ref is None:
            ref = (_label(i, names), shape)
        elif shape != ref[1]:
            raise ValueError(f"{what} has shape {shape}, {ref[0]} is {ref[1]}")
        if np.shape(lim) != (2,):
            raise ValueError(f"{what}: limits must be one (low, high) pair, got {lim!r}")
        try:
            check_limits(lim)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        pairs.append((float(lim[0]), float(lim[1])))
    names = tuple(None if names is None or i >= len(names) else names[i]
                  for i in range(len(arrays)))
    return ChannelComposite(tuple(arrays), tuple(pairs), names)


__all__ = ["MAX_CHANNELS", "ChannelComposite", "ChannelView", "composite_from", "full_key"]
