"""Propagate section: track the current object (or the selected label) through a stack."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ...core import planes
from ...core.defaults import DEFAULT_STOP_AFTER, DIRECTIONS, MAX_ID
from ...core.prompts import ObjectPrompt, PromptError
from .. import labels_target, layer_data, results
from ..errors import UserError, guarded
from ..history import RecordedWrites
from ..image_source import unwrap
from ..tasks import PropagationTask


class PropagateSection(QWidget):
    """Direction, slice range, *Propagate*; enabled for z-stacks and time series only."""

    def __init__(self, session, runner, binder, parent=None):
        super().__init__(parent)
        self.session, self.runner, self.binder = session, runner, binder
        self._axis_state = None
        form = QFormLayout(self)
        self.axis_label = QLabel()
        self.axis_label.setWordWrap(True)
        form.addRow(self.axis_label)
        self.direction_combo = QComboBox()
        self.direction_combo.addItems(DIRECTIONS)
        form.addRow("Direction", self.direction_combo)
        row = QHBoxLayout()
        self.start_spin = QSpinBox()
        self.stop_spin = QSpinBox()
        for spin in (self.start_spin, self.stop_spin):
            spin.setRange(0, 0)
        self.start_spin.setToolTip("First slice propagation may change")
        self.stop_spin.setToolTip("Last slice propagation may change (included)")
        self.start_here_button = QPushButton("From here")
        self.start_here_button.setToolTip(
            "Start at the current slice (re-propagate forward after a correction)"
        )
        self.start_here_button.clicked.connect(self._on_start_here_clicked)
        row.addWidget(self.start_spin)
        row.addWidget(QLabel("to"))
        row.addWidget(self.stop_spin)
        row.addWidget(self.start_here_button)
        form.addRow("Slices", row)
        self.stop_after_spin = QSpinBox()
        self.stop_after_spin.setRange(1, MAX_ID)
        self.stop_after_spin.setValue(DEFAULT_STOP_AFTER)
        self.stop_after_spin.setToolTip(
            "Stop following the object after this many slices in a row without it"
        )
        form.addRow("Stop after", self.stop_after_spin)
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.setToolTip(
            "Track the current object through the stack from all of its prompted slices; "
            "without prompts, the labels layer's selected label (e.g. the object just "
            "committed) from its mask on this slice"
        )
        self.propagate_button.clicked.connect(self._on_propagate_clicked)
        form.addRow(self.propagate_button)
        self._stack_controls = (self.direction_combo, self.start_spin, self.stop_spin,
                                self.start_here_button, self.stop_after_spin,
                                self.propagate_button)
        binder.role_changed.connect(self._on_role_changed)
        binder.slice_changed.connect(self.update_axis_info)
        binder.axis_changed.connect(self.update_axis_info)
        runner.task_started.connect(lambda *_: self.propagate_button.setEnabled(False))
        runner.task_finished.connect(lambda *_: self.update_axis_info())
        self.update_axis_info()

    @guarded
    def _on_role_changed(self, role: str) -> None:
        if role == "image":
            self.update_axis_info()

    def _source(self):
        try:
            return self.binder.source() if self.binder.image_layer is not None else None
        except (UserError, layer_data.LayerError):
            return None

    @guarded
    def update_axis_info(self, *_) -> None:
        """The propagation axis line; the stack controls enabled for stacks only; the
        slice range reset to the whole axis when the image or the axis changes."""
        src = self._source()
        stack = src is not None and bool(src.n_lead)
        for w in self._stack_controls:
            w.setEnabled(stack and (w is not self.propagate_button or self.runner.task is None))
        if not stack:
            self._axis_state = None
            self.axis_label.setText(
                "2D image: nothing to propagate through (choose a z-stack or time series)"
                if src is not None else "Choose a z-stack or time series to propagate through it"
            )
            return
        axis, fixed = self.binder.propagation_axis(src)
        depth = int(src.data.shape[axis])
        state = (id(unwrap(src.layer)), axis, depth)
        if state != self._axis_state:
            self._axis_state = state
            for spin in (self.start_spin, self.stop_spin):
                spin.setRange(0, depth - 1)
            self.start_spin.setValue(0)
            self.stop_spin.setValue(depth - 1)
        note = "".join(f"; axis {a} stays at {v}" for a, v in sorted(fixed.items()))
        self.axis_label.setText(f"Along axis {axis} of '{src.layer.name}' ({depth} slices){note}")

    @guarded
    def _on_start_here_clicked(self, *_) -> None:
        src = self.binder.source()
        axis, _ = self.binder.propagation_axis(src)
        self.start_spin.setValue(self.binder.current_slice(src)[axis])

    def _prompts(self, src, axis, fixed, labels) -> tuple[int, dict, str]:
        """(object id, {slice: {id: prompt}}, note): the current object's prompts on this
        stack; without any, the labels layer's selected label with its mask on the
        current slice (and its prompts on other slices)."""
        binder, obj_id = self.binder, self.session.object_id

        def on_stack(oid):
            return {
                key[axis]: {oid: prompt}
                for key, (prompt, _) in binder.object_prompts(oid, src).items()
                if prompt is not None and all(key[a] == v for a, v in fixed.items())
            }

        prompts = on_stack(obj_id)
        if prompts:
            return obj_id, prompts, ""
        selected = int(getattr(unwrap(labels), "selected_label", 0) or 0)
        lead = binder.current_slice(src)
        if selected > 0:
            mask = binder.target(labels).read(lead) == selected
            if mask.any():
                prompts = on_stack(selected)
                prompts[lead[axis]] = {selected: ObjectPrompt(mask=mask)}
                where = layer_data.format_slice(lead)
                return selected, prompts, f" (label {selected} from its mask on {where})"
        raise UserError(
            f"object {obj_id} has no prompt on this stack and the selected label "
            f"{selected} of '{labels.name}' has no pixels on this slice: click points, draw "
            "a rectangle or select a committed label first"
        )

    def propagate(self) -> bool:
        """Track the current object through the stack in a worker, writing each slice into
        the labels layer as it comes (progress: slices done; Cancel keeps the slices
        written, nothing is half-written).

        All slices' prompts of the object condition the tracker; without prompts the
        labels layer's selected label is followed from its mask on the current slice.
        Only slices in the chosen range are changed, other objects' pixels are kept. The
        whole propagation is one undo step (Ctrl+Z), unless it changes more than
        ``UNDO_PIXELS`` pixels.
        """
        session, binder = self.session, self.binder
        try:
            self.runner.check_idle()
            if session.segmenter is None:
                raise UserError("no SAM3 model loaded: click 'Load model' first")
            src = binder.source()
            if self.runner.current_worker is None:  # a click may be between steps
                session.sync_tiling()
            labels = binder.labels_for(src)
            target = binder.target(labels)
            axis, fixed = binder.propagation_axis(src)
            obj_id, prompts, note = self._prompts(src, axis, fixed, labels)
            depth = int(src.data.shape[axis])
            start = int(self.start_spin.value())
            stop = min(int(self.stop_spin.value()), depth - 1) + 1
            if start >= stop:
                raise UserError(f"empty slice range {start} to {stop - 1}")
            if not any(start <= k < stop for k in prompts):
                raise UserError(
                    f"object {obj_id} has no prompt on slices {start} to {stop - 1} "
                    f"(prompted: {', '.join(map(str, sorted(prompts)))})"
                )
        except (UserError, layer_data.LayerError, PromptError) as exc:
            session.report(f"SAM3: {exc}")
            return False
        kwargs = {
            "axis": axis,
            "direction": self.direction_combo.currentText(),
            "start": start,
            "stop": stop,
            "fixed": fixed,
            "limits": src.limits,
            "stop_after": int(self.stop_after_spin.value()),
        }
        view = RecordedWrites(
            planes.AxisView(target.data, axis, fixed, src.n_lead),
            target.step(results.UNDO_PIXELS if target.pyramid is None
                        else labels_target.REGION_UNDO_PIXELS),
        )
        task = PropagationTask(session, binder, obj_id=obj_id, labels=labels, view=view,
                               stack=src.data, prompts=prompts, kwargs=kwargs,
                               post=session.post, source_note=note)
        session.status(
            f"Propagating object {obj_id}{note} through slices {start} to {stop - 1}...")
        self.runner.start(task)
        return True

    @guarded
    def _on_propagate_clicked(self, *_) -> None:
        self.propagate()
