"""Layers section: the image (and up to two more channels), prompt and labels layers, saving."""

from __future__ import annotations

import functools

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QPushButton, QWidget

from ..edit_window import EditWindow
from ..errors import guarded
from ..image_source import same, unwrap

_ROLE_ROWS = (("Image", "image"), ("Points", "points"), ("Boxes", "shapes"),
              ("Labels", "labels"))


def fill_combo(combo, layers, current, none_item: str | None = None) -> None:
    """Refill ``combo`` with ``layers`` (and a first ``none_item``), selecting ``current``."""
    combo.blockSignals(True)
    try:
        combo.clear()
        if none_item is not None:
            combo.addItem(none_item, None)
        for ly in layers:
            combo.addItem(ly.name, ly)
        index = next((i for i in range(combo.count()) if same(combo.itemData(i), current)), -1)
        combo.setCurrentIndex(index if index >= 0 or none_item is None else 0)
    finally:
        combo.blockSignals(False)


def _combo() -> QComboBox:
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    return combo


class LayersSection(QWidget):
    """Which layers the widget reads and writes; *Save labels...*."""

    def __init__(self, session, binder, parent=None):
        super().__init__(parent)
        self.session, self.binder = session, binder
        form = QFormLayout(self)
        self.combos: dict[str, QComboBox] = {}
        for label, role in _ROLE_ROWS:
            combo = _combo()
            combo.currentIndexChanged.connect(functools.partial(self._on_combo_changed, role))
            self.combos[role] = combo
            form.addRow(label, combo)
            if role == "image":
                form.addRow("Channels", self._channel_row())
        self.image_combo, self.points_combo = self.combos["image"], self.combos["points"]
        self.shapes_combo, self.labels_combo = self.combos["shapes"], self.combos["labels"]
        self.image_combo.setToolTip("The image to segment (its first channel with the two below)")
        self.save_button = QPushButton("Save labels...")
        self.save_button.setToolTip(
            "Save the labels layer as TIFF (ImageJ-readable) or OME-NGFF Zarr with the "
            "plugin's writer (File > Save uses napari's own writer unless you pick ours)"
        )
        self.save_button.clicked.connect(self._on_save_clicked)
        form.addRow(self.save_button)
        self.edit_window = EditWindow(session, binder)
        edit_row = QHBoxLayout()
        self.edit_button = QPushButton("Edit region")
        self.edit_button.setToolTip(
            "Open the labels of the part of the slice on screen as an editable layer "
            "(brush, eraser, fill), for labels napari cannot edit (multiscale)")
        self.edit_button.clicked.connect(self._on_edit_clicked)
        self.apply_edits_button = QPushButton("Apply edits")
        self.apply_edits_button.setToolTip(
            "Write the edit window's changes into the labels layer (one undo step) and "
            "close it")
        self.apply_edits_button.clicked.connect(self._on_apply_edits_clicked)
        edit_row.addWidget(self.edit_button)
        edit_row.addWidget(self.apply_edits_button)
        form.addRow(edit_row)
        binder.layers_changed.connect(self._refill)
        binder.role_changed.connect(self._on_role_changed)
        self._refill()

    def _channel_row(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.channel_combos = [_combo(), _combo()]
        for i, combo in enumerate(self.channel_combos):
            combo.setToolTip(
                f"Channel {i + 2} of the model's input: another single-channel image layer "
                "(e.g. membrane next to nuclei), each normalised with its own contrast "
                "limits; (none): the image alone"
            )
            combo.currentIndexChanged.connect(self._on_channels_changed)
            row.addWidget(combo)
        return row

    # -- binder -> combos ------------------------------------------------------------------------
    @guarded
    def _refill(self) -> None:
        for role, combo in self.combos.items():
            fill_combo(combo, self.binder.candidates(role), self.binder.layer(role))
        self._refill_channels()

    def _refill_channels(self) -> None:
        extra = self.binder.channels[1:] if self.binder.channels else []
        images = [ly for ly in self.binder.candidates("image") if not unwrap(ly).rgb]
        for i, combo in enumerate(self.channel_combos):
            fill_combo(combo, images, extra[i] if i < len(extra) else None, "(none)")

    @guarded
    def _on_role_changed(self, role: str) -> None:
        combo = self.combos.get(role)
        if combo is not None:
            fill_combo(combo, self.binder.candidates(role), self.binder.layer(role))
        if role == "image":  # another image: its channels are chosen again
            self.binder.channels = None
            self._refill_channels()
            self._on_channels_changed()
        elif role == "channels":  # (chosen elsewhere too: an opened session)
            self._refill_channels()

    # -- combos -> binder ------------------------------------------------------------------------
    @guarded
    def _on_combo_changed(self, role: str, *_) -> None:
        self.binder.choose(role, self.combos[role].currentData())

    @guarded
    def _on_channels_changed(self, *_) -> None:
        extra = [c.currentData() for c in self.channel_combos if c.currentData() is not None]
        image = self.binder.image_layer
        before = self.binder.channels
        self.binder.channels = [image, *extra] if extra and image is not None else None
        if [id(unwrap(ly)) for ly in before or ()] != [id(unwrap(ly)) for ly in
                                                      self.binder.channels or ()]:
            self.binder.role_changed.emit("channels")  # the model sees other pixels
        if self.binder.channels:
            names = " + ".join(unwrap(ly).name for ly in self.binder.channels)
            self.session.status(f"Model input: {names} as channels 1-{len(self.binder.channels)}")

    # -- saving ----------------------------------------------------------------------------------
    def save_labels(self, path: str | None = None) -> list[str]:
        """Write the labels layer with the plugin's writer (``.tif`` or ``.zarr``); without
        ``path``, ask for one. Returns the written paths ([] if nothing was written)."""
        from ..._writers import save_labels_layer

        labels = self.binder.labels_layer
        if labels is None:
            self.session.report("SAM3: no labels layer to save")
            return []
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(
                self, "Save labels", f"{labels.name}.tif",
                "Labels TIFF (*.tif *.tiff);;Labels OME-Zarr (*.zarr)",
            )
            if not path:
                return []
        try:
            written = save_labels_layer(unwrap(labels), path)
        except OSError as exc:
            self.session.report(str(exc) if str(exc).startswith("SAM3") else f"SAM3: {exc}")
            return []
        self.session.status(f"Saved '{labels.name}' to {written[0]}")
        return written

    @guarded
    def _on_save_clicked(self, *_) -> None:
        self.save_labels()

    @guarded
    def _on_edit_clicked(self, *_) -> None:
        self.edit_window.open()

    @guarded
    def _on_apply_edits_clicked(self, *_) -> None:
        self.edit_window.apply()
