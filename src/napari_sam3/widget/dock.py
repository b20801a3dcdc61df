"""The dock widget: assembles the sections around one session; nothing else lives here.

Nothing heavy is imported: torch and transformers load when a model is loaded (in a
worker thread), so napari starts as fast as without the plugin.

Layout: the everyday loop (the Object section, progress and the status line) stays
visible at the bottom; the other sections are collapsible, in a scroll area, so the
widget works on a 1366x768 laptop screen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtWidgets import QLabel, QProgressBar, QScrollArea, QSizePolicy, QVBoxLayout, QWidget
from superqt import QCollapsible

from .binder import LayerBinder
from .encoded_overlay import EncodedOverlay
from .runner import JobRunner
from .sections.cache import CacheSection
from .sections.instances import InstancesSection
from .sections.layers import LayersSection
from .sections.model import ModelSection
from .sections.object import ObjectSection
from .sections.post import PostSection
from .sections.propagate import PropagateSection
from .sections.session import SessionSection
from .session import Session
from .session_store import SessionStore, WidgetSettings

if TYPE_CHECKING:
    import napari

# (attribute, title, expanded at start)
SECTIONS = (
    ("model_section", "Model", True),
    ("layers_section", "Layers", True),
    ("session_section", "Session", False),
    ("cache_section", "Cache and large images", False),
    ("propagate_section", "Propagate (z-stacks, time series)", False),
    ("instances_section", "Segment everything / concepts", False),
    ("post_section", "Post-processing", False),
)


class VerticalScrollArea(QScrollArea):
    """Scrolls up and down only: at least as wide as its content, so nothing is cut off
    on the right of a narrow dock."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        inner = self.widget()
        if inner is None:
            return hint
        width = (inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
                 + 2 * self.frameWidth())
        return QSize(max(hint.width(), width), hint.height())

    def eventFilter(self, obj, ev) -> bool:
        # the content's minimum width changes when napari's style is applied (on Show)
        if obj is self.widget() and ev.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Show):
            self.updateGeometry()
        return super().eventFilter(obj, ev)


class Sam3Widget(QWidget):
    """SAM3 promptable segmentation of the chosen image, 2D or a stack.

    Parts (public, for scripts and tests): ``session`` (state: ``segmenter``,
    ``object_id``, ``concept``, ``last_run``), ``runner`` (workers), ``binder`` (layers),
    and the sections ``model_section``, ``layers_section``, ``cache_section``,
    ``object_section``, ``propagate_section``, ``instances_section``, ``post_section``,
    ``session_section`` (over ``store``: save, open, autosave); ``status`` is the status
    line's text.
    """

    _docked = False  # Qt sends events during construction: class defaults
    _fit_pending = False

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session = Session(napari_viewer, self)
        self.runner = runner = JobRunner(session, self)
        self.binder = binder = LayerBinder(session, napari_viewer, self)
        self.model_section = ModelSection(session, runner)
        self.layers_section = LayersSection(session, binder)
        self.cache_section = CacheSection(session, runner, binder)
        self.object_section = ObjectSection(session, runner, binder)
        self.propagate_section = PropagateSection(session, runner, binder)
        self.instances_section = InstancesSection(session, runner, binder)
        self.post_section = PostSection(session)
        self.encoded_overlay = EncodedOverlay(session, runner, binder, self)
        self.store = SessionStore(session, binder, WidgetSettings(
            self.model_section, self.cache_section, self.post_section,
            self.propagate_section, self.instances_section), self)
        self.session_section = SessionSection(session, self.store)
        self._build()
        self.store.offer.connect(self._on_offer)
        session.status_changed.connect(self.status_label.setText)
        runner.changed.connect(self._update_progress)
        self._keys = self.object_section.bind_keys(napari_viewer)
        session.on_close(self._unbind_keys)
        self._docked = False
        self._fit_pending = False
        self._camera = self._camera_state()
        session.status("Load a model, choose an image, then click points or draw a box.")

    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        inner = QWidget()
        column = QVBoxLayout(inner)
        column.setContentsMargins(0, 0, 0, 0)
        self.collapsibles: dict[str, QCollapsible] = {}
        for attr, title, expanded in SECTIONS:
            box = QCollapsible(title)
            box.addWidget(getattr(self, attr))
            if expanded:
                box.expand(animate=False)
            else:
                box.collapse(animate=False)
            self.collapsibles[attr] = box
            column.addWidget(box)
        column.addStretch(1)
        scroll = VerticalScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.scroll_area = scroll
        root.addWidget(scroll, 1)
        loop = QCollapsible("Object")
        loop.addWidget(self.object_section)
        loop.expand(animate=False)
        self.collapsibles["object_section"] = loop
        root.addWidget(loop)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumHeight(8)
        root.addWidget(self.progress_bar)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        root.addWidget(self.status_label)

    # -- status ----------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.status_label.text()

    @property
    def busy(self) -> bool:
        """True while a live update or a threshold rewrite is scheduled or any worker runs."""
        return (self.runner.busy or self.object_section.clicks.busy or self.binder.busy
                or self.instances_section.busy or self.store.busy or self.cache_section.busy)

    def cancel(self) -> bool:
        return self.object_section.cancel()

    def _on_offer(self, folder) -> None:
        if folder is not None and not self.session.closed:  # the Restore row in view
            self.collapsibles["session_section"].expand(animate=False)

    def _update_progress(self) -> None:
        progress, bar = self.runner.progress, self.progress_bar
        if progress is None:
            bar.setRange(0, 1)
            bar.setValue(0)
        else:
            done, total = progress
            bar.setRange(0, total)
            bar.setValue(done)

    # -- lifetime in napari's dock ---------------------------------------------------------------
    def _camera_state(self):
        scene = getattr(self.viewer, "scene", None)
        camera = self.viewer.camera if scene is None else scene.camera
        return tuple(camera.center), float(camera.zoom)

    def event(self, ev) -> bool:
        """Docked: fit the image to the smaller canvas once, after the layout pass that
        sizes the dock and the canvas (if the user did not move the view). napari's dock
        X reparents the widget to None: close the session then."""
        kind = ev.type()
        if kind == QEvent.Type.ParentChange and "session" in self.__dict__:
            if self.parent() is not None:
                if not self._docked:
                    self._docked = self._fit_pending = True
            elif self._docked and not self.session.closed:
                self.session.close()
        elif kind == QEvent.Type.Resize and self._fit_pending:
            QTimer.singleShot(0, self._fit_view)
        return super().event(ev)

    def _fit_view(self) -> None:
        self._fit_pending = False
        if self.session.closed or not len(self.viewer.layers):
            return
        if self._camera_state() == self._camera:
            self.viewer.reset_view()

    def _unbind_keys(self) -> None:
        for key in self._keys:
            try:
                self.viewer.bind_key(key, None, overwrite=True)
            except Exception:  # noqa: BLE001 - viewer already closing
                pass
