"""The largest id of labels too large to read at once, found in a worker.

A labels layer from elsewhere (Cellpose, StarDist, an earlier run) that is a lazy Zarr or
dask array over :data:`~.scratch_labels.LARGE_PIXELS` is read chunk by chunk in a worker
when it is chosen (:func:`napari_sam3.core.planes.largest_label`); until that is done the
widget writes nothing into it, so a new object id never collides with its labels. The
widget's own scratch layers start empty and need no scan (it counts what it writes).
"""

from __future__ import annotations

import weakref

from qtpy.QtCore import QObject, Signal

from .image_source import unwrap


class LargestIds(QObject):
    """Scans of the largest id per labels layer (one worker at a time)."""

    found = Signal(object, int)  # the layer, its largest id

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self._found: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._worker = None
        self._layer = None
        session.on_close(self.stop)

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def known(self, layer) -> int | None:
        """The layer's largest id once scanned, else None."""
        return self._found.get(unwrap(layer))

    def scanning(self, layer) -> bool:
        return self._worker is not None and self._layer is unwrap(layer)

    def start(self, layer, data) -> None:
        """Scan ``data`` (the layer's full-resolution labels) unless already known."""
        from napari.qt.threading import create_worker

        from ..core.planes import iter_largest_label

        raw = unwrap(layer)
        if raw in self._found or self.scanning(raw):
            return
        self.stop()
        self._layer = raw
        name = raw.name
        self.session.status(f"Reading the largest id of '{name}' (chunk by chunk)...")
        worker = create_worker(iter_largest_label, data, _start_thread=False,
                               _ignore_errors=True)  # a generator: stop() ends it
        worker.returned.connect(lambda top: self._on_returned(raw, int(top)))
        worker.errored.connect(lambda exc: self._on_errored(name, exc))
        worker.finished.connect(lambda: self._on_finished(worker))
        self._worker = worker
        worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.quit()
        self._worker = self._layer = None

    def _on_returned(self, raw, top: int) -> None:
        if raw is not self._layer:
            return
        self._found[raw] = top
        self.session.status(f"Largest id in '{raw.name}': {top}; new objects get ids above it")
        self.found.emit(raw, top)

    def _on_errored(self, name: str, exc) -> None:
        self.session.report(f"SAM3: cannot read the labels of '{name}': {exc}", "warning")

    def _on_finished(self, worker) -> None:
        if worker is self._worker:
            self._worker = self._layer = None
