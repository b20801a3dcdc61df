"""The napari dock widget: interactive SAM3 segmentation with points and boxes.

Nothing heavy is imported here: torch and transformers load when a model is
loaded (in a worker thread), so napari starts as fast as without the plugin.

Workflow: choose an image (the widget adds "SAM3 points", "SAM3 boxes",
"SAM3 preview" and "SAM3 labels"), load a model, click positive (green) or
negative (red, key ``t`` toggles) points or draw a rectangle; the preview
follows every change (Live). Commit writes the object into the labels layer
(undoable with napari's undo), then the next object starts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils import notifications
from qtpy.QtCore import QEvent, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import _layers
from .prompts import PromptError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/sam3"  # same as model.DEFAULT_MODEL (kept literal: no import cost)
DEVICES = ("auto", "cpu", "cuda", "mps")
POINTS_NAME = "SAM3 points"
BOXES_NAME = "SAM3 boxes"
PREVIEW_NAME = "SAM3 preview"
LABELS_NAME = "SAM3 labels"
DEBOUNCE_MS = 150
_UNFINISHED = {"adding", "removing", "changing"}
_MAX_ID = 2**31 - 1


class _UserError(Exception):
    """A problem to report in one line (no model, no image, no prompt...)."""


def _user_message(exc: BaseException) -> str:
    """One line for the user: our own errors carry it, others get their type."""
    from .model import ModelLoadError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, _UserError | PromptError | _layers.LayerError | ModelLoadError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _same(a, b) -> bool:
    """Identity of layers, seen through napari's PublicOnlyProxy (plugins get proxies)."""
    if a is None or b is None:
        return a is b
    return getattr(a, "__wrapped__", a) is getattr(b, "__wrapped__", b)


def _qt_deleted(obj) -> bool:
    """True once the C++ side of a Qt object is gone (PyQt: sip, PySide: shiboken)."""
    try:
        from qtpy import sip

        return bool(sip.isdeleted(obj))
    except Exception:  # noqa: BLE001 - PySide or no sip module
        try:
            from qtpy import shiboken

            return not shiboken.isValid(obj)
        except Exception:  # noqa: BLE001
            return False


def _guarded(method):
    """Qt slots and napari callbacks: report any exception instead of raising into Qt.

    A callback that arrives after the widget was deleted detaches the widget from
    napari's events and does nothing.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(self, "_closed", False) or _qt_deleted(self):
            self._detach()
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the boundary to Qt
            log.exception("SAM3 widget: %s failed", method.__name__)
            try:
                self._report(f"SAM3: {_user_message(exc)}")
            except Exception:  # noqa: BLE001 - widget already deleted
                pass
            return None

    return wrapper


@dataclass
class _Request:
    """Everything a segmentation job needs, captured on the GUI thread."""

    image: np.ndarray
    limits: tuple[float, float] | None
    prompt: object  # ObjectPrompt
    obj_id: int
    max_hole_area: int
    max_sprinkle_area: int
    image_layer: object
    ignored: int


def _load_segmenter(model: str, device: str):
    from .segmenter import Sam3Segmenter

    return Sam3Segmenter.from_pretrained(model, device=device)


def _segment_job(segmenter, req: _Request):
    """Generator run in a worker thread; each yield is a point where Cancel can stop it."""
    from .postprocess import masks_to_labels

    yield "cache"
    emb = segmenter.cached_embedding(req.image, req.limits)
    if emb is None:
        yield "encoding"
        emb = segmenter.encode(req.image, req.limits)
    yield "decoding"
    pred = segmenter.predict(emb, [req.prompt])[0]
    yield "post-processing"
    labels = masks_to_labels(
        pred.logits[None],
        ids=[req.obj_id],
        max_hole_area=req.max_hole_area,
        max_sprinkle_area=req.max_sprinkle_area,
    )
    return labels, pred


class Sam3Widget(QWidget):
    """SAM3 promptable segmentation of the selected 2D image.

    Public attributes used by scripts and tests: ``segmenter`` (None until a
    model is loaded), ``current_worker`` (the running segmentation worker or
    None), ``load_worker``, the controls (``image_combo``, ``model_edit``,
    ``device_combo``, ``load_button``, ``points_combo``, ``shapes_combo``,
    ``labels_combo``, ``object_id_spin``, ``positive_checkbox``,
    ``new_object_button``, ``live_checkbox``, ``segment_button``,
    ``commit_button``, ``cancel_button``, ``refine_button``, ``max_hole_area``,
    ``max_sprinkle_area``, ``overwrite_checkbox``, ``status_label``,
    ``progress_bar``) and the methods ``load_model``, ``segment_current``,
    ``commit``, ``new_object``, ``cancel``, ``refine_selected``,
    ``toggle_polarity``.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        from .postprocess import DEFAULTS

        self.viewer = napari_viewer
        self.segmenter = None
        self.current_worker = None
        self.load_worker = None
        self._job_seq = 0
        self._job_req: _Request | None = None
        self._cancelled: set[int] = set()
        self._pending: bool | None = None  # quiet flag of a request waiting for the worker
        self._preview_mask: np.ndarray | None = None
        self._preview_id: int | None = None
        self._preview_layer = None
        self._mask_prompt: tuple[int, np.ndarray] | None = None
        self._bound: dict[str, object] = {"image": None, "points": None, "shapes": None}
        self._non_rect = 0
        self._warned_no_model = False
        self._job_step = ""
        self._docked = False
        self._closed = False  # taken out of its dock (napari's X): stop reacting

        self._build_ui(DEFAULTS)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_live_timeout)
        self._ensure_timer = QTimer(self)
        self._ensure_timer.setSingleShot(True)
        self._ensure_timer.setInterval(0)
        self._ensure_timer.timeout.connect(self._ensure_layers)

        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layers_changed)
        for layer in layers:
            layer.events.name.connect(self._on_layers_changed)
        self._refresh_combos()
        self._set_status("Load a model, choose an image, then click points or draw a box.")

    # -- UI ---------------------------------------------------------------------------------
    def _build_ui(self, defaults) -> None:
        root = QVBoxLayout(self)

        model_box = QGroupBox("Model")
        form = QFormLayout(model_box)
        self.model_edit = QLineEdit(DEFAULT_MODEL)
        self.model_edit.setToolTip("Hugging Face model id or a local folder with the checkpoint")
        form.addRow("Model", self.model_edit)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)
        self.load_button = QPushButton("Load model")
        self.load_button.clicked.connect(self._on_load_clicked)
        form.addRow(self.load_button)
        root.addWidget(model_box)

        layer_box = QGroupBox("Layers")
        form = QFormLayout(layer_box)
        self.image_combo = QComboBox()
        self.points_combo = QComboBox()
        self.shapes_combo = QComboBox()
        self.labels_combo = QComboBox()
        for label, combo, role in (
            ("Image", self.image_combo, "image"),
            ("Points", self.points_combo, "points"),
            ("Boxes", self.shapes_combo, "shapes"),
            ("Labels", self.labels_combo, "labels"),
        ):
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.currentIndexChanged.connect(functools.partial(self._on_combo_changed, role))
            form.addRow(label, combo)
        root.addWidget(layer_box)

        obj_box = QGroupBox("Object")
        form = QFormLayout(obj_box)
        row = QHBoxLayout()
        self.object_id_spin = QSpinBox()
        self.object_id_spin.setRange(1, _MAX_ID)
        self.object_id_spin.setValue(1)
        self.object_id_spin.valueChanged.connect(self._on_object_id_changed)
        row.addWidget(self.object_id_spin)
        self.new_object_button = QPushButton("New object")
        self.new_object_button.clicked.connect(self._on_new_object_clicked)
        row.addWidget(self.new_object_button)
        form.addRow("Object id", row)
        self.positive_checkbox = QCheckBox("New points are positive (key t toggles)")
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
            "Use the current object's pixels in the labels layer as a mask prompt"
        )
        self.refine_button.clicked.connect(self._on_refine_clicked)
        form.addRow(self.refine_button)
        root.addWidget(obj_box)

        post_box = QGroupBox("Post-processing")
        form = QFormLayout(post_box)
        self.max_hole_area = QSpinBox()
        self.max_hole_area.setRange(0, _MAX_ID)
        self.max_hole_area.setValue(defaults.max_hole_area)
        self.max_hole_area.setSuffix(" px")
        self.max_hole_area.setToolTip("Fill enclosed holes up to this area")
        form.addRow("Max hole area", self.max_hole_area)
        self.max_sprinkle_area = QSpinBox()
        self.max_sprinkle_area.setRange(0, _MAX_ID)
        self.max_sprinkle_area.setValue(defaults.max_sprinkle_area)
        self.max_sprinkle_area.setSuffix(" px")
        self.max_sprinkle_area.setToolTip("Remove islands up to this area (the largest stays)")
        form.addRow("Max sprinkle area", self.max_sprinkle_area)
        for spin in (self.max_hole_area, self.max_sprinkle_area):
            spin.valueChanged.connect(self._on_settings_changed)
        self.overwrite_checkbox = QCheckBox("Overwrite other labels")
        self.overwrite_checkbox.setChecked(False)
        form.addRow(self.overwrite_checkbox)
        root.addWidget(post_box)

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
        root.addStretch(1)

    # -- small helpers ----------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.status_label.text()

    @property
    def busy(self) -> bool:
        """True while a live update is scheduled or a model/segmentation worker runs."""
        return (
            self._timer.isActive()
            or self.current_worker is not None
            or self._pending is not None
            or self.load_worker is not None
            or self._ensure_timer.isActive()
        )

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _report(self, message: str, level: str = "error") -> None:
        """One line in the status label and a napari notification."""
        self._set_status(message)
        {
            "error": notifications.show_error,
            "warning": notifications.show_warning,
            "info": notifications.show_info,
        }[level](message)

    def _set_busy(self, busy: bool) -> None:
        if busy:
            self.progress_bar.setRange(0, 0)
        else:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)

    def _layer_alive(self, layer) -> bool:
        return layer is not None and any(_same(ly, layer) for ly in self.viewer.layers)

    @property
    def image_layer(self):
        return self._combo_layer(self.image_combo)

    @property
    def points_layer(self):
        return self._combo_layer(self.points_combo)

    @property
    def shapes_layer(self):
        return self._combo_layer(self.shapes_combo)

    @property
    def labels_layer(self):
        return self._combo_layer(self.labels_combo)

    @property
    def preview_layer(self):
        return self._preview_layer if self._layer_alive(self._preview_layer) else None

    @property
    def preview_mask(self) -> np.ndarray | None:
        """The current object's preview mask (bool), or None."""
        return self._preview_mask

    @property
    def object_id(self) -> int:
        return int(self.object_id_spin.value())

    @object_id.setter
    def object_id(self, value: int) -> None:
        self.object_id_spin.setValue(int(value))

    @property
    def positive(self) -> bool:
        """Polarity of new points."""
        return self.positive_checkbox.isChecked()

    def _combo_layer(self, combo):
        layer = combo.currentData()
        return layer if self._layer_alive(layer) else None

    def event(self, ev) -> bool:
        """napari's dock X reparents the widget to None: detach from the viewer then."""
        if ev.type() == QEvent.Type.ParentChange and hasattr(self, "_closed"):
            if self.parent() is not None:
                self._docked = True
            elif self._docked and not self._closed:
                self._closed = True
                self.cancel()
                self._detach()
        return super().event(ev)

    def _detach(self) -> None:
        """Disconnect from the viewer's and the layers' events (widget deleted)."""
        self._timer_safe_stop()
        pairs = [
            (self.viewer.layers.events.inserted, self._on_layer_inserted),
            (self.viewer.layers.events.removed, self._on_layers_changed),
        ]
        for layer in self.viewer.layers:
            pairs.append((layer.events.name, self._on_layers_changed))
        points, shapes = self._bound.get("points"), self._bound.get("shapes")
        if points is not None:
            pairs.append((points.events.data, self._on_prompt_data))
            try:
                points.bind_key("t", None, overwrite=True)
            except Exception:  # noqa: BLE001
                pass
        if shapes is not None:
            pairs.append((shapes.events.data, self._on_shapes_data))
        for emitter, callback in pairs:
            try:
                emitter.disconnect(callback)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._bound = {"image": None, "points": None, "shapes": None}

    def _timer_safe_stop(self) -> None:
        for timer in (getattr(self, "_timer", None), getattr(self, "_ensure_timer", None)):
            try:
                if timer is not None and not _qt_deleted(timer):
                    timer.stop()
            except Exception:  # noqa: BLE001
                pass

    # -- layer lists ------------------------------------------------------------------------
    @_guarded
    def _on_layer_inserted(self, event) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self._on_layers_changed)
        self._refresh_combos()

    @_guarded
    def _on_layers_changed(self, event=None) -> None:
        self._refresh_combos()

    def _fill_combo(self, combo, kind, preferred: str, exclude=()) -> None:
        keep = combo.currentData()
        choices = [
            ly
            for ly in self.viewer.layers
            if isinstance(ly, kind) and not any(_same(ly, e) for e in exclude)
        ]
        combo.blockSignals(True)
        try:
            combo.clear()
            for ly in choices:
                combo.addItem(ly.name, ly)
            index = next((i for i, ly in enumerate(choices) if _same(ly, keep)), -1)
            if index < 0:
                index = next((i for i, ly in enumerate(choices) if ly.name == preferred), -1)
            if index < 0 and choices:
                index = 0
            combo.setCurrentIndex(index)
        finally:
            combo.blockSignals(False)

    def _refresh_combos(self) -> None:
        self._fill_combo(self.image_combo, Image, "")
        self._fill_combo(self.points_combo, Points, POINTS_NAME)
        self._fill_combo(self.shapes_combo, Shapes, BOXES_NAME)
        preview = self.preview_layer
        self._fill_combo(
            self.labels_combo,
            Labels,
            LABELS_NAME,
            exclude=(preview,) if preview is not None else (),
        )
        for role in ("image", "points", "shapes"):
            self._sync_role(role)

    @_guarded
    def _on_combo_changed(self, role: str, *_) -> None:
        if role in self._bound:
            self._sync_role(role)

    def _sync_role(self, role: str) -> None:
        layer = {
            "image": self.image_layer,
            "points": self.points_layer,
            "shapes": self.shapes_layer,
        }[role]
        if _same(layer, self._bound[role]):
            return
        old = self._bound[role]
        self._bound[role] = layer
        if role == "image":
            self._supersede()
            self._clear_preview()
            self._mask_prompt = None
            if layer is not None:
                self._ensure_timer.start()
        elif role == "points":
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_prompt_data)
                old.bind_key("t", None, overwrite=True)
            if layer is not None:
                self._adopt_points(layer)
        else:
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_shapes_data)
            if layer is not None:
                self._adopt_shapes(layer)

    def _select(self, combo, layer) -> None:
        for i in range(combo.count()):
            if _same(combo.itemData(i), layer):
                combo.setCurrentIndex(i)
                return

    @_guarded
    def _ensure_layers(self) -> None:
        """Select (or create) "SAM3 points", "SAM3 boxes", "SAM3 labels" and the preview."""
        image = self.image_layer
        if image is None:
            return
        try:
            shape = self._image_shape(image)
        except _layers.LayerError as exc:
            self._report(f"SAM3: {exc}", "warning")
            return
        common = {"scale": image.scale, "translate": image.translate}

        def find(name, kind, ok=lambda ly: True):
            return next(
                (
                    ly
                    for ly in self.viewer.layers
                    if ly.name == name and isinstance(ly, kind) and ok(ly)
                ),
                None,
            )

        def labels_ok(ly):
            return ly.data.shape == shape

        labels = find(LABELS_NAME, Labels, labels_ok)
        if labels is None:
            labels = self.viewer.add_labels(
                np.zeros(shape, np.int32), name=LABELS_NAME, opacity=0.6, **common
            )
        preview = self.preview_layer
        if preview is None or preview.data.shape != shape:
            preview = find(PREVIEW_NAME, Labels, labels_ok)
            if preview is None:
                preview = self.viewer.add_labels(
                    np.zeros(shape, np.int32), name=PREVIEW_NAME, opacity=0.5, **common
                )
            self._preview_layer = preview
        boxes = find(BOXES_NAME, Shapes, lambda ly: ly.ndim == 2)
        if boxes is None:
            boxes = self.viewer.add_shapes(
                ndim=2,
                name=BOXES_NAME,
                edge_color="yellow",
                face_color="transparent",
                edge_width=max(1.0, max(shape) / 300),
                features={"object_id": np.zeros(0, int)},
                feature_defaults={"object_id": self.object_id},
                **common,
            )
        points = find(POINTS_NAME, Points, lambda ly: ly.ndim == 2)
        if points is None:
            points = self.viewer.add_points(
                ndim=2,
                name=POINTS_NAME,
                size=float(np.clip(max(shape) / 60, 4, 30)),
                border_color="white",
                border_width=0.1,
                features={"object_id": np.zeros(0, int), "positive": np.zeros(0, bool)},
                feature_defaults={"object_id": self.object_id, "positive": self.positive},
                **common,
            )
        self._refresh_combos()  # drops the preview from the labels choices
        self._select(self.labels_combo, labels)
        self._select(self.shapes_combo, boxes)
        self._select(self.points_combo, points)
        self._sync_role("points")
        self._sync_role("shapes")
        self.viewer.layers.selection.active = points
        points.mode = "add"

    def _adopt_points(self, layer) -> None:
        """Make sure the layer has our features, colours and the polarity key."""
        n = len(layer.data)
        feats = layer.features
        missing = {}
        if "object_id" not in feats:
            missing["object_id"] = np.full(n, self.object_id, dtype=int)
        if "positive" not in feats:
            missing["positive"] = np.ones(n, dtype=bool)
        if missing:
            new = feats.copy()
            for k, v in missing.items():
                new[k] = v
            layer.features = new
        self._update_point_defaults(layer)
        layer.events.data.connect(self._on_prompt_data)
        layer.bind_key("t", self._on_t_key, overwrite=True)
        self._recolor(layer)

    def _adopt_shapes(self, layer) -> None:
        if "object_id" not in layer.features:
            new = layer.features.copy()
            new["object_id"] = np.full(len(layer.data), self.object_id, dtype=int)
            layer.features = new
        layer.feature_defaults = {"object_id": self.object_id}
        self._non_rect = _layers.count_non_rectangles(layer.shape_type)
        layer.events.data.connect(self._on_shapes_data)

    def _update_point_defaults(self, layer) -> None:
        layer.feature_defaults = {"object_id": self.object_id, "positive": self.positive}

    def _recolor(self, layer) -> None:
        n = len(layer.data)
        if n == 0:
            return
        pos = _layers.feature_column(layer.features, "positive", n, True)
        colors = _layers.polarity_colors(pos)
        if layer.face_color.shape != colors.shape or not np.allclose(layer.face_color, colors):
            layer.face_color = colors

    # -- prompt events ----------------------------------------------------------------------
    @_guarded
    def _on_prompt_data(self, event) -> None:
        if str(getattr(event, "action", "")) in _UNFINISHED:
            return
        layer = self.points_layer
        if layer is not None:
            self._recolor(layer)
        self._schedule()

    @_guarded
    def _on_shapes_data(self, event) -> None:
        if str(getattr(event, "action", "")) in _UNFINISHED:
            return
        layer = self.shapes_layer
        if layer is not None:
            count = _layers.count_non_rectangles(layer.shape_type)
            if count > self._non_rect:
                self._report(
                    f"SAM3 uses rectangles as box prompts: {count} non-rectangle "
                    f"shape{'s' if count != 1 else ''} in '{layer.name}' ignored",
                    "info",
                )
            self._non_rect = count
        self._schedule()

    def _schedule(self) -> None:
        if self.live_checkbox.isChecked():
            self._timer.start()

    @_guarded
    def _on_live_timeout(self) -> None:
        self.segment_current(quiet=True)

    @_guarded
    def _on_live_toggled(self, checked: bool) -> None:
        if checked:
            self._schedule()
        else:
            self._timer.stop()

    @_guarded
    def _on_settings_changed(self, *_) -> None:
        if self._preview_id is not None:
            self._schedule()

    def _on_t_key(self, layer=None) -> None:
        if self._closed or _qt_deleted(self):
            self._detach()
            return
        try:
            self.toggle_polarity()
        except Exception as exc:  # noqa: BLE001 - called from napari's key handler
            self._report(f"SAM3: {_user_message(exc)}")

    def toggle_polarity(self) -> bool:
        """Flip the polarity of new points and of the selected points; returns the new one."""
        self.positive_checkbox.setChecked(not self.positive)  # -> _on_positive_toggled
        return self.positive

    @_guarded
    def _on_positive_toggled(self, checked: bool) -> None:
        layer = self.points_layer
        if layer is None:
            return
        self._update_point_defaults(layer)
        selected = sorted(i for i in layer.selected_data if i < len(layer.data))
        if selected:
            n = len(layer.data)
            pos = np.array(_layers.feature_column(layer.features, "positive", n, True), bool)
            pos[selected] = ~pos[selected]
            feats = layer.features.copy()
            feats["positive"] = pos
            layer.features = feats
            self._recolor(layer)
            self._schedule()
        self._set_status(
            f"New points are {'positive' if checked else 'negative'}"
            + (f"; {len(selected)} selected point(s) flipped" if selected else "")
        )

    # -- object ids -------------------------------------------------------------------------
    @_guarded
    def _on_object_id_changed(self, value: int) -> None:
        for layer, kind in ((self.points_layer, "points"), (self.shapes_layer, "shapes")):
            if layer is None:
                continue
            if kind == "points":
                self._update_point_defaults(layer)
            else:
                layer.feature_defaults = {"object_id": int(value)}
        if self._mask_prompt is not None and self._mask_prompt[0] != value:
            self._mask_prompt = None
        self._supersede()
        self._clear_preview()
        if value in self._prompt_ids_in_layers():
            self._schedule()

    def _prompt_ids_in_layers(self) -> set[int]:
        pairs = []
        for layer in (self.points_layer, self.shapes_layer):
            if layer is not None:
                pairs.append((layer.features, len(layer.data)))
        return _layers.prompt_ids(*pairs)

    def new_object(self) -> int:
        """Switch to a fresh object id: one more than any label or prompt id."""
        labels = self.labels_layer
        max_label = 0
        if labels is not None and np.asarray(labels.data).size:
            max_label = int(np.asarray(labels.data).max())
        new_id = _layers.next_object_id(max_label, self._prompt_ids_in_layers())
        self.object_id = new_id
        self._set_status(f"Object {new_id}: click points or draw a box")
        return new_id

    @_guarded
    def _on_new_object_clicked(self, *_) -> None:
        self.new_object()

    # -- model ------------------------------------------------------------------------------
    def load_model(self, blocking: bool = False):
        """Load the model named in the line edit on the chosen device.

        Runs in a worker thread (returned) unless ``blocking``. A failure keeps
        the previous model and reports one line.
        """
        model = self.model_edit.text().strip() or DEFAULT_MODEL
        device = self.device_combo.currentText()
        if self.load_worker is not None:
            self._set_status("A model is already loading...")
            return self.load_worker
        self._set_status(f"Loading {model} on {device}...")
        if blocking:
            try:
                seg = _load_segmenter(model, device)
            except Exception as exc:  # noqa: BLE001 - reported
                self._on_model_error(exc)
            else:
                self._on_model_loaded(seg)
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(
            _load_segmenter, model, device, _start_thread=False, _ignore_errors=True
        )
        worker.returned.connect(self._on_model_loaded)
        worker.errored.connect(self._on_model_error)
        worker.finished.connect(self._on_model_finished)
        self.load_worker = worker
        self.load_button.setEnabled(False)
        self._set_busy(True)
        worker.start()
        return worker

    @_guarded
    def _on_load_clicked(self, *_) -> None:
        self.load_model()

    @_guarded
    def _on_model_loaded(self, segmenter) -> None:
        self.segmenter = segmenter
        self._warned_no_model = False
        self._set_status(f"Model {segmenter.model_id} loaded on {segmenter.device}")
        if self._preview_id is None and self.object_id in self._prompt_ids_in_layers():
            self._schedule()

    @_guarded
    def _on_model_error(self, exc) -> None:
        from .model import ModelLoadError

        msg = _user_message(exc)
        if not isinstance(exc, ModelLoadError):
            msg = f"cannot load model '{self.model_edit.text().strip()}': {msg}"
        self._report(f"SAM3: {msg}")

    @_guarded
    def _on_model_finished(self, *_) -> None:
        self.load_worker = None
        self.load_button.setEnabled(True)
        self._set_busy(self.current_worker is not None and self._job_step == "encoding")

    # -- segmentation -----------------------------------------------------------------------
    def _image_shape(self, layer) -> tuple[int, int]:
        if getattr(layer, "multiscale", False):
            raise _layers.LayerError(f"'{layer.name}' is multiscale: not supported yet")
        return _layers.image_shape_2d(layer.data.shape, layer.rgb, layer.name)

    def _image_input(self, layer):
        shape = self._image_shape(layer)
        data = np.asarray(layer.data)
        limits = None
        if not (layer.rgb and data.dtype == np.uint8):
            limits = tuple(float(v) for v in layer.contrast_limits)
        return data, limits, shape

    def _object_prompt(self, obj_id: int, shape, image_layer):
        points, shapes = self.points_layer, self.shapes_layer
        kwargs = {}
        if points is not None and len(points.data):
            kwargs["points"] = _layers.to_image_coords(points, image_layer, points.data)
            kwargs["point_features"] = points.features
        if shapes is not None and len(shapes.data):
            kwargs["shapes"] = [
                _layers.to_image_coords(shapes, image_layer, d) for d in shapes.data
            ]
            kwargs["shape_types"] = list(shapes.shape_type)
            kwargs["shape_features"] = shapes.features
        mask = None
        if self._mask_prompt is not None and self._mask_prompt[0] == obj_id:
            mask = self._mask_prompt[1]
        return _layers.object_prompt(obj_id, shape, mask=mask, **kwargs)

    def _request(self, quiet: bool) -> _Request | None:
        image_layer = self.image_layer
        if image_layer is None:
            if quiet:
                return None
            raise _UserError("no image: add a 2D image layer and choose it in the widget")
        image, limits, shape = self._image_input(image_layer)
        obj_id = self.object_id
        prompt, ignored = self._object_prompt(obj_id, shape, image_layer)
        if prompt is None:
            if quiet:
                self._clear_preview()
                return None
            if self.segmenter is None:
                raise _UserError("no SAM3 model loaded: click 'Load model' first")
            raise _UserError(f"object {obj_id} has no prompt: click points or draw a rectangle")
        if self.segmenter is None:
            raise _UserError("no SAM3 model loaded: click 'Load model' first")
        return _Request(
            image=image,
            limits=limits,
            prompt=prompt,
            obj_id=obj_id,
            max_hole_area=int(self.max_hole_area.value()),
            max_sprinkle_area=int(self.max_sprinkle_area.value()),
            image_layer=image_layer,
            ignored=ignored,
        )

    def segment_current(self, quiet: bool = False) -> bool:
        """Segment the current object in a worker; the result goes to the preview layer.

        Returns False (and reports one line) when it cannot start. With a job
        already running, that job is stopped at its next step and this request
        runs after it (the latest request wins).
        """
        self._timer.stop()
        if self.current_worker is not None:
            self._pending = quiet if self._pending is None else (self._pending and quiet)
            self._supersede(keep_pending=True)
            return True
        try:
            req = self._request(quiet)
        except _UserError as exc:
            if quiet and self.segmenter is None and "model" in str(exc):
                self._set_status(f"SAM3: {exc}")
                if not self._warned_no_model:
                    self._warned_no_model = True
                    notifications.show_warning(f"SAM3: {exc}")
            else:
                self._report(f"SAM3: {exc}")
            return False
        except (PromptError, _layers.LayerError) as exc:
            self._report(f"SAM3: {exc}")
            return False
        if req is None:
            return False
        self._start_job(req)
        return True

    def _start_job(self, req: _Request) -> None:
        from napari.qt.threading import create_worker

        self._job_seq += 1
        job = self._job_seq
        worker = create_worker(
            _segment_job, self.segmenter, req, _start_thread=False, _ignore_errors=True
        )
        worker.yielded.connect(functools.partial(self._on_job_step, job))
        worker.returned.connect(functools.partial(self._on_job_done, job))
        worker.errored.connect(functools.partial(self._on_job_error, job))
        worker.finished.connect(functools.partial(self._on_job_finished, job))
        self.current_worker = worker
        self._job_req = req
        self._job_step = ""
        self._set_status(f"Segmenting object {req.obj_id}...")
        worker.start()

    def _supersede(self, keep_pending: bool = False) -> None:
        """Stop the running job at its next step without reporting it as cancelled."""
        if not keep_pending:
            self._pending = None
        if self.current_worker is not None:
            self.current_worker.quit()

    def _is_current(self, job: int) -> bool:
        return (
            job == self._job_seq
            and job not in self._cancelled
            and self._pending is None
            and self.current_worker is not None
            and not self.current_worker.abort_requested
        )

    @_guarded
    def _on_job_step(self, job: int, step: str) -> None:
        if job != self._job_seq:
            return
        self._job_step = step
        if step == "encoding":
            self._set_busy(True)
            self._set_status("Encoding the image (once per image and contrast)...")
        elif step == "decoding":
            self._set_busy(self.load_worker is not None)
            self._set_status(f"Decoding object {self.object_id}...")

    @_guarded
    def _on_job_done(self, job: int, result) -> None:
        req = self._job_req
        if not self._is_current(job) or req is None:
            return
        if req.obj_id != self.object_id or not _same(req.image_layer, self.image_layer):
            return
        labels, pred = result
        self._show_preview(labels, req.obj_id)
        area = int(np.count_nonzero(labels))
        note = f"; {req.ignored} non-rectangle shape(s) ignored" if req.ignored else ""
        if area:
            self._set_status(
                f"Object {req.obj_id}: {area} px (IoU {pred.iou_score:.2f}); "
                f"Commit to keep it{note}"
            )
        else:
            self._set_status(f"Object {req.obj_id}: empty mask; add or move prompts{note}")

    @_guarded
    def _on_job_error(self, job: int, exc) -> None:
        if job in self._cancelled or job != self._job_seq:
            return
        self._report(f"SAM3: segmentation failed: {_user_message(exc)}")

    @_guarded
    def _on_job_finished(self, job: int, *_) -> None:
        if job != self._job_seq:
            return
        stopped = self.current_worker is not None and self.current_worker.abort_requested
        self.current_worker = None
        self._job_req = None
        self._job_step = ""
        self._set_busy(self.load_worker is not None)
        if job in self._cancelled:
            self._set_status("Segmentation cancelled: nothing changed")
            return
        if self._pending is not None:
            quiet, self._pending = self._pending, None
            self.segment_current(quiet=quiet)
        elif stopped:
            self._set_status(f"Object {self.object_id}: ready")

    def cancel(self) -> bool:
        """Stop the running segmentation: its result is dropped. Returns True if one ran."""
        self._timer.stop()
        self._pending = None
        worker = self.current_worker
        if worker is None:
            self._set_status("Nothing to cancel")
            return False
        self._cancelled.add(self._job_seq)
        worker.quit()
        self._set_status("Cancelling: segmentation cancelled when the current step ends...")
        return True

    @_guarded
    def _on_cancel_clicked(self, *_) -> None:
        self.cancel()

    @_guarded
    def _on_segment_clicked(self, *_) -> None:
        self.segment_current(quiet=False)

    # -- preview ----------------------------------------------------------------------------
    def _show_preview(self, labels: np.ndarray, obj_id: int) -> None:
        layer = self.preview_layer
        if layer is None or layer.data.shape != labels.shape:
            image = self.image_layer
            common = {} if image is None else {"scale": image.scale, "translate": image.translate}
            layer = self.viewer.add_labels(
                np.zeros(labels.shape, np.int32), name=PREVIEW_NAME, opacity=0.5, **common
            )
            self._preview_layer = layer
            self._refresh_combos()
        layer.data = labels.astype(np.int32, copy=False)
        self._preview_mask = labels > 0
        self._preview_id = obj_id

    def _clear_preview(self) -> None:
        self._preview_mask = None
        self._preview_id = None
        layer = self.preview_layer
        if layer is not None and np.any(layer.data):
            layer.data = np.zeros(layer.data.shape, np.int32)

    # -- commit / refine --------------------------------------------------------------------
    def commit(self) -> bool:
        """Write the preview of the current object into the labels layer (undoable).

        Other objects keep their pixels unless "Overwrite other labels" is on.
        Then the object's prompts are removed and a new object id is chosen.
        """
        obj_id = self.object_id
        if self.current_worker is not None or self._timer.isActive():
            self._report(
                "SAM3: the preview is still being computed; commit when it is shown", "warning"
            )
            return False
        if self._preview_mask is None or self._preview_id != obj_id:
            self._report(f"SAM3: object {obj_id} has no preview to commit: segment it first")
            return False
        labels = self.labels_layer
        if labels is None:
            self._report("SAM3: no labels layer to commit into: choose one in the widget")
            return False
        data = np.asarray(labels.data)
        if data.shape != self._preview_mask.shape:
            self._report(
                f"SAM3: labels layer '{labels.name}' has shape {data.shape}, "
                f"the image is {self._preview_mask.shape}"
            )
            return False
        from .postprocess import paste_object

        indices, values = paste_object(
            data, self._preview_mask, obj_id, overwrite=self.overwrite_checkbox.isChecked()
        )
        if len(indices[0]):
            labels.data_setitem(indices, values)
        written = int(np.count_nonzero(values == obj_id))
        self._remove_prompts(obj_id)
        self._mask_prompt = None
        self._clear_preview()
        new_id = self.new_object()
        self._set_status(
            f"Committed object {obj_id} ({written} px changed to it); now object {new_id}"
        )
        return True

    def _remove_prompts(self, obj_id: int) -> None:
        for layer, handler in (
            (self.points_layer, self._on_prompt_data),
            (self.shapes_layer, self._on_shapes_data),
        ):
            if layer is None or not len(layer.data):
                continue
            idx = _layers.object_indices(layer.features, len(layer.data), obj_id)
            if len(idx):
                layer.events.data.disconnect(handler)
                try:
                    layer.selected_data = set()
                    layer.remove(idx.tolist())
                finally:
                    layer.events.data.connect(handler)
        shapes = self.shapes_layer
        if shapes is not None:
            self._non_rect = _layers.count_non_rectangles(shapes.shape_type)

    @_guarded
    def _on_commit_clicked(self, *_) -> None:
        self.commit()

    def refine_selected(self) -> bool:
        """Segment the current object with its committed pixels as a mask prompt."""
        obj_id = self.object_id
        labels = self.labels_layer
        if labels is None:
            self._report("SAM3: no labels layer: choose one in the widget")
            return False
        mask = np.asarray(labels.data) == obj_id
        if not mask.any():
            self._report(f"SAM3: label {obj_id} has no pixels in '{labels.name}' to refine")
            return False
        self._mask_prompt = (obj_id, mask)
        return self.segment_current(quiet=False)

    @_guarded
    def _on_refine_clicked(self, *_) -> None:
        self.refine_selected()
