"""Session section: Save session..., Open session..., the autosave state, Restore / Discard."""

from __future__ import annotations

from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QPushButton, QWidget

from ..errors import guarded
from ..session import wrappable


class SessionSection(QWidget):
    """Buttons over a :class:`~napari_sam3.widget.session_store.SessionStore`; the row
    *Restore* / *Discard* shows while an autosave of the chosen image is offered."""

    def __init__(self, session, store, parent=None):
        super().__init__(parent)
        self.session, self.store = session, store
        form = QFormLayout(self)
        row = QHBoxLayout()
        self.save_button = QPushButton("Save session...")
        self.save_button.setToolTip(
            "Save the labels (with their provenance), the points and boxes and the settings "
            "to a folder (the image is referenced by path and content, not copied); "
            "autosaves then go there")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.open_button = QPushButton("Open session...")
        self.open_button.setToolTip(
            "Open a saved session: its image (by path), labels, prompts and settings; the "
            "next object continues after its ids")
        self.open_button.clicked.connect(self._on_open_clicked)
        row.addWidget(self.save_button)
        row.addWidget(self.open_button)
        form.addRow(row)
        self.autosave_label = QLabel("Autosave: after the first commit")
        self.autosave_label.setWordWrap(True)
        form.addRow(self.autosave_label)
        self.offer_row = QWidget()
        offer = QHBoxLayout(self.offer_row)
        offer.setContentsMargins(0, 0, 0, 0)
        self.offer_label = QLabel()
        self.offer_label.setWordWrap(True)
        self.restore_button = QPushButton("Restore")
        self.restore_button.setToolTip("Open the autosave of this image found on disk")
        self.restore_button.clicked.connect(self._on_restore_clicked)
        self.discard_button = QPushButton("Discard")
        self.discard_button.setToolTip("Delete that autosave")
        self.discard_button.clicked.connect(self._on_discard_clicked)
        offer.addWidget(self.offer_label, 1)
        offer.addWidget(self.restore_button)
        offer.addWidget(self.discard_button)
        form.addRow(self.offer_row)
        self.offer_row.setVisible(False)
        store.offer.connect(self._on_offer)
        store.autosaved.connect(self._on_autosaved)
        store.saved.connect(self._on_autosaved)
        store.opened.connect(self._on_autosaved)

    def save_session(self, path: str | None = None) -> bool:
        """Save the session to ``path`` (a new or empty folder, or a session of ours);
        without it, ask. Returns whether saving started."""
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self, "Save session (a new folder)",
                                                  "session.sam3")
            if not path:
                return False
        return self.store.save(path)

    def open_session(self, path: str | None = None, force: bool = False) -> bool:
        """Open the session folder ``path`` (without it, ask)."""
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path = QFileDialog.getExistingDirectory(self, "Open session")
            if not path:
                return False
        return self.store.open(path, force=force)

    @guarded
    def _on_save_clicked(self, *_) -> None:
        self.save_session()

    @guarded
    def _on_open_clicked(self, *_) -> None:
        self.open_session()

    @guarded
    def _on_restore_clicked(self, *_) -> None:
        self.store.restore()

    @guarded
    def _on_discard_clicked(self, *_) -> None:
        self.store.discard()

    @guarded
    def _on_offer(self, folder) -> None:
        self.offer_row.setVisible(folder is not None)
        if folder is not None:
            self.offer_label.setText(wrappable(f"An autosave of this image: {folder}"))

    @guarded
    def _on_autosaved(self, folder: str) -> None:
        import time

        self.autosave_label.setText(
            wrappable(f"Session written {time.strftime('%H:%M:%S')} to {folder}"))
