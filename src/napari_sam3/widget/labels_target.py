"""The labels layer the widget writes into, through one small interface.

* :class:`NapariLabels`: a single-resolution Labels layer (NumPy or Zarr); writes are
  napari's (``data_setitem``, :class:`~.history.UndoStep`) and so is undo.
* :class:`PyramidLabels`: a multiscale Labels layer over a
  :class:`~napari_sam3.core.pyramid.QueuedPyramid`; a write at full resolution updates the
  same region of every level in a background thread (napari never waits for the disk; the
  layer is refreshed when the writes have landed, reads wait for them), and undo is ours
  (:class:`~.history.RegionHistory`, Ctrl+Z / Ctrl+Shift+Z bound on the layer), since
  napari edits no multiscale Labels.

Both have ``layer``, ``shape``, ``dtype``, ``data`` (full-resolution, writable
array-like: writes through it are not recorded), ``read(key)``, ``set_pixels(indices,
values)`` and ``write_region(key, old, new)`` (one undo step each; they return whether
it is undoable), ``step(max_pixels)`` (an
undo step to fill over time: ``record(key, old, new)``, ``too_large``), ``refresh()``,
``when_landed(call)`` (runs once the writes show), ``undo()`` and ``redo()``.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError
from .history import RegionHistory, UndoStep
from .image_source import unwrap

REGION_UNDO_PIXELS = 1 << 24  # pixels a pyramid's undo step may keep (4 bytes each)
UNDO_KEY, REDO_KEY = "Control-Z", "Control-Shift-Z"


class NapariLabels:
    """A single-resolution napari Labels layer, written and undone as napari does."""

    pyramid = None

    def __init__(self, layer):
        self.layer = layer

    @property
    def data(self):
        return unwrap(self.layer).data

    shape = property(lambda self: tuple(int(s) for s in self.data.shape))
    dtype = property(lambda self: np.dtype(self.data.dtype))

    def read(self, key) -> np.ndarray:
        return np.asarray(self.data[key])

    def set_pixels(self, indices, values) -> bool:
        self.layer.data_setitem(indices, values)
        return True

    def write_region(self, key: tuple, old: np.ndarray, new: np.ndarray) -> bool:
        """Replace ``old`` (what ``read(key)`` gave) by ``new`` over ``key`` (ints, then
        slices) as one undo step: napari's ``data_setitem`` of the changed pixels."""
        where = np.nonzero(old != new)
        n = len(where[0])
        if n:
            full, j = [], 0
            for k in key:
                if isinstance(k, slice):
                    full.append(where[j] + (k.start or 0))
                    j += 1
                else:
                    full.append(np.full(n, int(k), dtype=np.intp))
            self.layer.data_setitem(tuple(full), new[where])
        return True

    def step(self, max_pixels: int) -> UndoStep:
        return UndoStep(self.layer, max_pixels=max_pixels)

    def refresh(self) -> None:
        self.layer.refresh()

    def when_landed(self, call) -> None:
        call()  # napari writes at once

    def undo(self) -> bool:
        unwrap(self.layer).undo()
        return True

    def redo(self) -> bool:
        unwrap(self.layer).redo()
        return True


class PyramidLabels:
    """A multiscale Labels layer over a pyramid, with our own region-based undo."""

    def __init__(self, layer, pyramid):
        self.layer, self.pyramid = layer, pyramid
        self.history = RegionHistory(pyramid, self.refresh)
        raw = unwrap(layer)
        raw.bind_key(UNDO_KEY, lambda *_: self.undo(), overwrite=True)
        raw.bind_key(REDO_KEY, lambda *_: self.redo(), overwrite=True)
        self._after_landing: list = []
        self.restored = None  # restored(keys, "undo" | "redo"): after each undo and redo
        if hasattr(pyramid, "on_written"):
            from superqt.utils import ensure_main_thread

            pyramid.on_written = ensure_main_thread(self._landed)

    @property
    def pending(self) -> bool:
        """Writes are still landing in the background."""
        return bool(getattr(self.pyramid, "pending", False))

    def wait(self) -> None:
        if hasattr(self.pyramid, "wait"):
            self.pyramid.wait()

    def _landed(self, error) -> None:
        """The queued writes have landed (GUI thread): show them, or say they failed."""
        if error is not None:
            from napari.utils import notifications

            notifications.show_error(f"SAM3: {error}; the labels on disk may miss that edit")
        if not self.pending:
            self.layer.refresh()
            calls, self._after_landing = self._after_landing, []
            for call in calls:
                call()

    def when_landed(self, call) -> None:
        """Run ``call()`` (GUI thread) once the queued writes are shown; now if none are."""
        if self.pending:
            self._after_landing.append(call)
        else:
            call()

    @property
    def data(self):
        return self.pyramid

    shape = property(lambda self: self.pyramid.shape)
    dtype = property(lambda self: self.pyramid.dtype)

    def read(self, key) -> np.ndarray:
        return self.pyramid.read(key)

    def set_pixels(self, indices, values) -> bool:
        """Write ``values`` at the pixels ``indices`` (one index array per axis) as one
        step: per slice, the bounding box of the pixels is read, changed and written."""
        idx = [np.asarray(i, dtype=np.intp).reshape(-1) for i in indices]
        values = np.broadcast_to(np.asarray(values), idx[0].shape)
        n_lead = self.pyramid.n_lead
        if n_lead:
            leads, group = np.unique(np.stack(idx[:n_lead], axis=1), axis=0, return_inverse=True)
            group = group.reshape(-1)
        else:
            leads, group = np.zeros((1, 0), np.intp), np.zeros(len(idx[0]), np.intp)
        step = self.step(REGION_UNDO_PIXELS)
        for g, lead in enumerate(leads):
            sel = group == g
            rr, cc = idx[-2][sel], idx[-1][sel]
            if not rr.size:
                continue
            r0, c0 = int(rr.min()), int(cc.min())
            key = self.pyramid.full_key(tuple(int(v) for v in lead) + (
                slice(r0, int(rr.max()) + 1), slice(c0, int(cc.max()) + 1)))
            old = self.pyramid.read(key)
            new = old.copy()
            new[rr - r0, cc - c0] = values[sel]
            step.record(key, old, new)
            self.pyramid.write(key, new)
        self.refresh()
        return not step.too_large

    def write_region(self, key: tuple, old: np.ndarray, new: np.ndarray) -> bool:
        """Replace ``old`` (what ``read(key)`` gave) by ``new`` over ``key`` as one step:
        the region is written whole at every level (no per-pixel indices)."""
        key = self.pyramid.full_key(key)
        step = self.step(REGION_UNDO_PIXELS)
        step.record(key, old, new)
        self.pyramid.write(key, new)
        self.refresh()
        return not step.too_large

    def step(self, max_pixels: int = REGION_UNDO_PIXELS):
        return self.history.step(max_pixels)

    def refresh(self) -> None:
        """Show the labels now, unless writes are landing (then when they have)."""
        if not self.pending:
            self.layer.refresh()

    def undo(self) -> bool:
        return self._restore(self.history.undo_items, self.history.undo, "undo")

    def redo(self) -> bool:
        return self._restore(self.history.redo_items, self.history.redo, "redo")

    def _restore(self, items: list, swap, name: str) -> bool:
        keys = [atom[0] for atom in items[-1]] if items else []
        done = swap()
        if done and keys and self.restored is not None:
            self.restored(keys, name)
        return done


class LabelTargets:
    """The write interface of each labels layer of a viewer; a pyramid's (with its
    history) lives as long as its layer."""

    def __init__(self, layers):
        self._pyramids: dict[int, tuple[object, PyramidLabels]] = {}
        self._layers = layers
        layers.events.removed.connect(self._on_removed)

    def add(self, layer, pyramid) -> PyramidLabels:
        target = PyramidLabels(layer, pyramid)
        raw = unwrap(layer)
        self._pyramids[id(raw)] = (raw, target)
        return target

    def of(self, layer):
        """The target of ``layer``: ours for a pyramid, napari's for the others."""
        raw = unwrap(layer)
        hit = self._pyramids.get(id(raw))
        if hit is not None and hit[0] is raw:
            return hit[1]
        if not raw.multiscale:
            return NapariLabels(layer)
        from ..core.pyramid import Pyramid

        try:  # a user's pyramid is written at once: a read-only one fails on the spot
            pyramid = Pyramid(list(raw.data))
        except ValueError as exc:
            raise UserError(f"labels layer '{raw.name}' cannot be written into: {exc}") from None
        return self.add(layer, pyramid)

    def disconnect(self) -> None:
        """Stop following the layers; queued writes land first."""
        try:
            self._layers.events.removed.disconnect(self._on_removed)
        except (TypeError, ValueError, RuntimeError):
            pass
        for _, target in self._pyramids.values():
            if hasattr(target.pyramid, "close"):
                target.pyramid.close()

    @property
    def pending(self) -> bool:
        """A pyramid's writes are still landing."""
        return any(target.pending for _, target in self._pyramids.values())

    def wait(self) -> None:
        """Block until every pyramid's writes have landed (before saving them)."""
        for _, target in list(self._pyramids.values()):
            target.wait()

    def _on_removed(self, event) -> None:
        raw = unwrap(getattr(event, "value", None))
        hit = self._pyramids.pop(id(raw), None)
        if hit is not None and hasattr(hit[1].pyramid, "close"):
            hit[1].pyramid.close()


class PlaneView:
    """Plane ``lead`` (full resolution) of a labels target as an array-like for scans in
    a worker: ``shape``, ``chunks`` (the storage's, where it has any) and ``[rows, cols]``
    (read through the target, so queued pyramid writes are waited for)."""

    def __init__(self, target, lead: tuple):
        self.target, self.lead = target, tuple(int(i) for i in lead)
        self.shape = tuple(int(s) for s in target.shape[len(self.lead):])
        levels = getattr(target.pyramid, "levels", None)
        chunks = getattr(levels[0] if levels else target.data, "chunks", None)
        if chunks and isinstance(chunks[0], tuple):  # dask
            chunks = tuple(max(c) for c in chunks)
        self.chunks = tuple(int(c) for c in chunks[-2:]) if chunks else None

    @property
    def in_memory(self) -> bool:
        """A NumPy layer: a scan costs less than a worker would."""
        return self.target.pyramid is None and isinstance(self.target.data, np.ndarray)

    def __getitem__(self, key) -> np.ndarray:
        return self.target.read(self.lead + tuple(key))
