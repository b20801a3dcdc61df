"""Object section: the everyday loop (object id, polarity, segment, commit, next, cancel)."""

from __future__ import annotations

import functools

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ...core.defaults import MAX_ID
from .. import layer_data, provenance_log, tasks
from ..clicks import ClickSegmentation
from ..errors import UserError, guarded
from ..image_source import same, unwrap

# Keys of the annotation loop, bound on the viewer (napari's own single-letter keys stay)
SHORTCUTS = {
    "segment": "Shift-S",
    "commit": "Shift-C",
    "new_object": "Shift-N",
    "toggle_polarity": "Shift-T",
    "cancel": "Shift-X",
}


class ObjectSection(QWidget):
    """The current object and its buttons; the work is done by ``self.clicks``."""

    def __init__(self, session, runner, binder, parent=None):
        super().__init__(parent)
        self.session, self.runner, self.binder = session, runner, binder
        self.clicks = ClickSegmentation(session, runner, binder, self)
        form = QFormLayout(self)
        row = QHBoxLayout()
        self.object_id_spin = QSpinBox()
        self.object_id_spin.setRange(1, MAX_ID)
        self.object_id_spin.setValue(session.object_id)
        self.object_id_spin.setToolTip("Label id of the object the prompts belong to")
        self.object_id_spin.valueChanged.connect(self._on_spin_changed)
        row.addWidget(self.object_id_spin)
        self.new_object_button = QPushButton("New object")
        self.new_object_button.clicked.connect(self._on_new_object_clicked)
        row.addWidget(self.new_object_button)
        form.addRow("Object id", row)
        self.positive_checkbox = QCheckBox("New points are positive (t toggles)")
        self.positive_checkbox.setChecked(True)
        self.positive_checkbox.toggled.connect(self._on_positive_toggled)
        form.addRow(self.positive_checkbox)
        self.live_checkbox = QCheckBox("Live preview")
        self.live_checkbox.setChecked(True)
        self.live_checkbox.toggled.connect(self._on_live_toggled)
        form.addRow(self.live_checkbox)
        buttons = QHBoxLayout()
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self._on_segment_clicked)
        self.commit_button = QPushButton("Commit")
        self.commit_button.clicked.connect(self._on_commit_clicked)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self._on_cancel_clicked)
        for b in (self.segment_button, self.commit_button, self.cancel_button):
            buttons.addWidget(b)
        form.addRow(buttons)
        self.refine_button = QPushButton("Refine selected label")
        self.refine_button.setToolTip(
            "Segment the label selected in the labels layer again, with its pixels as "
            "a mask prompt (add points or a box to correct it), then Commit"
        )
        self.refine_button.clicked.connect(self._on_refine_clicked)
        form.addRow(self.refine_button)
        row = QHBoxLayout()
        self.delete_button = QPushButton("Delete label")
        self.delete_button.setToolTip(
            "Set the labels layer's selected label to 0 on the current slice (the whole "
            "image when it is 2D); Ctrl+Z undoes")
        self.delete_button.clicked.connect(self._on_delete_clicked)
        row.addWidget(self.delete_button)
        self.merge_id_spin = QSpinBox()
        self.merge_id_spin.setRange(1, MAX_ID)
        self.merge_id_spin.setToolTip("The label to merge into the selected one")
        row.addWidget(self.merge_id_spin)
        self.merge_button = QPushButton("Merge into selected")
        self.merge_button.setToolTip(
            "Give the label on the left the labels layer's selected label, on the current "
            "slice (the whole image when it is 2D); Ctrl+Z undoes")
        self.merge_button.clicked.connect(self._on_merge_clicked)
        row.addWidget(self.merge_button)
        form.addRow(row)
        tips = {
            "segment": (self.segment_button, "Segment the current object now"),
            "commit": (self.commit_button, "Write the preview into the labels layer (Ctrl+Z undoes)"),
            "new_object": (self.new_object_button, "Next object: one more than any label or prompt"),
            "toggle_polarity": (self.positive_checkbox, "Polarity of new points (and of the "
                                "selected ones); t on the points layer too"),
            "cancel": (self.cancel_button, "Stop segmentation, precompute or propagation"),
        }
        for action, (widget, tip) in tips.items():
            widget.setToolTip(f"{tip} [{SHORTCUTS[action]}]")
        session.object_changed.connect(self._on_object_changed)
        binder.polarity_key.connect(self.toggle_polarity)

    # -- the loop --------------------------------------------------------------------------------
    @property
    def positive(self) -> bool:
        """Polarity of new points."""
        return self.positive_checkbox.isChecked()

    @property
    def preview_mask(self):
        return self.clicks.preview_mask

    @property
    def preview_region(self):
        return self.clicks.preview_region

    def segment_current(self, quiet: bool = False) -> bool:
        return self.clicks.segment(quiet=quiet)

    def commit(self) -> bool:
        return self.clicks.commit()

    def new_object(self) -> int:
        return self.clicks.new_object()

    def refine_selected(self) -> bool:
        return self.clicks.refine_selected()

    def delete_label(self, label: int | None = None) -> bool:
        """Set ``label`` (default: the labels layer's selected label) to 0 on the current
        slice (one undo step, recorded for replay)."""
        return self._edit_ids("delete", label)

    def merge_into_selected(self, other: int | None = None) -> bool:
        """Give ``other`` (default: the spin box's) the labels layer's selected label on
        the current slice (one undo step, recorded for replay)."""
        other = int(self.merge_id_spin.value()) if other is None else int(other)
        return self._edit_ids("merge", other)

    def _edit_ids(self, kind: str, label: int | None) -> bool:
        session, binder = self.session, self.binder
        labels = binder.labels_layer
        if labels is None:
            session.report("SAM3: no labels layer: choose one in the widget")
            return False
        selected = int(unwrap(labels).selected_label)
        source, into = (selected if label is None else int(label), 0) if kind == "delete" \
            else (int(label), selected)
        try:
            if source <= 0 or (kind == "merge" and (into <= 0 or into == source)):
                raise UserError(
                    "select the label to delete in the labels layer first" if kind == "delete"
                    else f"select the label to merge {source} into (another than {source})")
            target, lead = binder.edit_target(labels)
        except (UserError, layer_data.LayerError) as exc:
            session.report(f"SAM3: {exc}")
            return False
        return tasks.find_label(session, self.runner, target, lead, source, functools.partial(
            self._apply_edit, kind, labels, target, lead, source, into))

    def _apply_edit(self, kind: str, labels, target, lead: tuple, source: int, into: int,
                    box) -> bool:
        """``source`` -> ``into`` over its box on the slice (one undo step, recorded)."""
        from ...core.provenance import edit_op

        session = self.session
        where = f" on {layer_data.format_slice(lead)}" if lead else ""
        if not same(labels, self.binder.labels_layer) or not self.binder.alive(labels):
            session.report(f"SAM3: the labels layer changed while label {source} was looked "
                           "for: nothing changed")
            return False
        if box is None:
            session.report(f"SAM3: label {source} has no pixels in '{labels.name}'{where}")
            return False
        key = lead + tuple(box)
        old = target.read(key)
        hit = old == source
        new = np.where(hit, into, old).astype(old.dtype)
        recorder = provenance_log.recorder(session, self.binder)
        with recorder.writing(labels):
            target.write_region(key, old, new)
        recorder.append(labels, edit_op(kind, [source], into=into,
                                        slice_index=provenance_log.slice_of(lead)), key)
        if into:
            session.wrote(labels, into)
        n = int(hit.sum())
        session.status(f"Deleted label {source}{where} ({n} px)" if kind == "delete" else
                       f"Merged label {source} into {into}{where} ({n} px)")
        return True

    def toggle_polarity(self) -> bool:
        """Flip the polarity of new points and of the selected points; returns the new one."""
        self.positive_checkbox.setChecked(not self.positive)  # -> _on_positive_toggled
        return self.positive

    def cancel(self) -> bool:
        """Stop the running segmentation (its result is dropped) and the running long task
        (what it finished stays). True if anything ran."""
        self.clicks.stop()
        stopped = self.runner.cancel()
        if not stopped:
            self.session.status("Nothing to cancel")
            return False
        self.session.status(f"Cancelling {' and '.join(stopped)} when the current step ends...")
        return True

    def bind_keys(self, viewer) -> list:
        """Bind the loop's keys on the viewer; returns what to unbind."""
        actions = {"segment": lambda: self.segment_current(quiet=False), "commit": self.commit,
                   "new_object": self.new_object, "toggle_polarity": self.toggle_polarity,
                   "cancel": self.cancel}
        bound = []
        for action, key in SHORTCUTS.items():
            fn = actions[action]

            def handler(_viewer=None, fn=fn):
                if not self.session.closed:
                    fn()

            viewer.bind_key(key, handler, overwrite=True)
            bound.append(key)
        return bound

    # -- controls --------------------------------------------------------------------------------
    @guarded
    def _on_spin_changed(self, value: int) -> None:
        self.session.object_id = int(value)

    @guarded
    def _on_object_changed(self, value: int) -> None:
        if self.object_id_spin.value() != value:
            self.object_id_spin.setValue(value)

    @guarded
    def _on_positive_toggled(self, checked: bool) -> None:
        flipped = self.binder.set_positive(checked)
        self.session.status(
            f"New points are {'positive' if checked else 'negative'}"
            + (f"; {flipped} selected point(s) flipped" if flipped else "")
        )

    @guarded
    def _on_live_toggled(self, checked: bool) -> None:
        self.clicks.set_live(checked)

    @guarded
    def _on_new_object_clicked(self, *_) -> None:
        self.new_object()

    @guarded
    def _on_segment_clicked(self, *_) -> None:
        self.segment_current(quiet=False)

    @guarded
    def _on_commit_clicked(self, *_) -> None:
        self.commit()

    @guarded
    def _on_refine_clicked(self, *_) -> None:
        self.refine_selected()

    @guarded
    def _on_cancel_clicked(self, *_) -> None:
        self.cancel()

    @guarded
    def _on_delete_clicked(self, *_) -> None:
        self.delete_label()

    @guarded
    def _on_merge_clicked(self, *_) -> None:
        self.merge_into_selected()

