"""The labels layer the widget writes into, through one small interface.

* :class:`NapariLabels`: a single-resolution Labels layer (NumPy or Zarr); writes are
  napari's (``data_setitem``, :class:`~.history.UndoStep`) and so is undo.
* :class:`PyramidLabels`: a multiscale Labels layer over a
  :class:`~napari_sam3.core.pyramid.Pyramid`; a write at full resolution updates the same
  region of every level, and undo is ours (:class:`~.history.RegionHistory`, Ctrl+Z /
  Ctrl+Shift+Z bound on the layer), since napari edits no multiscale Labels.

Both have ``layer``, ``shape``, ``dtype``, ``data`` (full-resolution, writable
array-like: writes through it are not recorded), ``read(key)``, ``set_pixels(indices,
values)`` (one undo step; returns whether it is undoable), ``step(max_pixels)`` (an
undo step to fill over time: ``record(key, old, new)``, ``too_large``), ``refresh()``,
``undo()`` and ``redo()``.
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

    def step(self, max_pixels: int) -> UndoStep:
        return UndoStep(self.layer, max_pixels=max_pixels)

    def refresh(self) -> None:
        self.layer.refresh()

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
            key = tuple(int(v) for v in lead) + (slice(r0, int(rr.max()) + 1),
                                                  slice(c0, int(cc.max()) + 1))
            crop = self.pyramid.read(key).copy()
            crop[rr - r0, cc - c0] = values[sel]
            step.write(key, crop)
        self.refresh()
        return not step.too_large

    def step(self, max_pixels: int = REGION_UNDO_PIXELS):
        return self.history.step(max_pixels)

    def refresh(self) -> None:
        self.layer.refresh()

    def undo(self) -> bool:
        return self.history.undo()

    def redo(self) -> bool:
        return self.history.redo()


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

        try:
            pyramid = Pyramid(list(raw.data))
        except ValueError as exc:
            raise UserError(f"labels layer '{raw.name}' cannot be written into: {exc}") from None
        return self.add(layer, pyramid)

    def disconnect(self) -> None:
        try:
            self._layers.events.removed.disconnect(self._on_removed)
        except (TypeError, ValueError, RuntimeError):
            pass

    def _on_removed(self, event) -> None:
        raw = unwrap(getattr(event, "value", None))
        self._pyramids.pop(id(raw), None)
