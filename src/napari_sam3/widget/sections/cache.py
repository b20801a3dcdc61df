"""Cache section: where embeddings are kept, the tiling of large images, precompute."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ...core import planes
from ...core.defaults import DEFAULT_OVERLAP, DEFAULT_TILE
from ...core.prompts import PromptError
from .. import layer_data
from ..errors import UserError, guarded
from ..image_source import same, unwrap
from ..tasks import PrecomputeTask

PRECOMPUTE_SCOPES = ("field of view", "whole image", "all slices")


class CacheSection(QWidget):
    """Cache folder, tile size and overlap, *Precompute*."""

    def __init__(self, session, runner, binder, parent=None):
        from ...core.embedding_store import default_cache_path

        super().__init__(parent)
        self.session, self.runner, self.binder = session, runner, binder
        self._showing_model = False
        self._limits_worker = None  # the recorded-limits lookup of the chosen image
        session.on_close(self._stop_limits_lookup)
        form = QFormLayout(self)
        self.cache_edit = QLineEdit(str(default_cache_path()))
        self.cache_edit.setPlaceholderText("empty: embeddings in memory only")
        self.cache_edit.setToolTip(
            "Zarr folder where image embeddings are kept between sessions (used when the "
            "model is loaded); empty: memory only"
        )
        self.cache_edit.textChanged.connect(self._on_cache_edited)
        form.addRow("Cache", self.cache_edit)
        row = QHBoxLayout()
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 65536)
        self.tile_spin.setValue(DEFAULT_TILE)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip(
            "Images larger than this are split into tiles (default: the model's input size, "
            f"{DEFAULT_TILE} px for SAM3)"
        )
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 65535)
        self.overlap_spin.setValue(DEFAULT_OVERLAP)
        self.overlap_spin.setSuffix(" px")
        self.overlap_spin.setToolTip(
            "Overlap of neighbouring tiles (default: a quarter of the tile): objects up to "
            "this size are never cut"
        )
        for spin in (self.tile_spin, self.overlap_spin):
            spin.valueChanged.connect(self._on_tiling_edited)
        row.addWidget(self.tile_spin)
        row.addWidget(QLabel("overlap"))
        row.addWidget(self.overlap_spin)
        form.addRow("Tiles", row)
        row = QHBoxLayout()
        self.precompute_combo = QComboBox()
        self.precompute_combo.addItems(PRECOMPUTE_SCOPES)
        self.precompute_combo.setToolTip(
            "field of view: the tiles visible now; whole image: every tile of the current "
            "slice; all slices: every slice along the propagation axis"
        )
        self.precompute_button = QPushButton("Precompute")
        self.precompute_button.setToolTip("Encode tiles ahead of clicks (Cancel stops)")
        self.precompute_button.clicked.connect(self._on_precompute_clicked)
        row.addWidget(self.precompute_combo)
        row.addWidget(self.precompute_button)
        form.addRow(row)
        self.scheduler_edit = QLineEdit()
        self.scheduler_edit.setPlaceholderText("optional: tcp://HOST:PORT")
        self.scheduler_edit.setToolTip(
            "Address of a running dask scheduler: Precompute then encodes the tiles on its "
            "workers (the cache folder must be one they can write); empty: in napari"
        )
        form.addRow("Scheduler", self.scheduler_edit)
        self._on_cache_edited(self.cache_edit.text())
        session.model_changed.connect(self._on_model_changed)
        session.model_changed.connect(self._on_role_changed)
        binder.role_changed.connect(self._on_role_changed)
        runner.task_started.connect(lambda *_: self.precompute_button.setEnabled(False))
        runner.task_finished.connect(lambda *_: self.precompute_button.setEnabled(True))

    @guarded
    def _on_cache_edited(self, text: str) -> None:
        self.session.cache_path = text.strip() or None

    @guarded
    def _on_tiling_edited(self, *_) -> None:
        if self._showing_model:
            return
        self.session.tiling = (int(self.tile_spin.value()), int(self.overlap_spin.value()))
        if self.session.segmenter is not None:
            self.session.status(
                f"Tiles of {self.tile_spin.value()} px overlapping by "
                f"{self.overlap_spin.value()} px from the next job on"
            )

    @guarded
    def _on_model_changed(self, segmenter) -> None:
        """Show the loaded model's tiling (unless the user chose other values)."""
        if self.session.tiling is not None:
            return
        self._showing_model = True
        try:
            self.tile_spin.setValue(int(segmenter.tile_size))
            self.overlap_spin.setValue(int(segmenter.overlap))
        finally:
            self._showing_model = False

    @guarded
    def _on_role_changed(self, role) -> None:
        """The image or the model changed: adopt the image's recorded limits, if any."""
        if role == "image" or not isinstance(role, str):
            self.adopt_recorded_limits()

    @property
    def busy(self) -> bool:
        """True while the chosen image's recorded limits are looked up."""
        return self._limits_worker is not None

    def adopt_recorded_limits(self) -> bool:
        """Offer the chosen image the intensity limits its last precompute recorded in the
        cache (CLI, API or widget, on any machine and path), so its tiles are found: a
        notification with a *Use them* button, while the layer has the contrast limits
        napari gave it; nothing changes unless it is pressed. The lookup reads a few
        windows of the image (its identity), in a worker. Returns whether one started."""
        from napari.qt.threading import create_worker

        from ...core.distributed import recorded_limits
        from ..image_source import level0, wants_recorded_contrast

        seg, layer = self.session.segmenter, self.binder.image_layer
        self._stop_limits_lookup()
        if seg is None or layer is None or self.binder.channels:
            return False
        store = seg.store
        if store is None or store.path is None or not store.has_records():
            return False  # (no pixels read: asked on every image choice)
        if not wants_recorded_contrast(layer):
            return False
        worker = create_worker(recorded_limits, store, level0(unwrap(layer)),
                               _start_thread=False)
        worker.returned.connect(lambda found: self._offer_limits(layer, found))
        worker.errored.connect(lambda _exc: None)  # unreadable: the layer's limits stay
        worker.finished.connect(lambda: self._limits_done(worker))
        self._limits_worker = worker
        worker.start()
        return True

    def _stop_limits_lookup(self) -> None:
        if self._limits_worker is not None:
            self._limits_worker.quit()
            self._limits_worker = None

    def _limits_done(self, worker) -> None:
        if worker is self._limits_worker:
            self._limits_worker = None

    @guarded
    def _offer_limits(self, layer, found) -> None:
        from ..image_source import recorded_contrast

        if (self.session.closed or not self.binder.alive(layer)
                or not same(layer, self.binder.image_layer)):
            return
        found = recorded_contrast(layer, lambda _data: found)
        if found is None:
            return
        from napari.utils import notifications
        from napari.utils.notifications import Notification, NotificationSeverity

        text = (f"SAM3: this image was precomputed with intensity limits {found[0]:g}-"
                f"{found[1]:g} (recorded in the cache); use them as its contrast limits so "
                "its encoded tiles are reused?")

        def use(*_):
            if self.binder.alive(layer):
                unwrap(layer).contrast_limits = found
                self.session.status(f"Contrast limits {found[0]:g}-{found[1]:g} of this "
                                    "image's precompute: its encoded tiles are reused")

        self.session.status(text.removeprefix("SAM3: "))
        notifications.notification_manager.dispatch(
            Notification(text, severity=NotificationSeverity.INFO, actions=[("Use them", use)]))

    def precompute(self, scope: str | None = None) -> bool:
        """Encode tiles ahead of clicks in a worker, with progress and Cancel.

        ``scope`` (default: the combo's choice): "field of view" (the tiles of the
        current plane visible on the canvas), "whole image" (every tile of the current
        plane) or "all slices" (every plane along the propagation axis). Tiles already
        cached are not encoded again; a cancelled run keeps the tiles it finished.
        """
        scope = scope or self.precompute_combo.currentText()
        if scope not in PRECOMPUTE_SCOPES:
            raise ValueError(f"scope must be one of {PRECOMPUTE_SCOPES}")
        session, binder = self.session, self.binder
        try:
            self.runner.check_idle()
            if session.segmenter is None:
                raise UserError("no SAM3 model loaded: click 'Load model' first")
            src = binder.source()
            if self.runner.current_worker is None:  # a click may be between steps
                session.sync_tiling()
            lead = binder.current_slice(src)
            if scope == "field of view":
                jobs = [(src.plane_at(lead), src.limits, binder.field_of_view(src))]
            elif scope == "all slices" and src.n_lead:
                axis, fixed = binder.propagation_axis(src)
                view = planes.AxisView(src.data, axis, fixed, src.n_lead)
                jobs = [(src.plane_at(view.lead(k)), src.limits, None)
                        for k in range(view.shape[0])]
            else:
                jobs = [(src.plane_at(lead), src.limits, None)]
        except (UserError, layer_data.LayerError, PromptError) as exc:
            session.report(f"SAM3: {exc}")
            return False
        session.status(f"Precomputing ({scope})...")
        self.runner.start(PrecomputeTask(session, jobs, self.scheduler_edit.text().strip()))
        return True

    @guarded
    def _on_precompute_clicked(self, *_) -> None:
        self.precompute()
