"""Object section: the everyday loop (object id, polarity, segment, commit, next, cancel)."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ...core.defaults import MAX_ID
from ..clicks import ClickSegmentation
from ..errors import guarded

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
