"""Model section: which checkpoint, on which device; loading it in a worker."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QFormLayout, QLineEdit, QPushButton, QWidget

from ...core.defaults import DEFAULT_MODEL, DEVICES
from ..errors import UserError, guarded, user_message
from ..jobs import load_segmenter


class ModelSection(QWidget):
    """Model id or folder, device, *Load model*."""

    def __init__(self, session, runner, parent=None):
        super().__init__(parent)
        self.session, self.runner = session, runner
        form = QFormLayout(self)
        self.model_edit = QLineEdit(DEFAULT_MODEL)
        self.model_edit.setToolTip("Hugging Face model id or a local folder with the checkpoint")
        form.addRow("Model", self.model_edit)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)
        self.load_button = QPushButton("Load model")
        self.load_button.clicked.connect(self._on_load_clicked)
        form.addRow(self.load_button)

    @property
    def load_worker(self):
        return self.runner.load_worker

    def load_model(self, blocking: bool = False):
        """Load the model named in the line edit on the chosen device, with the session's
        cache folder and tiling. Runs in a worker (returned) unless ``blocking``; a failure
        keeps the previous model and reports one line."""
        session = self.session
        model = self.model_edit.text().strip() or DEFAULT_MODEL
        device = self.device_combo.currentText()
        if self.runner.load_worker is not None:
            session.status("A model is already loading...")
            return self.runner.load_worker
        try:
            tile, overlap = session.checked_tiling()
        except UserError as exc:
            session.report(f"SAM3: {exc}")
            return None
        args = (model, device, session.cache_path, tile, overlap, session.warning_callback())
        session.status(f"Loading {model} on {device}...")
        if blocking:
            try:
                seg = load_segmenter(*args)
            except Exception as exc:  # noqa: BLE001 - reported
                self._on_error(exc)
            else:
                self._on_loaded(seg)
            return None
        self.load_button.setEnabled(False)
        return self.runner.load(load_segmenter, args, self._on_loaded, self._on_error)

    @guarded
    def _on_load_clicked(self, *_) -> None:
        self.load_model()

    @guarded
    def _on_loaded(self, segmenter) -> None:
        self.load_button.setEnabled(True)
        segmenter.reuse_encoded = True  # clicks use an encoded tile that holds them
        where = getattr(getattr(segmenter, "store", None), "path", None)
        cache = f"cache {where}" if where is not None else "embeddings in memory"
        self.session.status(
            f"Model {segmenter.model_id} loaded on {segmenter.device} ({cache})")
        self.session.set_segmenter(segmenter)

    @guarded
    def _on_error(self, exc) -> None:
        from ...core.model import ModelLoadError

        self.load_button.setEnabled(True)
        msg = user_message(exc)
        if not isinstance(getattr(exc, "original", exc), ModelLoadError):
            msg = f"cannot load model '{self.model_edit.text().strip()}': {msg}"
        self.session.report(f"SAM3: {msg}")
