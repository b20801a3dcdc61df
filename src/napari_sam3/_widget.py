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

Code: ``Sam3Widget`` (here) holds the shared state, the status line and progress bar,
Cancel and the widget's lifetime in its dock; each section is a mixin in its own module:

- ``_widget_controls``: the group boxes and their wiring;
- ``_widget_layers``: layer choices, the layers the widget creates, the image's geometry
  (and ``LARGE_PIXELS``);
- ``_widget_prompts``: points and boxes, polarity, object ids, prompts per slice;
- ``_widget_model``: loading the model, cache warnings, tiling;
- ``_widget_segment``: click segmentation, live preview, commit and refine;
- ``_widget_tasks``: precompute, propagate and the long-task machinery;
- ``_widget_exemplars``: the exemplars layer of Find concept;
- ``_widget_instances``: Find concept and Segment everything;
- ``_widget_results``: writing, re-thresholding and clearing their result (and
  ``UNDO_PIXELS``).

``_widget_jobs`` holds what worker threads run, ``_widget_errors`` how errors are reported.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
from napari.utils import notifications
from qtpy.QtCore import QEvent, QTimer, Signal
from qtpy.QtWidgets import QWidget

from ._scratch_labels import ScratchFolders
from ._widget_controls import DEFAULT_THRESHOLD, DEVICES, DIRECTIONS, _ControlsMixin
from ._widget_errors import _guarded, _qt_deleted
from ._widget_exemplars import _ExemplarsMixin
from ._widget_instances import DEFAULT_MIN_SCORE, INSTANCE_SCOPES, _InstancesMixin
from ._widget_jobs import _TASK_NAMES, _Request, _Task
from ._widget_layers import (
    BOXES_NAME,
    EXEMPLARS_NAME,
    LABELS_NAME,
    POINTS_NAME,
    PREVIEW_NAME,
    _LayersMixin,
)
from ._widget_model import DEFAULT_MODEL, _ModelMixin
from ._widget_prompts import _PromptsMixin
from ._widget_results import _InstanceRun, _ResultsMixin
from ._widget_segment import _Preview, _SegmentMixin
from ._widget_tasks import PRECOMPUTE_SCOPES, _TasksMixin

if TYPE_CHECKING:
    import napari

__all__ = [
    "BOXES_NAME",
    "DEBOUNCE_MS",
    "DEFAULT_MIN_SCORE",
    "DEFAULT_MODEL",
    "DEFAULT_THRESHOLD",
    "DEVICES",
    "DIRECTIONS",
    "EXEMPLARS_NAME",
    "INSTANCE_SCOPES",
    "LABELS_NAME",
    "POINTS_NAME",
    "PRECOMPUTE_SCOPES",
    "PREVIEW_NAME",
    "THRESHOLD_DEBOUNCE_MS",
    "Sam3Widget",
]

DEBOUNCE_MS = 150
THRESHOLD_DEBOUNCE_MS = 40


def _offer_delete(message: str, delete) -> None:
    """A warning with a *Delete* button (napari notification actions): never blocks."""
    from napari.utils.notifications import Notification, NotificationSeverity

    notifications.notification_manager.dispatch(
        Notification(message, severity=NotificationSeverity.WARNING,
                     actions=[("Delete", lambda *_: delete())])
    )


class Sam3Widget(
    _ControlsMixin,
    _LayersMixin,
    _PromptsMixin,
    _ModelMixin,
    _SegmentMixin,
    _TasksMixin,
    _ExemplarsMixin,
    _InstancesMixin,
    _ResultsMixin,
    QWidget,
):
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
        from .core.postprocess import DEFAULTS

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
        self._scratch = ScratchFolders(layers, _offer_delete)
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layers_changed)
        for layer in layers:
            layer.events.name.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_step_changed)
        self.viewer.dims.events.last_used.connect(self._on_axis_changed)
        self._refresh_combos()
        self._set_status("Load a model, choose an image, then click points or draw a box.")

    # -- status and progress ----------------------------------------------------------------
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

    # -- lifetime: napari's dock ------------------------------------------------------------
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
        self._scratch.disconnect()
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
