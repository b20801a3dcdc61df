"""The napari dock widget: interactive SAM3 segmentation with points and boxes.

Nothing heavy is imported here: torch and transformers load when a model is
loaded (in a worker thread), so napari starts as fast as without the plugin.

Workflow: choose an image (the widget adds "SAM3 points", "SAM3 boxes",
"SAM3 preview" and "SAM3 labels"), load a model, click positive (green) or
negative (red, key ``t`` toggles) points or draw a rectangle; the preview
follows every change (Live). Commit writes the object into the labels layer
(undoable with napari's undo), then the next object starts.

Stacks (z or t, or t and z, before Y, X): prompts belong to the slice they are
drawn on; a click segments the current slice with that slice's prompts only,
and *Propagate* tracks the current object through the stack with all of its
slices' prompts, writing each slice into the labels layer as it comes.

Large images are never loaded whole: Zarr, dask and multiscale layers (level 0)
go to the core lazily, which reads and encodes only the tiles that prompts
touch; the preview is then a crop of the object's tile placed with
``translate``, and a labels layer for an image of more than ``LARGE_PIXELS``
pixels is created as a Zarr array in a temporary folder.

Segment everything / concepts: *Find concept* runs SAM3's concept detector
(``Sam3Model``, loaded on first use next to the tracker) with the text and/or the
rectangles of the "SAM3 exemplars" layer (green positive, red negative, key ``t``
toggles) and writes every instance found, with its own id, into the labels layer
chosen under Layers; *Segment everything* does the same with the tracker and a
grid of point prompts. Ids start above every existing label and prompt id,
existing labels are kept unless "Overwrite other labels" is on, and each
instance's score goes into the labels layer's ``features`` (napari's features
table; the status bar shows them under the cursor). The labels under the result
are kept, so moving the threshold re-filters the last concept result and rewrites
it (one undo step) without running the model, and *Clear last result* restores
them. Over a stack, the scope "whole stack" runs slice by slice along the
propagation axis and writes every slice at the end; Cancel leaves the labels as
they were.

Threads: every model call runs in a napari worker; one lock lets one worker
use the model at a time, taken per tile or slice, so a click is served between
two tiles of a precompute or two slices of a propagation. Results are written
into layers on the GUI thread only.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils import notifications
from qtpy.QtCore import QEvent, Qt, QTimer, Signal
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

from . import _layers
from .embedding_store import default_cache_path
from .prompts import PromptError
from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/sam3"  # same as model.DEFAULT_MODEL (kept literal: no import cost)
DEVICES = ("auto", "cpu", "cuda", "mps")
POINTS_NAME = "SAM3 points"
BOXES_NAME = "SAM3 boxes"
PREVIEW_NAME = "SAM3 preview"
LABELS_NAME = "SAM3 labels"
EXEMPLARS_NAME = "SAM3 exemplars"
DEBOUNCE_MS = 150
# Above this many pixels (voxels for stacks) the labels layer the widget creates is a
# Zarr array in a temporary folder instead of a NumPy array (64 MiB of int32).
LARGE_PIXELS = 4096 * 4096
PRECOMPUTE_SCOPES = ("field of view", "whole image", "all slices")
DIRECTIONS = ("both", "forward", "backward")  # same names as propagation.DIRECTIONS
INSTANCE_SCOPES = ("current slice", "whole stack")
DEFAULT_THRESHOLD = 0.5  # same as concept.DEFAULT_THRESHOLD (kept literal: no import cost)
DEFAULT_MIN_SCORE = 0.05  # same as concept.DEFAULT_MIN_SCORE
THRESHOLD_DEBOUNCE_MS = 40
# Up to this many changed pixels a concept/everything write goes through napari's
# data_setitem (one undo step); a larger write is made window by window, without undo.
UNDO_PIXELS = 1 << 22
_UNFINISHED = {"adding", "removing", "changing"}
_MAX_ID = 2**31 - 1
_TASK_NAMES = {
    "precompute": "precompute",
    "propagation": "propagation",
    "concept": "concept search",
    "everything": "segment-everything run",
}


class _UserError(Exception):
    """A problem to report in one line (no model, no image, no prompt...)."""


class _Cancelled(Exception):
    """Raised in a worker from a progress callback once Cancel was pressed."""


class _WorkerError(Exception):
    """Carries a RuntimeError out of a generator worker: superqt's GeneratorWorker turns a
    RuntimeError into "aborted thread" and emits neither ``errored`` nor ``finished``
    (ModelLoadError and many torch errors are RuntimeErrors)."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def _shielded(fn):
    """``fn`` (a generator function) with RuntimeErrors re-raised as ``_WorkerError``."""

    @functools.wraps(fn)
    def gen(*args, **kwargs):
        try:
            return (yield from fn(*args, **kwargs))
        except RuntimeError as exc:
            raise _WorkerError(exc) from exc

    return gen


def _user_message(exc: BaseException) -> str:
    """One line for the user: our own errors carry it, others get their type."""
    from .model import ModelLoadError

    exc = getattr(exc, "original", exc)  # _WorkerError
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, _UserError | PromptError | _layers.LayerError | ModelLoadError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unwrap(obj):
    """The napari object behind a PublicOnlyProxy (plugins get proxies)."""
    return getattr(obj, "__wrapped__", obj)


def _same(a, b) -> bool:
    """Identity of layers, seen through napari's PublicOnlyProxy."""
    if a is None or b is None:
        return a is b
    return _unwrap(a) is _unwrap(b)


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


# -- what jobs get (captured on the GUI thread) -----------------------------------------------
@dataclass
class _Source:
    """The chosen image layer as the core sees it."""

    layer: object  # the layer (as napari handed it to us)
    data: object  # full-resolution array-like (level 0 of a multiscale), never loaded whole
    rgb: bool
    n_lead: int  # leading z/t axes before (Y, X)
    plane: tuple[int, int]  # (H, W)
    limits: tuple[float, float] | None  # one normalisation for every tile and slice

    @property
    def ndim(self) -> int:
        return self.n_lead + 2

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape[: self.ndim])

    @property
    def large(self) -> bool:
        return self.plane[0] * self.plane[1] > LARGE_PIXELS

    def plane_at(self, lead: tuple):
        return _layers.plane_of(self.data, lead)


@dataclass
class _Request:
    """Everything a segmentation job needs."""

    image: object  # the plane to segment (lazy)
    lead: tuple  # its slice; () for a 2D image
    spatial_shape: tuple
    limits: tuple[float, float] | None
    prompt: object  # ObjectPrompt
    obj_id: int
    max_hole_area: int
    max_sprinkle_area: int
    image_layer: object
    ignored: int


@dataclass
class _Preview:
    """The current object's mask on one slice: labels over ``region`` of that plane."""

    obj_id: int
    lead: tuple
    region: tuple[slice, slice]
    labels: np.ndarray  # int32, obj_id inside the mask, 0 elsewhere
    spatial_shape: tuple

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    @property
    def full(self) -> bool:
        """A 2D image segmented in one piece: the preview is the whole image."""
        h, w = self.spatial_shape[-2:]
        r, c = self.region
        return not self.lead and (r.start, r.stop, c.start, c.stop) == (0, h, 0, w)


@dataclass
class _Task:
    """A long job (precompute or propagate) with progress and Cancel."""

    kind: str  # "precompute" or "propagate"
    worker: object = None
    total: int = 0
    done: int = 0
    encoded: int = 0
    cancelled: bool = False
    failed: bool = False
    # propagation
    obj_id: int = 0
    labels: object = None
    view: object = None  # _layers.AxisView of the labels' data
    written: set = field(default_factory=set)
    max_hole_area: int = 0
    max_sprinkle_area: int = 0
    # concept / everything
    source: str = ""  # what was asked, for messages and the features table
    n_lead: int = 0
    spatial_shape: tuple = ()
    results: list | None = None  # [(slice, ConceptResult or EverythingResult)]
    holder: dict = field(default_factory=dict)  # the concept model, once loaded
    concept_key: tuple = ()  # (segmenter, concept model) the holder's model is for
    step: str = ""


@dataclass
class _RunPlane:
    """One slice of a concept / everything result and the labels under it."""

    lead: tuple
    result: object  # ConceptResult or EverythingResult
    region: tuple[int, int, int, int] | None  # where its instances can be written
    base: np.ndarray | None  # the labels over ``region`` before the result was written
    written: bytes | None = None  # digest of what the last write left over ``region``


@dataclass
class _InstanceRun:
    """The last concept / everything result written into a labels layer.

    Every write starts again from the kept labels (``base``), so the threshold can be
    moved any number of times; ``start_id`` stays fixed.
    """

    kind: str  # "concept" or "everything"
    source: str
    labels: object
    planes: list[_RunPlane]
    start_id: int
    base_features: object  # pandas DataFrame: the layer's features before the first write
    n_lead: int
    spatial_shape: tuple
    threshold: float | None = None
    ids: tuple[int, int] | None = None  # (first, last) id written, None when none
    count: int = 0


# -- worker functions (run in threads; no Qt, no napari) --------------------------------------
def _load_segmenter(
    model: str, device: str, cache=None, tile_size=None, overlap=None, on_cache_warning=None
):
    from .segmenter import Sam3Segmenter

    return Sam3Segmenter.from_pretrained(
        model,
        device=device,
        cache=cache,
        tile_size=tile_size,
        overlap=overlap,
        on_cache_warning=on_cache_warning,
    )


def _locked(gen, lock):
    """Run ``gen`` one step at a time under ``lock``, never holding it across a yield."""
    try:
        while True:
            with lock:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        gen.close()


def _segment_job(segmenter, lock, req: _Request):
    """Generator run in a worker thread; each yield is a point where Cancel can stop it."""
    from .postprocess import masks_to_labels

    yield "cache"
    with lock:
        single = segmenter.tiles(req.image).single
        cached = single and segmenter.cached_embedding(req.image, req.limits) is not None
    if not cached:
        yield "encoding"
    with lock:
        obj = segmenter.predict_objects(req.image, [req.prompt], req.limits)[0]
    yield "post-processing"
    labels = masks_to_labels(
        obj.logits[None],
        ids=[req.obj_id],
        max_hole_area=req.max_hole_area,
        max_sprinkle_area=req.max_sprinkle_area,
    )
    return obj, labels


def _precompute_job(segmenter, lock, jobs):
    """Encode the tiles of each ``(plane, limits, region)``; yields (done, total, encoded)."""
    with lock:
        total = sum(len(segmenter.tiles(img).tiles_in(region)) for img, _, region in jobs)
    done = encoded = 0
    yield done, total, encoded
    for img, limits, region in jobs:
        for _, _, new in _locked(segmenter.precompute(img, limits, region), lock):
            done += 1
            encoded += bool(new)
            yield done, total, encoded


def _propagate_job(segmenter, lock, stack, prompts, kwargs):
    """Yields each ``SliceResult`` of ``Sam3Segmenter.iter_propagate`` as it is computed."""
    yield from _locked(segmenter.iter_propagate(stack, prompts, **kwargs), lock)


def _slice_progress(progress, i: int, n: int):
    """``progress(done, total)`` of slice ``i`` of ``n`` as progress over all slices."""

    def report(done, total):
        progress(i * int(total) + int(done), n * int(total))

    return report


def _concept_job(segmenter, lock, holder, model, planes, text, options, progress):
    """Find the concept on each ``(slice, plane, boxes, labels)``; loads the detector first
    if ``holder`` has none. Yields ("loading", model) and ("slice", i, n, slice) steps;
    returns ``[(slice, ConceptResult)]``."""
    from .concept import ConceptSegmenter

    concept = holder.get("concept")
    if concept is None:
        yield ("loading", model or segmenter.model_id)
        # no lock: loading only reads the tracker (to share its ViT when the weights match)
        concept = ConceptSegmenter.for_segmenter(segmenter, model)
        holder["concept"] = concept
    results = []
    n = len(planes)
    for i, (lead, image, boxes, labels) in enumerate(planes):
        yield ("slice", i, n, lead)
        with lock:
            res = concept.detect(
                image,
                text,
                boxes,
                exemplar_labels=labels,
                progress=_slice_progress(progress, i, n),
                **options,
            )
        results.append((lead, res))
    return results


def _everything_job(segmenter, lock, planes, settings, limits, progress):
    """Segment everything on each ``(slice, plane)``; returns ``[(slice, EverythingResult)]``."""
    from .everything import generate_everything

    results = []
    n = len(planes)
    for i, (lead, image) in enumerate(planes):
        yield ("slice", i, n, lead)
        with lock:
            res = generate_everything(
                segmenter,
                image,
                settings=settings,
                limits=limits,
                progress=_slice_progress(progress, i, n),
            )
        results.append((lead, res))
    return results


def _new_labels_data(shape: tuple, n_lead: int):
    """Zeros for a new labels layer: NumPy when it has at most ``LARGE_PIXELS`` voxels,
    else a Zarr array (one chunk per 1024 x 1024 tile of a slice) in a temporary folder.
    Returns ``(array, folder or None)``."""
    if int(np.prod(shape, dtype=np.int64)) <= LARGE_PIXELS:
        return np.zeros(shape, np.int32), None
    import tempfile
    from pathlib import Path

    import zarr

    folder = Path(tempfile.mkdtemp(prefix="napari-sam3-labels-"))
    chunks = (1,) * n_lead + (min(1024, shape[-2]), min(1024, shape[-1]))
    data = zarr.create_array(
        folder / "labels.zarr", shape=shape, chunks=chunks, dtype="int32", fill_value=0
    )
    return data, folder


class Sam3Widget(QWidget):
    """SAM3 promptable segmentation of the selected image, 2D or a stack.

    Public attributes used by scripts and tests: ``segmenter`` (None until a
    model is loaded), ``current_worker`` (the running segmentation worker or
    None), ``load_worker``, ``task_worker`` (the running precompute or
    propagation), ``task`` (its kind, done and total), the controls
    (``image_combo``, ``model_edit``, ``device_combo``, ``load_button``,
    ``cache_edit``, ``tile_spin``, ``overlap_spin``, ``precompute_combo``,
    ``precompute_button``, ``points_combo``, ``shapes_combo``, ``labels_combo``,
    ``object_id_spin``, ``positive_checkbox``, ``new_object_button``,
    ``live_checkbox``, ``segment_button``, ``commit_button``, ``cancel_button``,
    ``refine_button``, ``axis_label``, ``direction_combo``, ``start_spin``,
    ``stop_spin``, ``start_here_button``, ``stop_after_spin``,
    ``propagate_button``, ``max_hole_area``, ``max_sprinkle_area``,
    ``overwrite_checkbox``, ``status_label``, ``progress_bar``) and the methods
    ``load_model``, ``segment_current``, ``commit``, ``new_object``, ``cancel``,
    ``refine_selected``, ``toggle_polarity``, ``precompute``, ``propagate``,
    ``current_slice``, ``propagation_axis``, ``field_of_view``.

    Segment everything / concepts: ``instances_box``, ``scope_combo``,
    ``concept_text_edit``, ``concept_model_edit``, ``exemplars_combo``,
    ``draw_exemplars_button``, ``exemplar_positive_checkbox``, ``threshold_slider``,
    ``threshold_spin``, ``find_concept_button``, ``points_per_side_spin``,
    ``pred_iou_spin``, ``stability_spin``, ``min_area_spin``, ``everything_button``,
    ``clear_result_button``, ``instances_cancel_button``; ``concept`` (the loaded
    ``ConceptSegmenter`` or None), ``last_run`` (the last result written, with its
    per-slice ``planes``), and the methods ``find_concept``, ``segment_everything``,
    ``apply_threshold``, ``clear_last_result``, ``draw_exemplars``,
    ``toggle_exemplar_polarity``, ``everything_settings``.
    """

    _cache_warning = Signal(str)  # from worker threads to the GUI thread
    _task_progress = Signal(object, int, int)  # (task, done, total) from worker threads

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        from .postprocess import DEFAULTS

        self.viewer = napari_viewer
        self.segmenter = None
        self.current_worker = None
        self.load_worker = None
        self.task: _Task | None = None
        self._model_lock = threading.Lock()  # one worker uses the model at a time
        self._job_seq = 0
        self._job_req: _Request | None = None
        self._cancelled: set[int] = set()
        self._pending: bool | None = None  # quiet flag of a request waiting for the worker
        self._preview: _Preview | None = None
        self._preview_layer = None
        self._mask_prompt: tuple[int, tuple, np.ndarray] | None = None  # (id, slice, mask)
        self._bound: dict[str, object] = {"image": None, "points": None, "shapes": None}
        self._non_rect = 0
        self._warned_no_model = False
        self._job_step = ""
        self._docked = False
        self._closed = False  # taken out of its dock (napari's X): stop reacting
        self._tiling_custom = False  # the user changed tile size / overlap
        self._setting_tiling = False
        self._axis_state = None
        self._max_written = 0  # largest id written by the widget (labels too big to scan)
        self._concept = None  # ConceptSegmenter, loaded on first use
        self._concept_key: tuple | None = None  # (segmenter, concept model) it was loaded for
        self._run: _InstanceRun | None = None  # the last concept / everything result written
        self._non_rect_exemplars = 0
        self._exemplars_off = False  # the user chose "(none)" for exemplars
        self._bound["exemplars"] = None

        self._build_ui(DEFAULTS)
        self._cache_warning.connect(self._on_cache_warning)
        self._task_progress.connect(self._on_task_progress)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_live_timeout)
        self._ensure_timer = QTimer(self)
        self._ensure_timer.setSingleShot(True)
        self._ensure_timer.setInterval(0)
        self._ensure_timer.timeout.connect(self._ensure_layers)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(THRESHOLD_DEBOUNCE_MS)
        self._threshold_timer.timeout.connect(self._on_threshold_timeout)

        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layers_changed)
        for layer in layers:
            layer.events.name.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_step_changed)
        self.viewer.dims.events.last_used.connect(self._on_axis_changed)
        self._refresh_combos()
        self._set_status("Load a model, choose an image, then click points or draw a box.")

    # -- UI ---------------------------------------------------------------------------------
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
        from .everything import SETTINGS

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

    # -- small helpers ----------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.status_label.text()

    @property
    def task_worker(self):
        """The running precompute or propagation worker, or None."""
        return None if self.task is None else self.task.worker

    @property
    def busy(self) -> bool:
        """True while a live update is scheduled or any worker runs."""
        return (
            self._timer.isActive()
            or self.current_worker is not None
            or self._pending is not None
            or self.load_worker is not None
            or self.task is not None
            or self._ensure_timer.isActive()
            or self._threshold_timer.isActive()
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

    def _update_progress(self) -> None:
        """Progress bar: done/total of a precompute or propagation, busy while loading or
        encoding, idle otherwise."""
        bar, task = self.progress_bar, self.task
        if task is not None and task.total:
            bar.setRange(0, task.total)
            bar.setValue(min(task.done, task.total))
        elif (
            task is not None
            or self.load_worker is not None
            or (self.current_worker is not None and self._job_step == "encoding")
        ):
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1)
            bar.setValue(0)

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
    def exemplars_layer(self):
        return self._combo_layer(self.exemplars_combo)

    @property
    def preview_layer(self):
        return self._preview_layer if self._layer_alive(self._preview_layer) else None

    @property
    def preview_mask(self) -> np.ndarray | None:
        """The current object's preview mask (bool) over ``preview_region``, or None."""
        return None if self._preview is None else self._preview.mask

    @property
    def preview_region(self) -> tuple | None:
        """(slice, (row slice, col slice)) of the preview, or None."""
        return None if self._preview is None else (self._preview.lead, self._preview.region)

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
            (self.viewer.dims.events.current_step, self._on_step_changed),
            (self.viewer.dims.events.last_used, self._on_axis_changed),
        ]
        for layer in self.viewer.layers:
            pairs.append((layer.events.name, self._on_layers_changed))
        points, shapes = self._bound.get("points"), self._bound.get("shapes")
        exemplars = self._bound.get("exemplars")
        if exemplars is not None:
            pairs.append((exemplars.events.data, self._on_exemplars_data))
            try:
                exemplars.bind_key("t", None, overwrite=True)
            except Exception:  # noqa: BLE001
                pass
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
        self._bound = {"image": None, "points": None, "shapes": None, "exemplars": None}

    def _timer_safe_stop(self) -> None:
        for timer in (
            getattr(self, "_timer", None),
            getattr(self, "_ensure_timer", None),
            getattr(self, "_threshold_timer", None),
        ):
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
        self._fill_exemplars_combo()
        for role in ("image", "points", "shapes", "exemplars"):
            self._sync_role(role)

    def _fill_exemplars_combo(self) -> None:
        """A "(none)" item, then every Shapes layer; keeps the choice, else "SAM3 exemplars"."""
        combo = self.exemplars_combo
        keep = combo.currentData()
        choices = [ly for ly in self.viewer.layers if isinstance(ly, Shapes)]
        combo.blockSignals(True)
        try:
            combo.clear()
            combo.addItem("(none)", None)
            for ly in choices:
                combo.addItem(ly.name, ly)
            index = next((i for i, ly in enumerate(choices) if _same(ly, keep)), -1)
            if index < 0 and not self._exemplars_off:
                index = next((i for i, ly in enumerate(choices) if ly.name == EXEMPLARS_NAME), -1)
            combo.setCurrentIndex(index + 1)
        finally:
            combo.blockSignals(False)

    @_guarded
    def _on_combo_changed(self, role: str, *_) -> None:
        if role == "exemplars":
            self._exemplars_off = self.exemplars_combo.currentIndex() == 0
        if role in self._bound:
            self._sync_role(role)

    def _sync_role(self, role: str) -> None:
        layer = {
            "image": self.image_layer,
            "points": self.points_layer,
            "shapes": self.shapes_layer,
            "exemplars": self.exemplars_layer,
        }[role]
        if _same(layer, self._bound[role]):
            return
        old = self._bound[role]
        self._bound[role] = layer
        if role == "image":
            self._supersede()
            self._clear_preview()
            self._mask_prompt = None
            self._run = None  # the threshold no longer moves a result of another image
            self._update_axis_info()
            if layer is not None:
                self._ensure_timer.start()
        elif role == "points":
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_prompt_data)
                old.bind_key("t", None, overwrite=True)
            if layer is not None:
                self._adopt_points(layer)
        elif role == "exemplars":
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_exemplars_data)
                old.bind_key("t", None, overwrite=True)
            if layer is not None:
                self._adopt_exemplars(layer)
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
        """Select (or create) "SAM3 points", "SAM3 boxes", "SAM3 labels" and the preview,
        with the image's dimensions (a stack gets nD prompt and labels layers)."""
        image = self.image_layer
        if image is None:
            return
        try:
            src = self._source(image)
        except _layers.LayerError as exc:
            self._report(f"SAM3: {exc}", "warning")
            return
        common = {"scale": image.scale, "translate": image.translate}
        shape, plane = src.spatial_shape, src.plane

        def find(name, kind, ok):
            return next(
                (
                    ly
                    for ly in self.viewer.layers
                    if ly.name == name and isinstance(ly, kind) and ok(ly)
                ),
                None,
            )

        labels = find(LABELS_NAME, Labels, lambda ly: tuple(ly.data.shape) == shape)
        if labels is None:
            data, folder = _new_labels_data(shape, src.n_lead)
            labels = self.viewer.add_labels(data, name=LABELS_NAME, opacity=0.6, **common)
            if folder is not None:
                self._report(
                    f"SAM3: the image is large: '{LABELS_NAME}' is a Zarr array in {folder} "
                    "(save it with File > Save)",
                    "info",
                )
        preview = self.preview_layer
        if preview is None or preview.ndim != src.ndim:
            preview = find(PREVIEW_NAME, Labels, lambda ly: ly.ndim == src.ndim)
            if preview is None:
                full = not src.n_lead and not src.large
                preview = self.viewer.add_labels(
                    np.zeros(plane if full else (1,) * src.ndim, np.int32),
                    name=PREVIEW_NAME,
                    opacity=0.5,
                    **common,
                )
            self._preview_layer = preview
        boxes = find(BOXES_NAME, Shapes, lambda ly: ly.ndim == src.ndim)
        if boxes is None:
            boxes = self.viewer.add_shapes(
                ndim=src.ndim,
                name=BOXES_NAME,
                edge_color="yellow",
                face_color="transparent",
                edge_width=max(1.0, max(plane) / 300),
                features={"object_id": np.zeros(0, int)},
                feature_defaults={"object_id": self.object_id},
                **common,
            )
        points = find(POINTS_NAME, Points, lambda ly: ly.ndim == src.ndim)
        if points is None:
            points = self.viewer.add_points(
                ndim=src.ndim,
                name=POINTS_NAME,
                size=float(np.clip(max(plane) / 60, 4, 30)),
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
        self._update_axis_info()
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

    # -- prompt and dims events -------------------------------------------------------------
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

    @_guarded
    def _on_step_changed(self, event=None) -> None:
        """Another slice: show the current object there if it has prompts on it."""
        self._update_axis_info()
        if self._bound["image"] is not None and self.object_id in self._prompt_ids_in_layers():
            self._schedule()

    @_guarded
    def _on_axis_changed(self, event=None) -> None:
        self._update_axis_info()

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
        if self._preview is not None:
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

    def _max_label(self, labels) -> int:
        """Largest id in a labels layer; a huge lazy one is not scanned (the widget's own
        writes count then)."""
        data = _unwrap(labels).data
        if not isinstance(data, np.ndarray) and int(np.prod(data.shape)) > LARGE_PIXELS:
            return self._max_written
        arr = np.asarray(data)
        return max(int(arr.max()) if arr.size else 0, 0)

    def new_object(self) -> int:
        """Switch to a fresh object id: one more than any label or prompt id."""
        labels = self.labels_layer
        max_label = self._max_label(labels) if labels is not None else 0
        new_id = _layers.next_object_id(max_label, self._prompt_ids_in_layers())
        self.object_id = new_id
        self._set_status(f"Object {new_id}: click points or draw a box")
        return new_id

    @_guarded
    def _on_new_object_clicked(self, *_) -> None:
        self.new_object()

    # -- model and cache --------------------------------------------------------------------
    def load_model(self, blocking: bool = False):
        """Load the model named in the line edit on the chosen device, with the cache
        location and tiling of the Cache section.

        Runs in a worker thread (returned) unless ``blocking``. A failure keeps
        the previous model and reports one line.
        """
        model = self.model_edit.text().strip() or DEFAULT_MODEL
        device = self.device_combo.currentText()
        if self.load_worker is not None:
            self._set_status("A model is already loading...")
            return self.load_worker
        try:
            tile, overlap = self._tiling_request()
        except _UserError as exc:
            self._report(f"SAM3: {exc}")
            return None
        cache = self.cache_edit.text().strip() or None
        args = (model, device, cache, tile, overlap, self._cache_warning_callback())
        self._set_status(f"Loading {model} on {device}...")
        if blocking:
            try:
                seg = _load_segmenter(*args)
            except Exception as exc:  # noqa: BLE001 - reported
                self._on_model_error(exc)
            else:
                self._on_model_loaded(seg)
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(_load_segmenter, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_model_loaded)
        worker.errored.connect(self._on_model_error)
        worker.finished.connect(self._on_model_finished)
        self.load_worker = worker
        self.load_button.setEnabled(False)
        self._update_progress()
        worker.start()
        return worker

    def _cache_warning_callback(self):
        """``on_cache_warning`` for the core: called from any thread, shown on the GUI
        thread as a napari warning."""
        ref = weakref.ref(self)

        def warn(message: str) -> None:
            widget = ref()
            if widget is None or _qt_deleted(widget):
                log.warning("SAM3: %s", message)
                return
            widget._cache_warning.emit(str(message))

        return warn

    @_guarded
    def _on_cache_warning(self, message: str) -> None:
        self._report(f"SAM3: {message}", "warning")

    def _tiling_request(self) -> tuple[int | None, int | None]:
        """(tile size, overlap) for loading: None, None (the model's defaults) until the
        user changes them."""
        if not self._tiling_custom:
            return None, None
        tile, overlap = int(self.tile_spin.value()), int(self.overlap_spin.value())
        if not 0 <= overlap < tile:
            raise _UserError(f"tile overlap {overlap} px must be smaller than the tile ({tile})")
        return tile, overlap

    @_guarded
    def _on_tiling_edited(self, *_) -> None:
        if self._setting_tiling:
            return
        self._tiling_custom = True
        if self.segmenter is not None:
            self._set_status(
                f"Tiles of {self.tile_spin.value()} px overlapping by "
                f"{self.overlap_spin.value()} px from the next job on"
            )

    def _show_tiling(self, segmenter) -> None:
        """Show the loaded model's defaults (unless the user chose other values)."""
        if self._tiling_custom:
            return
        self._setting_tiling = True
        try:
            self.tile_spin.setValue(int(segmenter.tile_size))
            self.overlap_spin.setValue(int(segmenter.overlap))
        finally:
            self._setting_tiling = False

    def _sync_tiling(self) -> None:
        """Apply edited tile settings to the loaded model while no worker uses it."""
        seg = self.segmenter
        if seg is None or self.current_worker is not None or self.task is not None:
            return
        tile, overlap = self._tiling_request()
        if tile is not None and (tile, overlap) != (seg.tile_size, seg.overlap):
            seg.tile_size, seg.overlap = tile, overlap

    @_guarded
    def _on_load_clicked(self, *_) -> None:
        self.load_model()

    @_guarded
    def _on_model_loaded(self, segmenter) -> None:
        self.segmenter = segmenter
        if self._concept_key is not None and self._concept_key[0] is not segmenter:
            self._concept, self._concept_key = None, None
        self._warned_no_model = False
        self._show_tiling(segmenter)
        store = getattr(segmenter, "store", None)
        where = getattr(store, "path", None)
        cache = f"cache {where}" if where is not None else "embeddings in memory"
        self._set_status(f"Model {segmenter.model_id} loaded on {segmenter.device} ({cache})")
        if self._preview is None and self.object_id in self._prompt_ids_in_layers():
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
        self._update_progress()

    # -- image, slices and prompts ----------------------------------------------------------
    def _source(self, layer=None) -> _Source:
        """The image layer (default: the chosen one) as the core sees it. Raises
        _UserError without an image and LayerError for one that cannot be used."""
        layer = self.image_layer if layer is None else layer
        if layer is None:
            raise _UserError("no image: add an image layer and choose it in the widget")
        raw = _unwrap(layer)
        data = raw.data[0] if raw.multiscale else raw.data
        n_lead, plane = _layers.image_geometry(data.shape, raw.rgb, raw.name)
        limits = None
        if not (raw.rgb and np.dtype(data.dtype) == np.uint8):
            limits = tuple(float(v) for v in raw.contrast_limits)
        return _Source(layer, data, bool(raw.rgb), n_lead, plane, limits)

    def current_slice(self, src: _Source | None = None) -> tuple[int, ...]:
        """Indices of the image's leading (z/t) axes at the viewer's current position;
        () for a 2D image."""
        src = self._source() if src is None else src
        if not src.n_lead:
            return ()
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        pos = np.asarray(src.layer.world_to_data(point), dtype=np.float64)
        shape = src.data.shape
        return tuple(int(np.clip(np.rint(pos[a]), 0, int(shape[a]) - 1)) for a in range(src.n_lead))

    def propagation_axis(self, src: _Source | None = None) -> tuple[int, dict[int, int]]:
        """(axis, fixed): the leading axis the user steps through (``dims.last_used``, else
        the first one), the other leading axes fixed at their current index."""
        src = self._source() if src is None else src
        if not src.n_lead:
            raise _UserError(
                f"'{src.layer.name}' is a 2D image: propagation needs a z-stack or time series"
            )
        dims = self.viewer.dims
        offset = int(dims.ndim) - src.ndim
        axis = int(dims.last_used) - offset
        if not 0 <= axis < src.n_lead:
            hidden = set(dims.not_displayed)
            axis = next((a for a in range(src.n_lead) if a + offset in hidden), 0)
        lead = self.current_slice(src)
        return axis, {a: lead[a] for a in range(src.n_lead) if a != axis}

    def field_of_view(self, src: _Source | None = None) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1) of the current plane visible on the canvas (data pixels
        of level 0, end exclusive), from the camera and the canvas size."""
        src = self._source() if src is None else src
        camera = self.viewer.scene.camera
        height, width = (float(v) for v in self.viewer.canvas.size)
        center = np.asarray(camera.center, dtype=np.float64)[-2:]
        half = np.array([height, width]) / (2.0 * float(camera.zoom))
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        rows, cols = list(self.viewer.dims.displayed)[-2:]
        corners = []
        for dr in (-1, 1):
            for dc in (-1, 1):
                p = point.copy()
                p[rows], p[cols] = center + half * (dr, dc)
                corners.append(np.asarray(src.layer.world_to_data(p), dtype=np.float64)[-2:])
        region = _layers.region_of(corners, src.plane)
        if region is None:
            raise _UserError("the image is not in view: nothing to precompute")
        return region

    def _prompt_slice_of(self, layer, src: _Source) -> list[tuple]:
        """The slice of each item (point or shape) of a prompt layer."""
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        if isinstance(_unwrap(layer), Points):
            coords = _layers.to_image_coords_nd(layer, src.layer, layer.data, point)
            return [tuple(int(v) for v in np.rint(c[: src.n_lead])) for c in coords]
        out = []
        for d in layer.data:
            c = _layers.to_image_coords_nd(layer, src.layer, d, point).mean(axis=0)
            out.append(tuple(int(v) for v in np.rint(c[: src.n_lead])))
        return out

    def _object_prompts(self, obj_id: int, src: _Source, only: tuple | None = None) -> dict:
        """``{slice: (ObjectPrompt or None, ignored shapes)}`` of one object (see
        ``_layers.prompts_by_slice``); with ``only``, that slice alone."""
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        kwargs = {}
        points, shapes = self.points_layer, self.shapes_layer
        if points is not None and len(points.data):
            kwargs["points"] = _layers.to_image_coords_nd(points, src.layer, points.data, point)
            kwargs["point_features"] = points.features
        if shapes is not None and len(shapes.data):
            kwargs["shapes"] = [
                _layers.to_image_coords_nd(shapes, src.layer, d, point) for d in shapes.data
            ]
            kwargs["shape_types"] = list(shapes.shape_type)
            kwargs["shape_features"] = shapes.features
        mask = None
        if self._mask_prompt is not None and self._mask_prompt[0] == obj_id:
            mask = self._mask_prompt[1:]
        return _layers.prompts_by_slice(
            obj_id, src.plane, n_lead=src.n_lead, mask=mask, only=only, **kwargs
        )

    # -- segmentation -----------------------------------------------------------------------
    def _request(self, quiet: bool) -> _Request | None:
        image_layer = self.image_layer
        if image_layer is None:
            if quiet:
                return None
            raise _UserError("no image: add an image layer and choose it in the widget")
        src = self._source(image_layer)
        lead = self.current_slice(src)
        obj_id = self.object_id
        prompt, ignored = self._object_prompts(obj_id, src, only=lead).get(lead, (None, 0))
        if prompt is None:
            if quiet:
                # a preview on another slice stays (it is only shown there)
                st = self._preview
                if st is None or st.lead == lead or obj_id not in self._prompt_ids_in_layers():
                    self._clear_preview()
                return None
            if self.segmenter is None:
                raise _UserError("no SAM3 model loaded: click 'Load model' first")
            where = f" on {_layers.format_slice(lead)}" if lead else ""
            raise _UserError(
                f"object {obj_id} has no prompt{where}: click points or draw a rectangle"
            )
        if self.segmenter is None:
            raise _UserError("no SAM3 model loaded: click 'Load model' first")
        return _Request(
            image=src.plane_at(lead),
            lead=lead,
            spatial_shape=src.spatial_shape,
            limits=src.limits,
            prompt=prompt,
            obj_id=obj_id,
            max_hole_area=int(self.max_hole_area.value()),
            max_sprinkle_area=int(self.max_sprinkle_area.value()),
            image_layer=image_layer,
            ignored=ignored,
        )

    def segment_current(self, quiet: bool = False) -> bool:
        """Segment the current object on the current slice in a worker; the result goes to
        the preview layer.

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
            self._sync_tiling()
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
            _shielded(_segment_job),
            self.segmenter,
            self._model_lock,
            req,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(functools.partial(self._on_job_step, job))
        worker.returned.connect(functools.partial(self._on_job_done, job))
        worker.errored.connect(functools.partial(self._on_job_error, job))
        worker.finished.connect(functools.partial(self._on_job_finished, job))
        self.current_worker = worker
        self._job_req = req
        self._job_step = ""
        where = f" on {_layers.format_slice(req.lead)}" if req.lead else ""
        self._set_status(f"Segmenting object {req.obj_id}{where}...")
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
            self._set_status("Encoding the image (once per image, tile or slice and contrast)...")
        elif step == "post-processing":
            self._set_status(f"Decoding object {self.object_id}...")
        self._update_progress()

    @_guarded
    def _on_job_done(self, job: int, result) -> None:
        req = self._job_req
        if not self._is_current(job) or req is None:
            return
        if req.obj_id != self.object_id or not _same(req.image_layer, self.image_layer):
            return
        obj, labels = result
        region = tuple(slice(int(s.start or 0), int(s.stop)) for s in obj.region)
        self._show_preview(_Preview(req.obj_id, req.lead, region, labels, req.spatial_shape))
        area = int(np.count_nonzero(labels))
        note = f"; {req.ignored} non-rectangle shape(s) ignored" if req.ignored else ""
        where = f" on {_layers.format_slice(req.lead)}" if req.lead else ""
        if area:
            self._set_status(
                f"Object {req.obj_id}{where}: {area} px (IoU {obj.iou_score:.2f}); "
                f"Commit to keep it{note}"
            )
        else:
            self._set_status(f"Object {req.obj_id}{where}: empty mask; add or move prompts{note}")

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
        self._update_progress()
        if job in self._cancelled:
            self._set_status("Segmentation cancelled: nothing changed")
            return
        if self._pending is not None:
            quiet, self._pending = self._pending, None
            self.segment_current(quiet=quiet)
        elif stopped:
            self._set_status(f"Object {self.object_id}: ready")

    def cancel(self) -> bool:
        """Stop the running segmentation (its result is dropped) and the running
        precompute or propagation (what it finished stays). True if anything ran."""
        self._timer.stop()
        self._pending = None
        stopped = []
        worker = self.current_worker
        if worker is not None:
            self._cancelled.add(self._job_seq)
            worker.quit()
            stopped.append("segmentation")
        task = self.task
        if task is not None and not task.cancelled:
            task.cancelled = True
            task.worker.quit()
            stopped.append(_TASK_NAMES.get(task.kind, task.kind))
        if not stopped:
            self._set_status("Nothing to cancel")
            return False
        self._set_status(f"Cancelling {' and '.join(stopped)} when the current step ends...")
        return True

    @_guarded
    def _on_cancel_clicked(self, *_) -> None:
        self.cancel()

    @_guarded
    def _on_segment_clicked(self, *_) -> None:
        self.segment_current(quiet=False)

    # -- preview ----------------------------------------------------------------------------
    def _show_preview(self, st: _Preview) -> None:
        """A 2D image segmented whole gets a full-size preview; otherwise the preview is
        the object's tile on its slice: a (1, ..., h, w) layer placed with ``translate``,
        so it shows on that slice only and never has the size of a huge image."""
        image = self.image_layer
        ndim = len(st.spatial_shape)
        scale = np.ones(ndim) if image is None else np.asarray(image.scale, dtype=np.float64)
        base = np.zeros(ndim) if image is None else np.asarray(image.translate, np.float64)
        data = st.labels.astype(np.int32, copy=False)
        if not st.full:
            data = data.reshape((1,) * len(st.lead) + data.shape)
        origin = np.array(st.lead + (st.region[0].start, st.region[1].start), dtype=np.float64)
        translate = base + scale * origin
        layer = self.preview_layer
        if layer is None or layer.ndim != ndim:
            layer = self.viewer.add_labels(
                data, name=PREVIEW_NAME, opacity=0.5, scale=scale, translate=translate
            )
            self._preview_layer = layer
            self._refresh_combos()
        else:
            if not np.allclose(layer.scale, scale):
                layer.scale = scale
            if not np.allclose(layer.translate, translate):
                layer.translate = translate
            layer.data = data
        self._preview = st

    def _clear_preview(self) -> None:
        self._preview = None
        layer = self.preview_layer
        if layer is not None and np.any(layer.data):
            layer.data = np.zeros(layer.data.shape, np.int32)

    # -- commit / refine --------------------------------------------------------------------
    def commit(self) -> bool:
        """Write the preview of the current object into the labels layer (undoable).

        Only the preview's slice and region are read and written (napari's
        ``data_setitem``, so undo works for NumPy and Zarr labels alike). Other
        objects keep their pixels unless "Overwrite other labels" is on. Then the
        object's prompts on that slice are removed and a new object id is chosen.
        """
        obj_id = self.object_id
        if self.current_worker is not None or self._timer.isActive():
            self._report(
                "SAM3: the preview is still being computed; commit when it is shown", "warning"
            )
            return False
        st = self._preview
        if st is None or st.obj_id != obj_id:
            self._report(f"SAM3: object {obj_id} has no preview to commit: segment it first")
            return False
        labels = self.labels_layer
        if labels is None:
            self._report("SAM3: no labels layer to commit into: choose one in the widget")
            return False
        data = _unwrap(labels).data
        if tuple(data.shape) != tuple(st.spatial_shape):
            self._report(
                f"SAM3: labels layer '{labels.name}' has shape {tuple(data.shape)}, "
                f"the image is {tuple(st.spatial_shape)}"
            )
            return False
        from .postprocess import paste_object

        crop = np.asarray(data[st.lead + st.region])
        idx, values = paste_object(
            crop, st.mask, obj_id, overwrite=self.overwrite_checkbox.isChecked()
        )
        if len(idx[0]):
            n = len(idx[0])
            full = tuple(np.full(n, v, dtype=np.intp) for v in st.lead) + (
                idx[0] + st.region[0].start,
                idx[1] + st.region[1].start,
            )
            labels.data_setitem(full, values)
        self._max_written = max(self._max_written, obj_id)
        written = int(np.count_nonzero(values == obj_id))
        self._remove_prompts(obj_id, st.lead)
        self._mask_prompt = None
        self._clear_preview()
        new_id = self.new_object()
        where = f" on {_layers.format_slice(st.lead)}" if st.lead else ""
        self._set_status(
            f"Committed object {obj_id}{where} ({written} px changed to it); now object {new_id}"
        )
        return True

    def _remove_prompts(self, obj_id: int, lead: tuple = ()) -> None:
        """Delete the object's points and shapes on slice ``lead`` (all of a 2D image)."""
        try:
            src = self._source()
        except (_UserError, _layers.LayerError):
            src = None
        for layer, handler in (
            (self.points_layer, self._on_prompt_data),
            (self.shapes_layer, self._on_shapes_data),
        ):
            if layer is None or not len(layer.data):
                continue
            idx = _layers.object_indices(layer.features, len(layer.data), obj_id)
            if lead and src is not None and len(idx):
                slices = self._prompt_slice_of(layer, src)
                idx = np.array([i for i in idx if slices[i] == lead], dtype=np.intp)
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
        """Segment the current object with its committed pixels on the current slice as a
        mask prompt."""
        obj_id = self.object_id
        labels = self.labels_layer
        if labels is None:
            self._report("SAM3: no labels layer: choose one in the widget")
            return False
        try:
            src = self._source()
        except (_UserError, _layers.LayerError) as exc:
            self._report(f"SAM3: {exc}")
            return False
        data = _unwrap(labels).data
        if tuple(data.shape) != src.spatial_shape:
            self._report(
                f"SAM3: labels layer '{labels.name}' has shape {tuple(data.shape)}, "
                f"the image is {src.spatial_shape}"
            )
            return False
        lead = self.current_slice(src)
        mask = np.asarray(data[lead]) == obj_id
        if not mask.any():
            where = f" on {_layers.format_slice(lead)}" if lead else ""
            self._report(f"SAM3: label {obj_id} has no pixels in '{labels.name}'{where} to refine")
            return False
        self._mask_prompt = (obj_id, lead, mask)
        return self.segment_current(quiet=False)

    @_guarded
    def _on_refine_clicked(self, *_) -> None:
        self.refine_selected()

    # -- long tasks: precompute and propagate -----------------------------------------------
    def _start_task(self, task: _Task, fn, *args) -> _Task:
        from napari.qt.threading import create_worker

        worker = create_worker(_shielded(fn), *args, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(functools.partial(self._on_task_yield, task))
        worker.returned.connect(functools.partial(self._on_task_returned, task))
        worker.errored.connect(functools.partial(self._on_task_error, task))
        worker.finished.connect(functools.partial(self._on_task_finished, task))
        task.worker = worker
        self.task = task
        for button in self._task_buttons():
            button.setEnabled(False)
        self._update_progress()
        worker.start()
        return task

    def _task_buttons(self) -> tuple:
        return (
            self.precompute_button,
            self.propagate_button,
            self.find_concept_button,
            self.everything_button,
            self.clear_result_button,
        )

    def _task_checks(self) -> _Source:
        if self.task is not None:
            name = _TASK_NAMES.get(self.task.kind, self.task.kind)
            raise _UserError(f"a {name} is running: wait for it or cancel it")
        if self.segmenter is None:
            raise _UserError("no SAM3 model loaded: click 'Load model' first")
        src = self._source()
        self._sync_tiling()
        return src

    def precompute(self, scope: str | None = None) -> bool:
        """Encode tiles ahead of clicks in a worker, with progress and Cancel.

        ``scope`` (default: the combo's choice): "field of view" (the tiles of the
        current plane visible on the canvas), "whole image" (every tile of the current
        plane) or "all slices" (every plane along the propagation axis). Tiles already
        cached are not encoded again; a cancelled run keeps the tiles it finished.
        """
        scope = scope or self.precompute_combo.currentText()
        if scope not in PRECOMPUTE_SCOPES:
            raise ValueError(f"scope must be one of {PRECOMPUTE_SCOPES}")
        try:
            src = self._task_checks()
            lead = self.current_slice(src)
            if scope == "field of view":
                jobs = [(src.plane_at(lead), src.limits, self.field_of_view(src))]
            elif scope == "all slices" and src.n_lead:
                axis, fixed = self.propagation_axis(src)
                view = _layers.AxisView(src.data, axis, fixed, src.n_lead)
                jobs = [
                    (src.plane_at(view.lead(k)), src.limits, None) for k in range(view.shape[0])
                ]
            else:
                jobs = [(src.plane_at(lead), src.limits, None)]
        except (_UserError, _layers.LayerError, PromptError) as exc:
            self._report(f"SAM3: {exc}")
            return False
        self._set_status(f"Precomputing ({scope})...")
        self._start_task(
            _Task("precompute"), _precompute_job, self.segmenter, self._model_lock, jobs
        )
        return True

    @_guarded
    def _on_precompute_clicked(self, *_) -> None:
        self.precompute()

    def propagate(self) -> bool:
        """Track the current object through the stack in a worker, writing each slice into
        the labels layer as it comes (progress: slices done; Cancel keeps the slices
        written, nothing is half-written).

        All slices' prompts of the object condition the tracker; only slices in the
        chosen range are changed, other objects' pixels are kept. Not undoable with
        napari's undo: re-propagate (e.g. forward from a corrected slice) instead.
        """
        try:
            src = self._task_checks()
            axis, fixed = self.propagation_axis(src)
            labels = self.labels_layer
            if labels is None:
                raise _UserError("no labels layer to write into: choose one in the widget")
            data = _unwrap(labels).data
            if tuple(data.shape) != src.spatial_shape:
                raise _UserError(
                    f"labels layer '{labels.name}' has shape {tuple(data.shape)}, "
                    f"the image is {src.spatial_shape}"
                )
            obj_id = self.object_id
            prompts = {
                key[axis]: {obj_id: prompt}
                for key, (prompt, _) in self._object_prompts(obj_id, src).items()
                if prompt is not None and all(key[a] == v for a, v in fixed.items())
            }
            depth = int(src.data.shape[axis])
            start = int(self.start_spin.value())
            stop = min(int(self.stop_spin.value()), depth - 1) + 1
            if not prompts:
                raise _UserError(
                    f"object {obj_id} has no prompt on this stack: click points or draw a "
                    "rectangle on a slice first"
                )
            if start >= stop:
                raise _UserError(f"empty slice range {start} to {stop - 1}")
            if not any(start <= k < stop for k in prompts):
                raise _UserError(
                    f"object {obj_id} has no prompt on slices {start} to {stop - 1} "
                    f"(prompted: {', '.join(map(str, sorted(prompts)))})"
                )
        except (_UserError, _layers.LayerError, PromptError) as exc:
            self._report(f"SAM3: {exc}")
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
        task = _Task(
            "propagation",
            total=stop - start,
            obj_id=obj_id,
            labels=labels,
            view=_layers.AxisView(data, axis, fixed, src.n_lead),
            max_hole_area=int(self.max_hole_area.value()),
            max_sprinkle_area=int(self.max_sprinkle_area.value()),
        )
        self._set_status(f"Propagating object {obj_id} through slices {start} to {stop - 1}...")
        self._start_task(
            task, _propagate_job, self.segmenter, self._model_lock, src.data, prompts, kwargs
        )
        return True

    @_guarded
    def _on_propagate_clicked(self, *_) -> None:
        self.propagate()

    @_guarded
    def _on_start_here_clicked(self, *_) -> None:
        src = self._source()
        axis, _ = self.propagation_axis(src)
        self.start_spin.setValue(self.current_slice(src)[axis])

    @_guarded
    def _on_task_yield(self, task: _Task, value) -> None:
        if task is not self.task or task.cancelled:
            return  # a slice that arrives after Cancel is dropped whole
        if task.kind in ("concept", "everything"):
            self._instances_step(task, value)
            return
        if task.kind == "precompute":
            task.done, task.total, task.encoded = value
            self._set_status(
                f"Precomputing: {task.done}/{task.total} tiles "
                f"({task.encoded} encoded, {task.done - task.encoded} already cached)"
            )
        else:
            self._write_slice(task, value)
        self._update_progress()

    def _write_slice(self, task: _Task, result) -> None:
        """One propagated slice into the labels layer, whole, on the GUI thread."""
        from .segmenter import write_slice

        if not self._layer_alive(task.labels):
            task.cancelled = True
            task.worker.quit()
            self._report("SAM3: the labels layer was removed: propagation stopped", "warning")
            return
        write_slice(task.view, result, task.max_hole_area, task.max_sprinkle_area)
        task.labels.refresh()
        task.written.add(int(result.index))
        task.done = len(task.written)
        self._max_written = max(self._max_written, task.obj_id)
        self._set_status(
            f"Propagating object {task.obj_id}: {task.done}/{task.total} slices "
            f"(slice {result.index})"
        )

    @_guarded
    def _on_task_returned(self, task: _Task, value) -> None:
        if task is self.task and not task.cancelled and task.kind in ("concept", "everything"):
            task.results = value

    @_guarded
    def _on_task_progress(self, task: _Task, done: int, total: int) -> None:
        if task is not self.task or task.cancelled:
            return
        task.done, task.total = int(done), int(total)
        self._update_progress()

    @_guarded
    def _on_task_error(self, task: _Task, exc) -> None:
        exc = getattr(exc, "original", exc)  # _WorkerError
        if task.cancelled or isinstance(exc, _Cancelled):
            return
        task.failed = True
        if task.kind == "concept" and task.step == "loading":
            from .model import ModelLoadError

            msg = _user_message(exc)
            if not isinstance(exc, ModelLoadError):
                msg = f"cannot load the concept model: {msg}"
            self._report(f"SAM3: {msg}")
            return
        name = {"concept": "Find concept", "everything": "Segment everything"}.get(
            task.kind, task.kind
        )
        self._report(f"SAM3: {name} failed: {_user_message(exc)}")

    @_guarded
    def _on_task_finished(self, task: _Task, *_) -> None:
        if task is not self.task:
            return
        self.task = None
        for button in self._task_buttons():
            button.setEnabled(True)
        self._update_progress()
        if task.kind in ("concept", "everything"):
            self._finish_instances(task)
            return
        if task.failed:
            return
        if task.kind == "precompute":
            if task.cancelled:
                self._set_status(
                    f"Precompute cancelled: {task.done} of {task.total} tiles done "
                    "(they stay cached)"
                )
            else:
                self._set_status(
                    f"Precomputed {task.total} tiles ({task.encoded} encoded, "
                    f"{task.total - task.encoded} were cached)"
                )
            return
        done = sorted(task.written)
        span = f" ({done[0]} to {done[-1]})" if done else ""
        if task.cancelled:
            self._set_status(
                f"Propagation cancelled: {len(done)} slice(s) written{span}, the others unchanged"
            )
        else:
            self._set_status(f"Propagated object {task.obj_id}: {len(done)} slice(s) written{span}")

    def _update_axis_info(self) -> None:
        """The propagation axis line, and the slice range reset to the whole axis when the
        image or the axis changes."""
        try:
            src = self._source() if self.image_layer is not None else None
        except (_UserError, _layers.LayerError):
            src = None
        scope = getattr(self, "scope_combo", None)
        if scope is not None:
            scope.setEnabled(bool(src is not None and src.n_lead))
        if src is None or not src.n_lead:
            self._axis_state = None
            self.axis_label.setText("Choose a z-stack or time series to propagate through it")
            return
        axis, fixed = self.propagation_axis(src)
        depth = int(src.data.shape[axis])
        state = (id(_unwrap(src.layer)), axis, depth)
        if state != self._axis_state:
            self._axis_state = state
            for spin in (self.start_spin, self.stop_spin):
                spin.setRange(0, depth - 1)
            self.start_spin.setValue(0)
            self.stop_spin.setValue(depth - 1)
        note = "".join(f"; axis {a} stays at {v}" for a, v in sorted(fixed.items()))
        self.axis_label.setText(f"Along axis {axis} of '{src.layer.name}' ({depth} slices){note}")

    # -- segment everything / concepts -------------------------------------------------------
    @property
    def concept(self):
        """The ``ConceptSegmenter`` in use (None until the first *Find concept*)."""
        return self._concept

    @property
    def last_run(self) -> _InstanceRun | None:
        """The last concept / everything result written (None once cleared or edited)."""
        return self._run

    @property
    def threshold(self) -> float:
        return float(self.threshold_spin.value())

    @property
    def exemplar_positive(self) -> bool:
        """Polarity of new exemplar rectangles."""
        return self.exemplar_positive_checkbox.isChecked()

    def everything_settings(self):
        """``EverythingSettings`` from the section's parameters and the post-processing ones."""
        from .everything import EverythingSettings

        return EverythingSettings(
            points_per_side=int(self.points_per_side_spin.value()),
            pred_iou_thresh=float(self.pred_iou_spin.value()),
            stability_score_thresh=float(self.stability_spin.value()),
            min_area=int(self.min_area_spin.value()),
            max_hole_area=int(self.max_hole_area.value()),
            max_sprinkle_area=int(self.max_sprinkle_area.value()),
        )

    # exemplars layer
    def draw_exemplars(self):
        """Make the exemplars layer (created as "SAM3 exemplars" if none is chosen) active in
        rectangle mode; returns it."""
        src = self._source()
        layer = self.exemplars_layer
        if layer is None:
            layer = next(
                (
                    ly
                    for ly in self.viewer.layers
                    if ly.name == EXEMPLARS_NAME and isinstance(ly, Shapes) and ly.ndim == src.ndim
                ),
                None,
            )
            if layer is None:
                image = src.layer
                color = _layers.POSITIVE_COLOR if self.exemplar_positive else _layers.NEGATIVE_COLOR
                layer = self.viewer.add_shapes(
                    ndim=src.ndim,
                    name=EXEMPLARS_NAME,
                    edge_color=[color],
                    face_color="transparent",
                    edge_width=max(1.0, max(src.plane) / 300),
                    features={"positive": np.zeros(0, bool)},
                    feature_defaults={"positive": self.exemplar_positive},
                    scale=image.scale,
                    translate=image.translate,
                )
            self._exemplars_off = False
            self._refresh_combos()
            self._select(self.exemplars_combo, layer)
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self._set_status(
            f"Draw rectangles around example objects in '{layer.name}' "
            f"({'positive' if self.exemplar_positive else 'negative'}; key t toggles)"
        )
        return layer

    @_guarded
    def _on_draw_exemplars_clicked(self, *_) -> None:
        try:
            self.draw_exemplars()
        except (_UserError, _layers.LayerError) as exc:
            self._report(f"SAM3: {exc}")

    def _adopt_exemplars(self, layer) -> None:
        if "positive" not in layer.features:
            new = layer.features.copy()
            new["positive"] = np.ones(len(layer.data), dtype=bool)
            layer.features = new
        _set_feature_default(layer, "positive", self.exemplar_positive)
        self._non_rect_exemplars = _layers.count_non_rectangles(layer.shape_type)
        layer.events.data.connect(self._on_exemplars_data)
        layer.bind_key("t", self._on_exemplar_t_key, overwrite=True)
        self._recolor_exemplars(layer)

    def _recolor_exemplars(self, layer) -> None:
        n = len(layer.data)
        if n == 0:
            return
        pos = _layers.feature_column(layer.features, "positive", n, True)
        colors = _layers.polarity_colors(pos)
        current = np.asarray(layer.edge_color)
        if current.shape != colors.shape or not np.allclose(current, colors):
            layer.edge_color = colors

    @_guarded
    def _on_exemplars_data(self, event) -> None:
        if str(getattr(event, "action", "")) in _UNFINISHED:
            return
        layer = self.exemplars_layer
        if layer is None:
            return
        self._recolor_exemplars(layer)
        count = _layers.count_non_rectangles(layer.shape_type)
        if count > self._non_rect_exemplars:
            self._report(
                f"SAM3 uses rectangles as exemplars: {count} non-rectangle "
                f"shape{'s' if count != 1 else ''} in '{layer.name}' ignored",
                "info",
            )
        self._non_rect_exemplars = count

    def _on_exemplar_t_key(self, layer=None) -> None:
        if self._closed or _qt_deleted(self):
            self._detach()
            return
        try:
            self.toggle_exemplar_polarity()
        except Exception as exc:  # noqa: BLE001 - called from napari's key handler
            self._report(f"SAM3: {_user_message(exc)}")

    def toggle_exemplar_polarity(self) -> bool:
        """Flip the polarity of new exemplars and of the selected ones; returns the new one."""
        self.exemplar_positive_checkbox.setChecked(not self.exemplar_positive)
        return self.exemplar_positive

    @_guarded
    def _on_exemplar_positive_toggled(self, checked: bool) -> None:
        layer = self.exemplars_layer
        if layer is None:
            return
        _set_feature_default(layer, "positive", bool(checked))
        selected = sorted(i for i in layer.selected_data if i < len(layer.data))
        if selected:
            n = len(layer.data)
            pos = np.array(_layers.feature_column(layer.features, "positive", n, True), bool)
            pos[selected] = ~pos[selected]
            feats = layer.features.copy()
            feats["positive"] = pos
            layer.features = feats
            self._recolor_exemplars(layer)
        self._set_status(
            f"New exemplars are {'positive' if checked else 'negative'}"
            + (f"; {len(selected)} selected exemplar(s) flipped" if selected else "")
        )

    def _exemplar_prompts(self, src: _Source) -> tuple[dict, int]:
        """``({slice: (boxes, labels)}, ignored shapes)`` of the exemplars layer."""
        layer = self.exemplars_layer
        if layer is None or not len(layer.data):
            return {}, 0
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        shapes = [_layers.to_image_coords_nd(layer, src.layer, d, point) for d in layer.data]
        return _layers.exemplar_boxes_by_slice(
            shapes, list(layer.shape_type), layer.features, src.plane, src.n_lead
        )

    # running
    def _scope_leads(self, src: _Source, scope: str) -> tuple[list[tuple], int]:
        """The slices a run covers and the axis they run along."""
        if scope not in INSTANCE_SCOPES:
            raise ValueError(f"scope must be one of {INSTANCE_SCOPES}")
        if scope == "whole stack" and src.n_lead:
            axis, fixed = self.propagation_axis(src)
            view = _layers.AxisView(src.data, axis, fixed, src.n_lead)
            return [view.lead(k) for k in range(view.shape[0])], axis
        return [self.current_slice(src)], 0

    def _instances_checks(self):
        src = self._task_checks()
        labels = self.labels_layer
        if labels is None:
            raise _UserError("no labels layer to write into: choose one in the widget")
        data = _unwrap(labels).data
        if tuple(data.shape) != src.spatial_shape:
            raise _UserError(
                f"labels layer '{labels.name}' has shape {tuple(data.shape)}, "
                f"the image is {src.spatial_shape}"
            )
        return src, labels

    def _progress_callback(self, task: _Task):
        """``progress(done, total)`` for the core, called in the worker: raises once Cancel
        was pressed, else shows the progress on the GUI thread."""
        ref = weakref.ref(self)

        def progress(done, total):
            if task.cancelled:
                raise _Cancelled()
            widget = ref()
            if widget is not None and not _qt_deleted(widget):
                widget._task_progress.emit(task, int(done), int(total))

        return progress

    def find_concept(self, scope: str | None = None) -> bool:
        """Find every instance of the concept (text and/or exemplars) in a worker and write
        them into the labels layer, one id each (see the module docstring).

        ``scope`` (default: the combo's): "current slice" or, for stacks, "whole stack".
        The concept detector is loaded on first use (same device, dtype, tiling and cache
        folder as the model above). Returns False (one line reported) when it cannot start.
        """
        scope = scope or self.scope_combo.currentText()
        try:
            src, labels = self._instances_checks()
            text = self.concept_text_edit.text().strip() or None
            leads, axis = self._scope_leads(src, scope)
            by_slice, ignored = self._exemplar_prompts(src)
            exemplars = _layers.exemplars_for_slices(by_slice, leads, axis)
            if text is None and all(ex is None for ex in exemplars):
                raise _UserError(
                    "type a concept (e.g. nucleus) or draw exemplar rectangles "
                    f"('{EXEMPLARS_NAME}') first"
                )
        except (_UserError, _layers.LayerError, PromptError) as exc:
            self._report(f"SAM3: {exc}")
            return False
        planes = []
        for lead, ex in zip(leads, exemplars, strict=True):
            boxes, box_labels = ex if ex is not None else (None, None)
            planes.append((lead, src.plane_at(lead), boxes, box_labels))
        options = {
            "threshold": self.threshold,
            "min_score": DEFAULT_MIN_SCORE,
            "limits": src.limits,
            "max_hole_area": int(self.max_hole_area.value()),
            "max_sprinkle_area": int(self.max_sprinkle_area.value()),
        }
        model = self.concept_model_edit.text().strip() or None
        key = (self.segmenter, model)
        holder = {}
        if self._concept is not None and self._concept_key == key:
            self._concept.tile_size = self.segmenter.tile_size
            self._concept.overlap = self.segmenter.overlap
            holder["concept"] = self._concept
        n_ex = sum(len(ex[0]) for ex in by_slice.values())
        if text and n_ex:
            source = f"concept '{text}' + exemplars"
        else:
            source = f"concept '{text}'" if text else "exemplars"
        task = _Task(
            "concept",
            labels=labels,
            source=source,
            n_lead=src.n_lead,
            spatial_shape=src.spatial_shape,
            holder=holder,
            concept_key=key,
        )
        note = f" ({ignored} non-rectangle exemplar shape(s) ignored)" if ignored else ""
        self._set_status(f"Finding {source}...{note}")
        self._start_task(
            task,
            _concept_job,
            self.segmenter,
            self._model_lock,
            holder,
            model,
            planes,
            text,
            options,
            self._progress_callback(task),
        )
        return True

    @_guarded
    def _on_find_concept_clicked(self, *_) -> None:
        self.find_concept()

    def segment_everything(self, scope: str | None = None) -> bool:
        """Segment every object (point grid, no concept) in a worker with the section's
        parameters and write them into the labels layer, one id each."""
        scope = scope or self.scope_combo.currentText()
        try:
            src, labels = self._instances_checks()
            leads, _ = self._scope_leads(src, scope)
            settings = self.everything_settings()
        except (_UserError, _layers.LayerError, PromptError, ValueError) as exc:
            self._report(f"SAM3: {exc}")
            return False
        planes = [(lead, src.plane_at(lead)) for lead in leads]
        task = _Task(
            "everything",
            labels=labels,
            source="everything",
            n_lead=src.n_lead,
            spatial_shape=src.spatial_shape,
        )
        self._set_status("Segmenting everything...")
        self._start_task(
            task,
            _everything_job,
            self.segmenter,
            self._model_lock,
            planes,
            settings,
            src.limits,
            self._progress_callback(task),
        )
        return True

    @_guarded
    def _on_everything_clicked(self, *_) -> None:
        self.segment_everything()

    def _instances_step(self, task: _Task, value) -> None:
        task.step = value[0]
        if value[0] == "loading":
            self._set_status(f"Loading the concept model {value[1]} (once)...")
            return
        _, i, n, lead = value
        what = f"Finding {task.source}" if task.kind == "concept" else "Segmenting everything"
        where = f" on {_layers.format_slice(lead)} ({i + 1}/{n})" if lead else ""
        self._set_status(f"{what}{where}...")

    def _finish_instances(self, task: _Task) -> None:
        concept = task.holder.get("concept")
        if concept is not None and task.concept_key and task.concept_key[0] is self.segmenter:
            self._concept, self._concept_key = concept, task.concept_key
        name = "Find concept" if task.kind == "concept" else "Segment everything"
        if task.cancelled:
            self._set_status(f"{name} cancelled: the labels are unchanged")
            return
        if task.failed or task.results is None:
            return
        try:
            self._start_run(task)
        except _UserError as exc:
            self._report(f"SAM3: {exc}")

    def _start_run(self, task: _Task) -> None:
        """Keep the labels under the new result, then write it."""
        labels = task.labels
        if not self._layer_alive(labels):
            raise _UserError("the labels layer was removed: nothing written")
        data = _unwrap(labels).data
        if tuple(data.shape) != tuple(task.spatial_shape):
            raise _UserError(f"labels layer '{labels.name}' changed shape: nothing written")
        plane = tuple(int(v) for v in task.spatial_shape[-2:])
        planes = []
        for lead, res in task.results:
            items = res.candidates if task.kind == "concept" else res.instances
            region = _layers.union_region([x.bbox for x in items], plane)
            base = None
            if region is not None:
                base = np.array(data[tuple(lead) + _layers.region_slices(region)])
            planes.append(_RunPlane(tuple(lead), res, region, base))
        start_id = _layers.next_object_id(self._max_label(labels), self._prompt_ids_in_layers())
        run = _InstanceRun(
            kind=task.kind,
            source=task.source,
            labels=labels,
            planes=planes,
            start_id=start_id,
            base_features=_base_features(labels),
            n_lead=task.n_lead,
            spatial_shape=tuple(task.spatial_shape),
        )
        self._run = None
        if self._write_run(run, self.threshold if task.kind == "concept" else None):
            self._run = run

    def _run_currents(self, run: _InstanceRun) -> list | None:
        """The labels over each plane's region now, if they are still what the run's last
        write left there; else None (reported, and the run is dropped)."""
        if not self._layer_alive(run.labels):
            self._run = None
            raise _UserError("the labels layer of the last result was removed")
        data = _unwrap(run.labels).data
        if tuple(data.shape) != run.spatial_shape:
            self._run = None
            raise _UserError(f"labels layer '{run.labels.name}' changed shape")
        currents = []
        for p in run.planes:
            if p.region is None:
                currents.append(None)
            elif p.written is None:
                currents.append(p.base)
            else:
                cur = np.asarray(data[p.lead + _layers.region_slices(p.region)])
                if _layers.digest(cur) != p.written:
                    self._run = None
                    self._report(
                        "SAM3: the labels under the last result were edited since it was "
                        "written: it can no longer be re-thresholded or cleared (run it again)",
                        "warning",
                    )
                    return None
                currents.append(cur)
        return currents

    def _write_planes(self, run: _InstanceRun, currents: list, outs: list) -> bool:
        """Write what changed between ``currents`` and ``outs``: one ``data_setitem`` (one
        undo step) up to ``UNDO_PIXELS`` changed pixels, else region by region (no undo).
        Returns whether it is undoable."""
        labels = run.labels
        data = _unwrap(labels).data
        dtype = np.dtype(data.dtype)
        parts: list[list[np.ndarray]] = [[] for _ in range(run.n_lead + 2)]
        values = []
        for p, cur, out in zip(run.planes, currents, outs, strict=True):
            if out is None:
                continue
            rr, cc = np.nonzero(out != cur)
            if not rr.size:
                continue
            for a, v in enumerate(p.lead):
                parts[a].append(np.full(rr.size, v, dtype=np.intp))
            parts[-2].append(rr + p.region[0])
            parts[-1].append(cc + p.region[1])
            values.append(out[rr, cc])
        changed = sum(v.size for v in values)
        undoable = True
        if changed and changed <= UNDO_PIXELS:
            labels.data_setitem(
                tuple(np.concatenate(x) for x in parts),
                np.concatenate(values).astype(dtype, copy=False),
            )
        elif changed:
            undoable = False
            for p, out in zip(run.planes, outs, strict=True):
                if out is not None:
                    data[p.lead + _layers.region_slices(p.region)] = out
            labels.refresh()
        for p, out in zip(run.planes, outs, strict=True):
            if out is not None:
                p.written = _layers.digest(out)
        return undoable

    def _write_run(self, run: _InstanceRun, threshold: float | None) -> bool:
        """(Re)write the run over its kept labels with ``threshold`` (concepts) and the
        current overwrite setting; update the features table. False when nothing could be
        written (reported)."""
        try:
            currents = self._run_currents(run)
        except _UserError as exc:
            self._report(f"SAM3: {exc}")
            return False
        if currents is None:
            return False
        dtype = np.dtype(_unwrap(run.labels).data.dtype)
        most = sum(
            len(p.result.candidates if run.kind == "concept" else p.result.instances)
            for p in run.planes
        )
        if dtype.kind in "iu" and run.start_id + most - 1 > np.iinfo(dtype).max:
            self._report(
                f"SAM3: labels layer '{run.labels.name}' is {dtype.name}: it cannot hold ids up "
                f"to {run.start_id + most - 1}; use an int32 labels layer"
            )
            self._run = None
            return False
        overwrite = self.overwrite_checkbox.isChecked()
        plane = run.spatial_shape[-2:]
        next_id = run.start_id
        outs, tables, floor = [], [], 0.0
        for p in run.planes:
            if p.region is None:
                outs.append(None)
                continue
            out = p.base.copy()
            view = _layers.OffsetView(out, p.region[:2], plane)
            if run.kind == "concept":
                floor = max(floor, p.result.min_score)
                t = max(float(threshold), p.result.min_score)
                p.result.relabel(t, out=view, overwrite=overwrite, start_id=next_id)
            else:
                p.result.labels(view, overwrite=overwrite, start_id=next_id)
            if p.result.painted.ids:
                next_id = int(p.result.painted.ids[-1]) + 1
            tables.append(_feature_rows(run, p))
            outs.append(out)
        undoable = self._write_planes(run, currents, outs)
        _set_features(run.labels, run.base_features, tables)
        ids = [int(i) for t in tables for i in t["index"]]
        run.threshold = threshold
        run.count = len(ids)
        run.ids = (min(ids), max(ids)) if ids else None
        if ids:
            self._max_written = max(self._max_written, max(ids))
            if (
                run.ids[0] <= self.object_id <= run.ids[1]
                and self.object_id not in self._prompt_ids_in_layers()
            ):
                self.object_id = run.ids[1] + 1
        what = (
            f"{run.source[0].upper()}{run.source[1:]}"
            if run.kind == "concept"
            else "Segment everything"
        )
        span = f" (ids {run.ids[0]}-{run.ids[1]})" if run.ids else ""
        where = f" on {len(run.planes)} slices" if len(run.planes) > 1 else ""
        above = ""
        if run.kind == "concept":
            above = f" above {max(float(threshold), floor):.3f}"
            if float(threshold) < floor:
                above += f" (all kept at detection; Find concept again to go below {floor:g})"
        note = "" if undoable else "; too large for undo: use Clear last result"
        self._set_status(
            f"{what}: {run.count} instance(s){above}{where} in '{run.labels.name}'{span}{note}"
        )
        return True

    def apply_threshold(self, threshold: float | None = None) -> bool:
        """Re-filter the last concept result at ``threshold`` (default: the spin box's; a
        value given here is shown there) and rewrite it; no model call."""
        self._threshold_timer.stop()
        if threshold is not None:
            self._set_threshold_controls(float(threshold))
        run = self._run
        if run is None or run.kind != "concept":
            self._set_status(f"Threshold {self.threshold:.3f}: used by the next Find concept")
            return False
        return self._write_run(run, self.threshold)

    def _set_threshold_controls(self, value: float) -> None:
        for w in (self.threshold_spin, self.threshold_slider):
            w.blockSignals(True)
        try:
            self.threshold_spin.setValue(value)
            self.threshold_slider.setValue(round(self.threshold_spin.value() * 1000))
        finally:
            for w in (self.threshold_spin, self.threshold_slider):
                w.blockSignals(False)

    @_guarded
    def _on_threshold_slider(self, value: int) -> None:
        self.threshold_spin.setValue(value / 1000.0)  # -> _on_threshold_changed

    @_guarded
    def _on_threshold_changed(self, value: float) -> None:
        self.threshold_slider.blockSignals(True)
        try:
            self.threshold_slider.setValue(round(float(value) * 1000))
        finally:
            self.threshold_slider.blockSignals(False)
        if self._run is not None and self._run.kind == "concept":
            self._threshold_timer.start()
        else:
            self._set_status(f"Threshold {float(value):.3f}: used by the next Find concept")

    @_guarded
    def _on_threshold_timeout(self) -> None:
        self.apply_threshold()

    def clear_last_result(self) -> bool:
        """Restore the labels (and features) the last concept / everything result was
        written over, if they were not edited since."""
        run = self._run
        if run is None:
            self._set_status("No result to clear")
            return False
        if self.task is not None:
            self._report("SAM3: a job is running: wait for it or cancel it")
            return False
        try:
            currents = self._run_currents(run)
        except _UserError as exc:
            self._report(f"SAM3: {exc}")
            return False
        if currents is None:
            return False
        outs = [None if p.region is None else p.base for p in run.planes]
        self._write_planes(run, currents, outs)
        run.labels.features = run.base_features
        self._run = None
        self._set_status(f"Cleared the last result ({run.count} instance(s) removed)")
        return True

    @_guarded
    def _on_clear_result_clicked(self, *_) -> None:
        self.clear_last_result()


# -- features of concept / everything results ---------------------------------------------------
def _set_feature_default(layer, name: str, value) -> None:
    """Set one feature default of a layer, keeping the other columns' defaults."""
    current = layer.feature_defaults
    defaults = {k: current[k].iloc[0] for k in current.columns} if len(current) else {}
    defaults[name] = value
    layer.feature_defaults = defaults


def _base_features(labels):
    """The layer's features as a DataFrame with an ``index`` column (label id per row)."""
    import pandas as pd

    base = pd.DataFrame(labels.features).copy()
    if len(base) and "index" not in base.columns:
        base.insert(0, "index", np.arange(len(base)))  # napari's default: row k is label k
    return base


def _feature_rows(run: _InstanceRun, plane: _RunPlane):
    """The features of one plane's written instances (index, score, area, ..., source,
    slice)."""
    import pandas as pd

    table = pd.DataFrame(plane.result.features)
    table["source"] = run.source
    if run.n_lead == 1:
        table["slice"] = int(plane.lead[0])
    else:
        for a, v in enumerate(plane.lead):
            table[f"axis_{a}"] = int(v)
    return table


def _set_features(labels, base, tables) -> None:
    """The labels layer's features: the rows it had (but for reused ids), then ``tables``."""
    import pandas as pd

    new = [t for t in tables if len(t)]
    frames = []
    new_ids = set()
    for t in new:
        new_ids.update(int(i) for i in t["index"])
    if len(base):
        frames.append(base[~base["index"].isin(new_ids)] if new_ids else base)
    frames += new
    labels.features = pd.concat(frames, ignore_index=True) if frames else base
