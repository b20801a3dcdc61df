"""The widget's controls: one group box per section, each control wired to its handler."""

from __future__ import annotations

import functools

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._widget_instances import INSTANCE_SCOPES
from ._widget_layers import EXEMPLARS_NAME
from ._widget_model import DEFAULT_MODEL
from ._widget_tasks import PRECOMPUTE_SCOPES
from .core.embedding_store import default_cache_path
from .core.tiling import DEFAULT_OVERLAP, DEFAULT_TILE

DEVICES = ("auto", "cpu", "cuda", "mps")
DIRECTIONS = ("both", "forward", "backward")  # same names as propagation.DIRECTIONS
DEFAULT_THRESHOLD = 0.5  # same as concept.DEFAULT_THRESHOLD (kept literal: no import cost)
_MAX_ID = 2**31 - 1


class _ControlsMixin:
    """Builds the sections' group boxes, the progress bar and the status line."""

    def _build_ui(self, defaults) -> None:
        root = QVBoxLayout(self)
        root.addWidget(self._build_model_box())
        root.addWidget(self._build_cache_box())
        root.addWidget(self._build_layer_box())
        root.addWidget(self._build_object_box())
        root.addWidget(self._build_propagate_box())
        root.addWidget(self._build_instances_box())
        root.addWidget(self._build_post_box(defaults))

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

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_edit = QLineEdit(DEFAULT_MODEL)
        self.model_edit.setToolTip("Hugging Face model id or a local folder with the checkpoint")
        form.addRow("Model", self.model_edit)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)
        self.load_button = QPushButton("Load model")
        self.load_button.clicked.connect(self._on_load_clicked)
        form.addRow(self.load_button)
        return box

    def _build_cache_box(self) -> QGroupBox:
        box = QGroupBox("Cache and large images")
        form = QFormLayout(box)
        self.cache_edit = QLineEdit(str(default_cache_path()))
        self.cache_edit.setPlaceholderText("empty: embeddings in memory only")
        self.cache_edit.setToolTip(
            "Zarr folder where image embeddings are kept between sessions (used when the "
            "model is loaded); empty: memory only"
        )
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
        return box

    def _build_layer_box(self) -> QGroupBox:
        box = QGroupBox("Layers")
        form = QFormLayout(box)
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
        self.save_button = QPushButton("Save labels...")
        self.save_button.setToolTip(
            "Save the labels layer as TIFF (ImageJ-readable) or OME-NGFF Zarr with the "
            "plugin's writer (File > Save uses napari's own writer unless you pick ours)"
        )
        self.save_button.clicked.connect(self._on_save_clicked)
        form.addRow(self.save_button)
        return box

    def _build_object_box(self) -> QGroupBox:
        box = QGroupBox("Object")
        form = QFormLayout(box)
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
        self.cancel_button.setToolTip("Stop segmentation, precompute or propagation")
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
        return box

    def _build_propagate_box(self) -> QGroupBox:
        box = QGroupBox("Propagate (z-stacks, time series)")
        form = QFormLayout(box)
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
        self.stop_after_spin.setRange(1, _MAX_ID)
        self.stop_after_spin.setValue(3)
        self.stop_after_spin.setToolTip(
            "Stop following the object after this many slices in a row without it"
        )
        form.addRow("Stop after", self.stop_after_spin)
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.setToolTip(
            "Track the current object through the stack from all of its prompted slices"
        )
        self.propagate_button.clicked.connect(self._on_propagate_clicked)
        form.addRow(self.propagate_button)
        self._update_axis_info()
        return box

    def _build_instances_box(self) -> QGroupBox:
        from .core.everything import SETTINGS

        box = QGroupBox("Segment everything / concepts")
        box.setCheckable(True)  # unchecked: folded away
        box.setChecked(True)
        self.instances_box = box
        outer = QVBoxLayout(box)
        inner = QWidget()
        outer.addWidget(inner)
        box.toggled.connect(inner.setVisible)
        form = QFormLayout(inner)
        form.setContentsMargins(0, 0, 0, 0)

        self.scope_combo = QComboBox()
        self.scope_combo.addItems(INSTANCE_SCOPES)
        self.scope_combo.setToolTip(
            "Stacks: the current slice, or every slice along the propagation axis (written "
            "when all are done)"
        )
        self.scope_combo.setEnabled(False)
        form.addRow("Scope", self.scope_combo)

        self.concept_text_edit = QLineEdit()
        self.concept_text_edit.setPlaceholderText("nucleus")
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
            f"Shapes layer whose rectangles are exemplars ('{EXEMPLARS_NAME}')"
        )
        self.exemplars_combo.currentIndexChanged.connect(
            functools.partial(self._on_combo_changed, "exemplars")
        )
        self.draw_exemplars_button = QPushButton("Draw")
        self.draw_exemplars_button.setToolTip(
            f"Draw rectangles around example objects in '{EXEMPLARS_NAME}' (created if "
            "needed); key t toggles positive / negative"
        )
        self.draw_exemplars_button.clicked.connect(self._on_draw_exemplars_clicked)
        row.addWidget(self.exemplars_combo, 1)
        row.addWidget(self.draw_exemplars_button)
        form.addRow("Exemplars", row)
        self.exemplar_positive_checkbox = QCheckBox("New exemplars are positive (key t toggles)")
        self.exemplar_positive_checkbox.setChecked(True)
        self.exemplar_positive_checkbox.toggled.connect(self._on_exemplar_positive_toggled)
        form.addRow(self.exemplar_positive_checkbox)

        row = QHBoxLayout()
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 1000)
        self.threshold_slider.setValue(round(DEFAULT_THRESHOLD * 1000))
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 1.0)
        self.threshold_spin.setDecimals(3)
        self.threshold_spin.setSingleStep(0.01)
        self.threshold_spin.setValue(DEFAULT_THRESHOLD)
        tip = (
            "Keep instances scoring above this; moving it re-filters the last concept result "
            "without running the model"
        )
        self.threshold_slider.setToolTip(tip)
        self.threshold_spin.setToolTip(tip)
        self.threshold_slider.valueChanged.connect(self._on_threshold_slider)
        self.threshold_spin.valueChanged.connect(self._on_threshold_changed)
        row.addWidget(self.threshold_slider, 1)
        row.addWidget(self.threshold_spin)
        form.addRow("Threshold", row)
        self.find_concept_button = QPushButton("Find concept")
        self.find_concept_button.setToolTip(
            "Every instance of the text and/or exemplars, each with its own label id"
        )
        self.find_concept_button.clicked.connect(self._on_find_concept_clicked)
        form.addRow(self.find_concept_button)

        self.points_per_side_spin = QSpinBox()
        self.points_per_side_spin.setRange(1, 256)
        self.points_per_side_spin.setValue(SETTINGS.points_per_side)
        self.points_per_side_spin.setToolTip(
            "Grid of point prompts per tile side (raise it for small, dense cells)"
        )
        form.addRow("Points per side", self.points_per_side_spin)
        self.pred_iou_spin = QDoubleSpinBox()
        self.stability_spin = QDoubleSpinBox()
        for spin, value, label, tip in (
            (self.pred_iou_spin, SETTINGS.pred_iou_thresh, "Pred IoU threshold",
             "Keep masks whose predicted IoU is above this"),
            (self.stability_spin, SETTINGS.stability_score_thresh, "Stability threshold",
             "Keep masks that change little when the mask threshold moves"),
        ):  # fmt: skip
            spin.setRange(0.0, 1.0)
            spin.setDecimals(3)
            spin.setSingleStep(0.01)
            spin.setValue(value)
            spin.setToolTip(tip)
            form.addRow(label, spin)
        self.min_area_spin = QSpinBox()
        self.min_area_spin.setRange(0, _MAX_ID)
        self.min_area_spin.setValue(SETTINGS.min_area)
        self.min_area_spin.setSuffix(" px")
        self.min_area_spin.setToolTip("Drop objects smaller than this")
        form.addRow("Min area", self.min_area_spin)
        self.everything_button = QPushButton("Segment everything")
        self.everything_button.setToolTip(
            "Every object the point grid finds, without a concept (uses the embedding cache)"
        )
        self.everything_button.clicked.connect(self._on_everything_clicked)
        form.addRow(self.everything_button)

        row = QHBoxLayout()
        self.clear_result_button = QPushButton("Clear last result")
        self.clear_result_button.setToolTip(
            "Restore the labels the last concept / everything result was written over"
        )
        self.clear_result_button.clicked.connect(self._on_clear_result_clicked)
        self.instances_cancel_button = QPushButton("Cancel")
        self.instances_cancel_button.setToolTip("Stop the running job; the labels stay unchanged")
        self.instances_cancel_button.clicked.connect(self._on_cancel_clicked)
        row.addWidget(self.clear_result_button)
        row.addWidget(self.instances_cancel_button)
        form.addRow(row)
        return box

    def _build_post_box(self, defaults) -> QGroupBox:
        box = QGroupBox("Post-processing")
        form = QFormLayout(box)
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
        return box
