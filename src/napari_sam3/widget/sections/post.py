"""Post-processing section: holes, islands, overwriting other objects."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QFormLayout, QSpinBox, QWidget

from ...core.defaults import MAX_ID
from ..errors import guarded
from ..session import PostSettings


class PostSection(QWidget):
    """The session's ``PostSettings``, edited."""

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        post = session.post
        form = QFormLayout(self)
        self.max_hole_area = QSpinBox()
        self.max_sprinkle_area = QSpinBox()
        for spin, value, label, tip in (
            (self.max_hole_area, post.max_hole_area, "Max hole area",
             "Fill enclosed holes up to this area"),
            (self.max_sprinkle_area, post.max_sprinkle_area, "Max sprinkle area",
             "Remove islands up to this area (the largest stays)"),
        ):  # fmt: skip
            spin.setRange(0, MAX_ID)
            spin.setValue(value)
            spin.setSuffix(" px")
            spin.setToolTip(tip)
            spin.valueChanged.connect(self._on_changed)
            form.addRow(label, spin)
        self.overwrite_checkbox = QCheckBox("Overwrite other labels")
        self.overwrite_checkbox.setChecked(post.overwrite)
        self.overwrite_checkbox.setToolTip(
            "Off: a new object never takes pixels of another one; on: it does")
        self.overwrite_checkbox.toggled.connect(self._on_changed)
        form.addRow(self.overwrite_checkbox)

    @guarded
    def _on_changed(self, *_) -> None:
        self.session.post = PostSettings(
            int(self.max_hole_area.value()),
            int(self.max_sprinkle_area.value()),
            bool(self.overwrite_checkbox.isChecked()),
        )
