"""Writes into a napari Labels layer that Ctrl+Z undoes as one step, even when they
arrive over time (the slices of a propagation, the planes of a concept run).

napari's ``Labels.data_setitem`` records one undo step per call; a propagation writes
one slice at a time, seconds apart, and must still be one step, or Ctrl+Z would undo
the user's earlier commit and leave the propagation in place. :class:`UndoStep`
builds one napari history item (a list of ``(indices, old values, new values)``
atoms, the format every napari release replays) and extends it slice by slice while
it is still the newest item; if the user edits or undoes in between, later writes
start a new step, so every step reverts only what it wrote.
"""

from __future__ import annotations

import numpy as np


class UndoStep:
    """One undo step of a Labels layer, filled write by write (``record``).

    Past ``max_pixels`` changed pixels (each costs about 32 bytes of history) the step
    is taken out of the history and ``too_large`` is set: the writes stand, without undo.
    """

    def __init__(self, layer, max_pixels: int = 1 << 22):
        self.layer = getattr(layer, "__wrapped__", layer)  # napari's PublicOnlyProxy
        self.max_pixels = int(max_pixels)
        self._items: list[list] = []
        self.pixels = 0
        self.too_large = False

    def record(self, key: tuple, old: np.ndarray, new: np.ndarray) -> None:
        """Note that ``data[key]`` (ints and step-less slices) changed from ``old`` to
        ``new``; unchanged pixels are not stored."""
        if self.too_large:
            return
        old, new = np.asarray(old), np.broadcast_to(np.asarray(new), np.shape(old))
        changed = old != new
        if not changed.any():
            return
        self.pixels += int(changed.sum())
        if self.pixels > self.max_pixels:
            self._drop()
            return
        where = np.nonzero(changed)
        n, parts, j = len(where[0]), [], 0  # n: changed pixels
        for k in key:
            if isinstance(k, slice):
                parts.append(where[j] + (k.start or 0))
                j += 1
            else:
                parts.append(np.full(n, int(k), dtype=np.intp))
        atom = (tuple(parts), old[changed].copy(), new[changed].copy())
        layer = self.layer
        history = layer._undo_history
        if self._items and history and history[-1] is self._items[-1]:
            self._items[-1].append(atom)
            return
        item = [atom]
        self._items.append(item)
        layer._redo_history.clear()
        append = getattr(layer, "_append_to_undo_history", None)
        if append is not None:
            append(item)  # also emits the layer's paint event
        else:
            history.append(item)

    def _drop(self) -> None:
        self.too_large = True
        history = self.layer._undo_history
        for item in self._items:
            for i, other in enumerate(history):
                if other is item:
                    del history[i]
                    break
        self._items = []


class RecordedWrites:
    """An array-like over ``target`` whose assignments are recorded in ``step``.

    ``target`` is the labels data or a view of it with ``full_key(key)`` mapping its
    keys to keys of the layer's data (``core.planes.AxisView``).
    """

    def __init__(self, target, step: UndoStep):
        self.target, self.step = target, step
        self.shape, self.dtype = tuple(target.shape), target.dtype

    def __getitem__(self, key):
        return self.target[key]

    def __setitem__(self, key, value) -> None:
        key = key if isinstance(key, tuple) else (key,)
        old = np.asarray(self.target[key])
        full = self.target.full_key(key) if hasattr(self.target, "full_key") else key
        self.step.record(full, old, value)
        self.target[key] = value


# -- region history: undo and redo of writes napari cannot record (multiscale labels) ------------
class RegionStep:
    """One undo step of a :class:`RegionHistory`, filled write by write (``record``).

    Each write keeps the old values of the bounding box of the pixels it changed; undo
    and redo swap them back in. Like :class:`UndoStep`, a step grows only while it is
    the history's newest; past ``max_pixels`` kept pixels it is dropped and
    ``too_large`` is set (the writes stand, without undo).
    """

    def __init__(self, history: RegionHistory, max_pixels: int):
        self.history, self.max_pixels = history, int(max_pixels)
        self.pixels = 0
        self.too_large = False
        self._items: list[list] = []

    def record(self, key: tuple, old: np.ndarray, new: np.ndarray) -> None:
        """Note that ``data[key]`` (full key: ints and slices with starts) changes from
        ``old`` to ``new``."""
        if self.too_large:
            return
        key = self.history.pyramid.full_key(key)
        old = np.asarray(old)
        changed = old != np.broadcast_to(np.asarray(new), old.shape)
        if not changed.any():
            return
        box, sub = [], []  # the changed pixels' bounding box, in the key and in ``old``
        axes = [i for i, k in enumerate(key) if isinstance(k, slice)]
        for a, i in enumerate(axes):
            hit = np.flatnonzero(changed.any(axis=tuple(b for b in range(changed.ndim) if b != a)))
            lo, hi = int(hit[0]), int(hit[-1]) + 1
            sub.append(slice(lo, hi))
            box.append((i, slice(key[i].start + lo, key[i].start + hi)))
        part = old[tuple(sub)].copy()
        self.pixels += part.size
        if self.pixels > self.max_pixels:
            self.too_large = True
            for item in self._items:
                self.history.drop(item)
            self._items = []
            return
        full = list(key)
        for i, s in box:
            full[i] = s
        atom = [tuple(full), part]
        if not self._items or not self.history.is_newest(self._items[-1]):
            self._items.append([])
            self.history.push(self._items[-1])
        self._items[-1].append(atom)

    def write(self, key, values) -> None:
        """Write ``values`` over ``key`` of the history's pyramid, recorded in this step."""
        target = self.history.pyramid
        key = target.full_key(key)
        self.record(key, target.read(key), values)
        target.write(key, values)


class RegionHistory:
    """Undo and redo of a :class:`~napari_sam3.core.pyramid.Pyramid`'s writes, step by
    step (the newest ``max_steps`` steps are kept); ``refresh()`` runs after each."""

    def __init__(self, pyramid, refresh=lambda: None, max_steps: int = 100):
        self.pyramid, self.refresh, self.max_steps = pyramid, refresh, int(max_steps)
        self.undo_items: list[list] = []
        self.redo_items: list[list] = []

    def step(self, max_pixels: int = 1 << 24) -> RegionStep:
        return RegionStep(self, max_pixels)

    def is_newest(self, item) -> bool:
        return bool(self.undo_items) and self.undo_items[-1] is item

    def push(self, item: list) -> None:
        self.undo_items.append(item)
        del self.undo_items[: -self.max_steps]
        self.redo_items.clear()

    def drop(self, item) -> None:
        self.undo_items = [it for it in self.undo_items if it is not item]

    def _swap(self, item: list, order) -> None:
        for atom in order(item):
            key, kept = atom
            atom[1] = self.pyramid.read(key)
            self.pyramid.write(key, kept)

    def undo(self) -> bool:
        """Revert the newest step; False when there is none."""
        if not self.undo_items:
            return False
        item = self.undo_items[-1]
        self._swap(item, reversed)  # (a read that fails leaves the step where it was)
        self.undo_items.pop()
        self.redo_items.append(item)
        self.refresh()
        return True

    def redo(self) -> bool:
        """Write the last undone step again; False when there is none."""
        if not self.redo_items:
            return False
        item = self.redo_items[-1]
        self._swap(item, iter)
        self.redo_items.pop()
        self.undo_items.append(item)
        self.refresh()
        return True
