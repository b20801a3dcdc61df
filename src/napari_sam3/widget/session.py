"""The annotation session: the state every section shares, and signals saying what changed.

One :class:`Session` per dock widget. It owns the loaded tracker and concept
detector, the current object id, the post-processing settings, the tiling the user
chose and the last concept / everything result. Sections read it, change it through
its setters and listen to its signals; none of them holds a copy of this state.
It needs no viewer (``viewer=None`` works for sections that do not touch layers).
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass

from qtpy.QtCore import QObject, Signal

from ..core.defaults import MAX_ID
from .errors import log, qt_deleted


def wrappable(text: str) -> str:
    """``text`` with break opportunities (zero-width spaces) after path separators, so a
    long path wraps in napari's pop-up instead of cutting the line at its first character."""
    return re.sub(r"([/\\\\])(?=\S)", "\\1\u200b", text)


@dataclass(frozen=True)
class PostSettings:
    """Clean-up of every mask before it is written (see ``core.postprocess``)."""

    max_hole_area: int = 0
    max_sprinkle_area: int = 0
    overwrite: bool = False  # write over other objects' pixels


class Session(QObject):
    """State of one dock widget; every change is announced by a signal."""

    status_changed = Signal(str)  # the status line
    model_changed = Signal(object)  # the new Sam3Segmenter
    object_changed = Signal(int)  # the current object id
    settings_changed = Signal()  # post-processing settings
    run_changed = Signal(object)  # the last concept / everything run (or None)
    # a labels layer and the region written (a tuple of slices, None: anywhere), after a
    # commit, a propagation slice, a concept / everything write or an edit was recorded
    labels_recorded = Signal(object, object)
    _warning = Signal(str)  # cache warnings from worker threads, shown on the GUI thread

    def __init__(self, viewer=None, parent=None):
        super().__init__(parent)
        from ..core.postprocess import DEFAULTS

        self.viewer = viewer
        self.segmenter = None  # Sam3Segmenter once a model is loaded
        self.concept = None  # ConceptSegmenter, loaded on the first Find concept
        self.concept_key: tuple | None = None  # (segmenter, concept model) it is for
        self.model_lock = threading.Lock()  # one worker uses the model at a time
        self.tiling: tuple[int, int] | None = None  # (tile, overlap) chosen by the user
        self.cache_path: str | None = None  # embedding cache folder (None: memory only)
        self._max_written = weakref.WeakKeyDictionary()  # labels layer -> largest id written
        self.closed = False
        self._object_id = 1
        self._post = PostSettings(DEFAULTS.max_hole_area, DEFAULTS.max_sprinkle_area, False)
        self._last_run = None
        self._closers: list = []
        self._warning.connect(self._on_warning)

    # -- status ------------------------------------------------------------------------------
    def status(self, text: str) -> None:
        """One line in the status line (no notification)."""
        self.status_changed.emit(text)

    def report(self, message: str, level: str = "error") -> None:
        """One line in the status line and a napari notification with the whole text."""
        from napari.utils import notifications

        self.status(message)
        {
            "error": notifications.show_error,
            "warning": notifications.show_warning,
            "info": notifications.show_info,
        }[level](wrappable(message))

    def warning_callback(self):
        """``on_cache_warning`` for the core: callable from any thread."""
        ref = weakref.ref(self)

        def warn(message: str) -> None:
            session = ref()
            if session is None or session.closed or qt_deleted(session):
                log.warning("SAM3: %s", message)
                return
            session._warning.emit(str(message))

        return warn

    def _on_warning(self, message: str) -> None:
        if not self.closed:
            self.report(f"SAM3: {message}", "warning")

    # -- model ---------------------------------------------------------------------------------
    def set_segmenter(self, segmenter) -> None:
        self.segmenter = segmenter
        if self.concept_key is not None and self.concept_key[0] is not segmenter:
            self.concept, self.concept_key = None, None
        self.model_changed.emit(segmenter)

    def set_concept(self, concept, key: tuple) -> None:
        """Keep the concept detector loaded for ``key`` (if it is for the current model)."""
        if key and key[0] is self.segmenter:
            self.concept, self.concept_key = concept, key

    def checked_tiling(self) -> tuple[int | None, int | None]:
        """(tile, overlap) the user chose, or (None, None) for the model's defaults."""
        from .errors import UserError

        if self.tiling is None:
            return None, None
        tile, overlap = self.tiling
        if not 0 <= overlap < tile:
            raise UserError(f"tile overlap {overlap} px must be smaller than the tile ({tile})")
        return tile, overlap

    def sync_tiling(self) -> None:
        """Apply the user's tile size and overlap to the loaded model; call it only while
        no worker uses the model (before starting a job)."""
        seg = self.segmenter
        tile, overlap = self.checked_tiling()
        if seg is not None and tile is not None and (tile, overlap) != (seg.tile_size,
                                                                      seg.overlap):
            seg.tile_size, seg.overlap = tile, overlap

    # -- object, settings, results -----------------------------------------------------------
    @property
    def object_id(self) -> int:
        return self._object_id

    @object_id.setter
    def object_id(self, value: int) -> None:
        value = int(min(max(int(value), 1), MAX_ID))
        if value != self._object_id:
            self._object_id = value
            self.object_changed.emit(value)

    @property
    def post(self) -> PostSettings:
        return self._post

    @post.setter
    def post(self, settings: PostSettings) -> None:
        if settings != self._post:
            self._post = settings
            self.settings_changed.emit()

    @property
    def last_run(self):
        """The last concept / everything result written (None once cleared or stale)."""
        return self._last_run

    @last_run.setter
    def last_run(self, run) -> None:
        if run is not self._last_run:
            self._last_run = run
            self.run_changed.emit(run)

    def wrote(self, labels, max_id: int) -> None:
        """The widget wrote ids up to ``max_id`` into the layer ``labels``."""
        labels = getattr(labels, "__wrapped__", labels)
        self._max_written[labels] = max(self._max_written.get(labels, 0), int(max_id))

    def max_written(self, labels) -> int:
        """The largest id the widget wrote into ``labels`` (0: none)."""
        return self._max_written.get(getattr(labels, "__wrapped__", labels), 0)

    # -- lifetime ------------------------------------------------------------------------------
    def on_close(self, callback) -> None:
        """Run ``callback`` once when the session closes (a part disconnecting from napari)."""
        if self._closers is None:
            callback()
        else:
            self._closers.append(callback)

    def close(self) -> None:
        """The dock widget is gone: every part stops listening to napari."""
        if self._closers is None:
            return
        self.closed = True
        closers, self._closers = self._closers, None
        for callback in reversed(closers):
            try:
                callback()
            except Exception:  # noqa: BLE001 - disconnecting what may be gone
                log.debug("SAM3: closing a widget part failed", exc_info=True)
