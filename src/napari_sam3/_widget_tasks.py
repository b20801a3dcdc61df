"""Long tasks in a worker with progress and Cancel (all kinds); precompute and propagate."""

from __future__ import annotations

import functools
import weakref

from . import _layers
from ._labels_history import RecordedWrites, UndoStep
from ._widget_errors import _Cancelled, _guarded, _qt_deleted, _shielded, _user_message, _UserError
from ._widget_jobs import _TASK_NAMES, _precompute_job, _propagate_job, _Task
from ._widget_layers import _Source, _unwrap
from ._widget_results import UNDO_PIXELS
from .core.prompts import PromptError

PRECOMPUTE_SCOPES = ("field of view", "whole image", "all slices")


class _TasksMixin:
    """One long task at a time in a worker: start, progress, results, errors, end."""

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

    def _writing_task_checks(self):
        """``_task_checks`` plus a labels layer of the image's shape to write into."""
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

    # -- precompute and propagate -----------------------------------------------------------
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
        chosen range are changed, other objects' pixels are kept. The whole propagation
        is one undo step (Ctrl+Z), unless it changes more than ``UNDO_PIXELS`` pixels.
        """
        try:
            src, labels = self._writing_task_checks()
            axis, fixed = self.propagation_axis(src)
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
            view=RecordedWrites(
                _layers.AxisView(_unwrap(labels).data, axis, fixed, src.n_lead),
                UndoStep(labels, max_pixels=UNDO_PIXELS),
            ),
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

    # -- worker events ----------------------------------------------------------------------
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
        from .core.segmenter import write_slice

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
            from .core.model import ModelLoadError

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
        undo = "; too large for undo" if task.view.step.too_large else "; Ctrl+Z undoes it"
        undo = undo if done else ""
        if task.cancelled:
            self._set_status(
                f"Propagation cancelled: {len(done)} slice(s) written{span}, the others "
                f"unchanged{undo}"
            )
        else:
            self._set_status(
                f"Propagated object {task.obj_id}: {len(done)} slice(s) written{span}{undo}"
            )
