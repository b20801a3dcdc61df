"""Loading the model, the embedding cache's warnings, and the tiling of large images."""

from __future__ import annotations

import weakref

from ._widget_errors import _guarded, _qt_deleted, _user_message, _UserError, log
from ._widget_jobs import _load_segmenter

DEFAULT_MODEL = "facebook/sam3"  # same as model.DEFAULT_MODEL (kept literal: no import cost)


class _ModelMixin:
    """Model loading (in a worker), cache warnings and tile size / overlap."""

    def load_model(self, blocking: bool = False):
        """Load the model named in the line edit on the chosen device, with the cache
        location and tiling of the Cache section.

        Runs in a worker thread (returned) unless ``blocking``. A failure keeps
        the previous model and reports one line.
        """
        model = self.model_edit.text().strip() or DEFAULT_MODEL
        device = self.device_combo.currentText()
        if self.load_worker is not None:
            self._set_status("A model is already loading...")
            return self.load_worker
        try:
            tile, overlap = self._tiling_request()
        except _UserError as exc:
            self._report(f"SAM3: {exc}")
            return None
        cache = self.cache_edit.text().strip() or None
        args = (model, device, cache, tile, overlap, self._cache_warning_callback())
        self._set_status(f"Loading {model} on {device}...")
        if blocking:
            try:
                seg = _load_segmenter(*args)
            except Exception as exc:  # noqa: BLE001 - reported
                self._on_model_error(exc)
            else:
                self._on_model_loaded(seg)
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(_load_segmenter, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_model_loaded)
        worker.errored.connect(self._on_model_error)
        worker.finished.connect(self._on_model_finished)
        self.load_worker = worker
        self.load_button.setEnabled(False)
        self._update_progress()
        worker.start()
        return worker

    def _cache_warning_callback(self):
        """``on_cache_warning`` for the core: called from any thread, shown on the GUI
        thread as a napari warning."""
        ref = weakref.ref(self)

        def warn(message: str) -> None:
            widget = ref()
            if widget is None or _qt_deleted(widget):
                log.warning("SAM3: %s", message)
                return
            widget._cache_warning.emit(str(message))

        return warn

    @_guarded
    def _on_cache_warning(self, message: str) -> None:
        self._report(f"SAM3: {message}", "warning")

    def _tiling_request(self) -> tuple[int | None, int | None]:
        """(tile size, overlap) for loading: None, None (the model's defaults) until the
        user changes them."""
        if not self._tiling_custom:
            return None, None
        tile, overlap = int(self.tile_spin.value()), int(self.overlap_spin.value())
        if not 0 <= overlap < tile:
            raise _UserError(f"tile overlap {overlap} px must be smaller than the tile ({tile})")
        return tile, overlap

    @_guarded
    def _on_tiling_edited(self, *_) -> None:
        if self._setting_tiling:
            return
        self._tiling_custom = True
        if self.segmenter is not None:
            self._set_status(
                f"Tiles of {self.tile_spin.value()} px overlapping by "
                f"{self.overlap_spin.value()} px from the next job on"
            )

    def _show_tiling(self, segmenter) -> None:
        """Show the loaded model's defaults (unless the user chose other values)."""
        if self._tiling_custom:
            return
        self._setting_tiling = True
        try:
            self.tile_spin.setValue(int(segmenter.tile_size))
            self.overlap_spin.setValue(int(segmenter.overlap))
        finally:
            self._setting_tiling = False

    def _sync_tiling(self) -> None:
        """Apply edited tile settings to the loaded model while no worker uses it."""
        seg = self.segmenter
        if seg is None or self.current_worker is not None or self.task is not None:
            return
        tile, overlap = self._tiling_request()
        if tile is not None and (tile, overlap) != (seg.tile_size, seg.overlap):
            seg.tile_size, seg.overlap = tile, overlap

    @_guarded
    def _on_load_clicked(self, *_) -> None:
        self.load_model()

    @_guarded
    def _on_model_loaded(self, segmenter) -> None:
        self.segmenter = segmenter
        if self._concept_key is not None and self._concept_key[0] is not segmenter:
            self._concept, self._concept_key = None, None
        self._warned_no_model = False
        self._show_tiling(segmenter)
        store = getattr(segmenter, "store", None)
        where = getattr(store, "path", None)
        cache = f"cache {where}" if where is not None else "embeddings in memory"
        self._set_status(f"Model {segmenter.model_id} loaded on {segmenter.device} ({cache})")
        if self._preview is None and self.object_id in self._prompt_ids_in_layers():
            self._schedule()

    @_guarded
    def _on_model_error(self, exc) -> None:
        from .core.model import ModelLoadError

        msg = _user_message(exc)
        if not isinstance(exc, ModelLoadError):
            msg = f"cannot load model '{self.model_edit.text().strip()}': {msg}"
        self._report(f"SAM3: {msg}")

    @_guarded
    def _on_model_finished(self, *_) -> None:
        self.load_worker = None
        self.load_button.setEnabled(True)
        self._update_progress()
