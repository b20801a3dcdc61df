"""Concepts section: Find concept (text and/or exemplars), Segment everything, threshold.

Every instance found gets its own id above every existing label and prompt id; the
labels under the result are kept, so moving the threshold re-filters the last concept
result and rewrites it (one undo step) without running the model, and *Clear last
result* restores them. Over a stack the scope "whole stack" runs slice by slice along
the propagation axis and writes every slice at the end.
"""

from __future__ import annotations

import functools

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QWidget,
)

from ...core import planes
from ...core.defaults import DEFAULT_MIN_SCORE, DEFAULT_THRESHOLD, MAX_ID
from ...core.prompts import PromptError
from .. import layer_data, results
from ..binder import EXEMPLARS_NAME
from ..errors import UserError, guarded
from ..tasks import ConceptTask, EverythingTask
from .layers import fill_combo

INSTANCE_SCOPES = ("current slice", "whole stack")
THRESHOLD_DEBOUNCE_MS = 40


def _spin(cls, lo, hi, value, tip, decimals=None, suffix=""):
    spin = cls()
    spin.setRange(lo, hi)
    if decimals is not None:
        spin.setDecimals(decimals)
        spin.setSingleStep(0.01)
    spin.setValue(value)
    spin.setToolTip(tip)
    if suffix:
        spin.setSuffix(suffix)
    return spin


class InstancesSection(QWidget):
    """Concept text, exemplars, threshold, *Find concept*; grid settings, *Segment
    everything*; *Clear last result*."""

    def __init__(self, session, runner, binder, parent=None):
        from ...core.everything import SETTINGS

        super().__init__(parent)
        self.session, self.runner, self.binder = session, runner, binder
        form = QFormLayout(self)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(INSTANCE_SCOPES)
        self.scope_combo.setToolTip(
            "Stacks: the current slice, or every slice along the propagation axis (written "
            "when all are done)"
        )
        self.scope_combo.setEnabled(False)
        form.addRow("Scope", self.scope_combo)
        self.concept_text_edit = QLineEdit()
        self.concept_text_edit.setPlaceholderText("e.g. nucleus")
        self.concept_text_edit.setToolTip(
            "A short noun phrase (nucleus, mitochondrion, cell); may be empty with exemplars"
        )
        self.concept_text_edit.returnPressed.connect(self._on_find_concept_clicked)
        form.addRow("Concept", self.concept_text_edit)
        self.concept_model_edit = QLineEdit()
        self.concept_model_edit.setPlaceholderText("same as Model above")
        self.concept_model_edit.setToolTip(
            "SAM3 checkpoint with the concept detector (Sam3Model): a hub id or a local "
            "folder; empty: the model loaded above (facebook/sam3 holds both). Loaded on "
            "first use"
        )
        form.addRow("Concept model", self.concept_model_edit)
        row = QHBoxLayout()
        self.exemplars_combo = QComboBox()
        self.exemplars_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.exemplars_combo.setToolTip(
            f"Shapes layer whose rectangles are exemplars ('{EXEMPLARS_NAME}')")
        self.exemplars_combo.currentIndexChanged.connect(self._on_exemplars_combo)
        self.draw_exemplars_button = QPushButton("Draw")
        self.draw_exemplars_button.setToolTip(
            f"Draw rectangles around example objects in '{EXEMPLARS_NAME}' (created if "
            "needed); key t toggles positive / negative"
        )
        self.draw_exemplars_button.clicked.connect(self._on_draw_exemplars_clicked)
        row.addWidget(self.exemplars_combo, 1)
        row.addWidget(self.draw_exemplars_button)
        form.addRow("Exemplars", row)
        self.exemplar_positive_checkbox = QCheckBox("New exemplars are positive (t toggles)")
        self.exemplar_positive_checkbox.setChecked(True)
        self.exemplar_positive_checkbox.toggled.connect(self._on_exemplar_positive_toggled)
        form.addRow(self.exemplar_positive_checkbox)
        row = QHBoxLayout()
        tip = ("Keep instances scoring above this; moving it re-filters the last concept "
               "result without running the model")
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 1000)
        self.threshold_slider.setValue(round(DEFAULT_THRESHOLD * 1000))
        self.threshold_slider.setToolTip(tip)
        self.threshold_spin = _spin(QDoubleSpinBox, 0.0, 1.0, DEFAULT_THRESHOLD, tip, 3)
        self.threshold_slider.valueChanged.connect(self._on_threshold_slider)
        self.threshold_spin.valueChanged.connect(self._on_threshold_changed)
        row.addWidget(self.threshold_slider, 1)
        row.addWidget(self.threshold_spin)
        form.addRow("Threshold", row)
        self.find_concept_button = QPushButton("Find concept")
        self.find_concept_button.setToolTip(
            "Every instance of the text and/or exemplars, each with its own label id")
        self.find_concept_button.clicked.connect(self._on_find_concept_clicked)
        form.addRow(self.find_concept_button)
        self.points_per_side_spin = _spin(
            QSpinBox, 1, 256, SETTINGS.points_per_side,
            "Grid of point prompts per tile side (raise it for small, dense cells)")
        form.addRow("Points per side", self.points_per_side_spin)
        self.pred_iou_spin = _spin(QDoubleSpinBox, 0.0, 1.0, SETTINGS.pred_iou_thresh,
                                   "Keep masks whose predicted IoU is above this", 3)
        form.addRow("Pred IoU threshold", self.pred_iou_spin)
        self.stability_spin = _spin(
            QDoubleSpinBox, 0.0, 1.0, SETTINGS.stability_score_thresh,
            "Keep masks that change little when the mask threshold moves", 3)
        form.addRow("Stability threshold", self.stability_spin)
        self.min_area_spin = _spin(QSpinBox, 0, MAX_ID, SETTINGS.min_area,
                                   "Drop objects smaller than this", suffix=" px")
        form.addRow("Min area", self.min_area_spin)
        self.everything_button = QPushButton("Segment everything")
        self.everything_button.setToolTip(
            "Every object the point grid finds, without a concept (uses the embedding cache)")
        self.everything_button.clicked.connect(self._on_everything_clicked)
        form.addRow(self.everything_button)
        row = QHBoxLayout()
        self.clear_result_button = QPushButton("Clear last result")
        self.clear_result_button.setToolTip(
            "Restore the labels the last concept / everything result was written over")
        self.clear_result_button.clicked.connect(self._on_clear_result_clicked)
        self.instances_cancel_button = QPushButton("Cancel")
        self.instances_cancel_button.setToolTip("Stop the running job; the labels stay unchanged")
        self.instances_cancel_button.clicked.connect(self._on_cancel_clicked)
        row.addWidget(self.clear_result_button)
        row.addWidget(self.instances_cancel_button)
        form.addRow(row)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(THRESHOLD_DEBOUNCE_MS)
        self._threshold_timer.timeout.connect(self._on_threshold_timeout)
        self._buttons = (self.find_concept_button, self.everything_button,
                         self.clear_result_button)
        runner.task_started.connect(functools.partial(self._set_buttons, False))
        runner.task_finished.connect(functools.partial(self._set_buttons, True))
        binder.layers_changed.connect(self._refill_exemplars)
        binder.role_changed.connect(self._on_role_changed)
        binder.exemplar_polarity_key.connect(self.toggle_exemplar_polarity)
        session.on_close(self._threshold_timer.stop)
        self._refill_exemplars()

    @property
    def busy(self) -> bool:
        return self._threshold_timer.isActive()

    def _set_buttons(self, enabled: bool, *_) -> None:
        for b in self._buttons:
            b.setEnabled(enabled)

    # -- exemplars -------------------------------------------------------------------------------
    @property
    def exemplar_positive(self) -> bool:
        return self.exemplar_positive_checkbox.isChecked()

    @guarded
    def _refill_exemplars(self) -> None:
        fill_combo(self.exemplars_combo, self.binder.candidates("exemplars"),
                   self.binder.exemplars_layer, "(none)")

    @guarded
    def _on_role_changed(self, role: str) -> None:
        if role == "exemplars":
            self._refill_exemplars()
        elif role == "image":
            self.session.last_run = None  # the threshold no longer moves another image's result
            try:
                src = self.binder.source() if self.binder.image_layer is not None else None
            except (UserError, layer_data.LayerError):
                src = None
            self.scope_combo.setEnabled(bool(src is not None and src.n_lead))

    @guarded
    def _on_exemplars_combo(self, *_) -> None:
        self.binder.choose("exemplars", self.exemplars_combo.currentData())

    def draw_exemplars(self):
        """Make the exemplars layer (created as "SAM3 exemplars" if none is chosen) active
        in rectangle mode; returns it."""
        binder, viewer = self.binder, self.binder.viewer
        src = binder.source()
        layer = binder.exemplars_layer
        if layer is None:
            layer = next((ly for ly in binder.candidates("exemplars")
                          if ly.name == EXEMPLARS_NAME and ly.ndim == src.ndim), None)
            if layer is None:
                color = (layer_data.POSITIVE_COLOR if self.exemplar_positive
                         else layer_data.NEGATIVE_COLOR)
                layer = viewer.add_shapes(
                    ndim=src.ndim, name=EXEMPLARS_NAME, edge_color=[color],
                    face_color="transparent", edge_width=max(1.0, max(src.plane) / 300),
                    features={"positive": np.zeros(0, bool)},
                    feature_defaults={"positive": self.exemplar_positive},
                    scale=src.layer.scale, translate=src.layer.translate,
                )
            binder.choose("exemplars", layer)
        viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self.session.status(
            f"Draw rectangles around example objects in '{layer.name}' "
            f"({'positive' if self.exemplar_positive else 'negative'}; key t toggles)"
        )
        return layer

    @guarded
    def _on_draw_exemplars_clicked(self, *_) -> None:
        try:
            self.draw_exemplars()
        except (UserError, layer_data.LayerError) as exc:
            self.session.report(f"SAM3: {exc}")

    def toggle_exemplar_polarity(self) -> bool:
        """Flip the polarity of new exemplars and of the selected ones; returns the new one."""
        self.exemplar_positive_checkbox.setChecked(not self.exemplar_positive)
        return self.exemplar_positive

    @guarded
    def _on_exemplar_positive_toggled(self, checked: bool) -> None:
        flipped = self.binder.set_exemplar_positive(checked)  # also before the layer exists
        self.session.status(
            f"New exemplars are {'positive' if checked else 'negative'}"
            + (f"; {flipped} selected exemplar(s) flipped" if flipped else "")
        )

    # -- runs ------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.threshold_spin.value())

    def everything_settings(self):
        """``EverythingSettings`` from the section's parameters and the post-processing ones."""
        from ...core.everything import EverythingSettings

        post = self.session.post
        return EverythingSettings(
            points_per_side=int(self.points_per_side_spin.value()),
            pred_iou_thresh=float(self.pred_iou_spin.value()),
            stability_score_thresh=float(self.stability_spin.value()),
            min_area=int(self.min_area_spin.value()),
            max_hole_area=post.max_hole_area,
            max_sprinkle_area=post.max_sprinkle_area,
        )

    def _checks(self):
        self.runner.check_idle()
        if self.session.segmenter is None:
            raise UserError("no SAM3 model loaded: click 'Load model' first")
        src = self.binder.source()
        if self.runner.current_worker is None:  # a click may be between steps
            self.session.sync_tiling()
        return src, self.binder.labels_for(src)

    def _scope_leads(self, src, scope: str) -> tuple[list[tuple], int]:
        """The slices a run covers and the axis they run along."""
        if scope not in INSTANCE_SCOPES:
            raise ValueError(f"scope must be one of {INSTANCE_SCOPES}")
        if scope == "whole stack" and src.n_lead:
            axis, fixed = self.binder.propagation_axis(src)
            view = planes.AxisView(src.data, axis, fixed, src.n_lead)
            return [view.lead(k) for k in range(view.shape[0])], axis
        return [self.binder.current_slice(src)], 0

    def find_concept(self, scope: str | None = None) -> bool:
        """Find every instance of the concept (text and/or exemplars) in a worker and write
        them into the labels layer, one id each.

        ``scope`` (default: the combo's): "current slice" or, for stacks, "whole stack".
        The concept detector is loaded on first use (same device, dtype, tiling and cache
        folder as the model above). Returns False (one line reported) when it cannot start.
        """
        session = self.session
        scope = scope or self.scope_combo.currentText()
        try:
            src, labels = self._checks()
            text = self.concept_text_edit.text().strip() or None
            leads, axis = self._scope_leads(src, scope)
            by_slice, ignored = self.binder.exemplar_prompts(src)
            exemplars = layer_data.exemplars_for_slices(by_slice, leads, axis)
            if text is None and all(ex is None for ex in exemplars):
                raise UserError(
                    "type a concept (e.g. nucleus) or draw exemplar rectangles "
                    f"('{EXEMPLARS_NAME}') first"
                )
        except (UserError, layer_data.LayerError, PromptError) as exc:
            session.report(f"SAM3: {exc}")
            return False
        planes = []
        for lead, ex in zip(leads, exemplars, strict=True):
            boxes, box_labels = ex if ex is not None else (None, None)
            planes.append((lead, src.plane_at(lead), boxes, box_labels))
        post = session.post
        options = {
            "threshold": self.threshold,
            "min_score": DEFAULT_MIN_SCORE,
            "limits": src.limits,
            "max_hole_area": post.max_hole_area,
            "max_sprinkle_area": post.max_sprinkle_area,
        }
        model = self.concept_model_edit.text().strip() or None
        key = (session.segmenter, model)
        holder = {}
        if session.concept is not None and session.concept_key == key:
            session.concept.tile_size = session.segmenter.tile_size
            session.concept.overlap = session.segmenter.overlap
            holder["concept"] = session.concept
        n_ex = sum(len(ex[0]) for ex in by_slice.values())
        if text and n_ex:
            source = f"concept '{text}' + exemplars"
        else:
            source = f"concept '{text}'" if text else "exemplars"
        task = ConceptTask(session, self.binder, model=model, planes=planes, text=text,
                           options=options, holder=holder, key=key, labels=labels,
                           source=source, n_lead=src.n_lead, spatial_shape=src.spatial_shape)
        task.threshold = lambda: self.threshold
        note = f" ({ignored} non-rectangle exemplar shape(s) ignored)" if ignored else ""
        session.status(f"Finding {source}...{note}")
        self.runner.start(task)
        return True

    @guarded
    def _on_find_concept_clicked(self, *_) -> None:
        self.find_concept()

    def segment_everything(self, scope: str | None = None) -> bool:
        """Segment every object (point grid, no concept) in a worker with the section's
        parameters and write them into the labels layer, one id each."""
        scope = scope or self.scope_combo.currentText()
        try:
            src, labels = self._checks()
            leads, _ = self._scope_leads(src, scope)
            settings = self.everything_settings()
        except (UserError, layer_data.LayerError, PromptError, ValueError) as exc:
            self.session.report(f"SAM3: {exc}")
            return False
        planes = [(lead, src.plane_at(lead)) for lead in leads]
        task = EverythingTask(self.session, self.binder, planes=planes, settings=settings,
                              limits=src.limits, labels=labels, source="everything",
                              n_lead=src.n_lead, spatial_shape=src.spatial_shape)
        self.session.status("Segmenting everything...")
        self.runner.start(task)
        return True

    @guarded
    def _on_everything_clicked(self, *_) -> None:
        self.segment_everything()

    # -- the last result -------------------------------------------------------------------------
    @property
    def last_run(self):
        return self.session.last_run

    def apply_threshold(self, threshold: float | None = None) -> bool:
        """Re-filter the last concept result at ``threshold`` (default: the spin box's; a
        value given here is shown there) and rewrite it; no model call."""
        self._threshold_timer.stop()
        if threshold is not None:
            self._set_threshold_controls(float(threshold))
        run = self.session.last_run
        if run is None or run.kind != "concept":
            self.session.status(f"Threshold {self.threshold:.3f}: used by the next Find concept")
            return False
        return results.write_run(self.session, self.binder, run, self.threshold)

    def _set_threshold_controls(self, value: float) -> None:
        for w in (self.threshold_spin, self.threshold_slider):
            w.blockSignals(True)
        try:
            self.threshold_spin.setValue(value)
            self.threshold_slider.setValue(round(self.threshold_spin.value() * 1000))
        finally:
            for w in (self.threshold_spin, self.threshold_slider):
                w.blockSignals(False)

    @guarded
    def _on_threshold_slider(self, value: int) -> None:
        self.threshold_spin.setValue(value / 1000.0)  # -> _on_threshold_changed

    @guarded
    def _on_threshold_changed(self, value: float) -> None:
        self.threshold_slider.blockSignals(True)
        try:
            self.threshold_slider.setValue(round(float(value) * 1000))
        finally:
            self.threshold_slider.blockSignals(False)
        run = self.session.last_run
        if run is not None and run.kind == "concept":
            self._threshold_timer.start()
        else:
            self.session.status(f"Threshold {float(value):.3f}: used by the next Find concept")

    @guarded
    def _on_threshold_timeout(self) -> None:
        self.apply_threshold()

    def clear_last_result(self) -> bool:
        """Restore the labels (and features) the last concept / everything result was
        written over, if they were not edited since."""
        if self.runner.task is not None and self.session.last_run is not None:
            self.session.report("SAM3: a job is running: wait for it or cancel it")
            return False
        return results.clear_run(self.session, self.binder)

    @guarded
    def _on_clear_result_clicked(self, *_) -> None:
        self.clear_last_result()

    @guarded
    def _on_cancel_clicked(self, *_) -> None:
        stopped = self.runner.cancel()
        self.session.status(
            f"Cancelling {' and '.join(stopped)} when the current step ends..." if stopped
            else "Nothing to cancel")
