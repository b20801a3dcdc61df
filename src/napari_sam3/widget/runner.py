"""The one place the widget starts workers: model loading, the click job and one long task.

- The click job segments the current object; the latest request wins: a request that
  arrives while one runs stops that one at its next step and runs after it.
- One long task at a time (a :class:`~napari_sam3.widget.tasks.LongTask`: precompute,
  propagation, concept search, segment-everything), with progress and Cancel.
- Workers share the model through ``session.model_lock``, taken per tile or slice, so a
  click is served between two tiles of a precompute or two slices of a propagation.

Results reach the GUI thread through napari's worker signals; writing into layers
happens there only.
"""

from __future__ import annotations

import functools
import weakref

from qtpy.QtCore import QObject, Signal

from .errors import Cancelled, guarded, qt_deleted, shielded, user_message
from .jobs import RawPreview


class JobRunner(QObject):
    """Starts, follows and cancels the session's workers."""

    changed = Signal()  # a worker started, stepped or ended (progress bar, buttons)
    task_started = Signal(object)
    task_finished = Signal(object)
    click_again = Signal(bool)  # a deferred click request is due (its quiet flag)
    _task_progress = Signal(object, int, int)  # (task, done, total) from worker threads

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.load_worker = None
        self.current_worker = None  # the click job
        self.task = None  # the running LongTask
        self.click_step = ""  # "cache", "encoding", "post-processing" or "cleaning"
        self._quiet_end = False  # the running click ends without a "ready" line
        self._seq = 0
        self._cancelled: set[int] = set()
        self._pending: bool | None = None  # quiet flag of a click waiting for the worker
        self._task_progress.connect(self._on_task_progress)
        session.on_close(self.cancel)

    @property
    def task_worker(self):
        """The running long task's worker, or None."""
        return None if self.task is None else self.task.worker

    @property
    def busy(self) -> bool:
        return (
            self.load_worker is not None
            or self.current_worker is not None
            or self._pending is not None
            or self.task is not None
        )

    @property
    def progress(self) -> tuple[int, int] | None:
        """(done, total) for the progress bar; (0, 0) means busy without a count; None idle."""
        task = self.task
        if task is not None and task.total:
            return min(task.done, task.total), task.total
        if task is not None or self.load_worker is not None or self.click_step == "encoding":
            return 0, 0
        return None

    # -- model loading -------------------------------------------------------------------------
    def load(self, fn, args, on_loaded, on_error) -> object:
        from napari.qt.threading import create_worker

        worker = create_worker(fn, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(on_loaded)
        worker.errored.connect(on_error)
        worker.finished.connect(self._on_load_finished)
        self.load_worker = worker
        self.changed.emit()
        worker.start()
        return worker

    @guarded
    def _on_load_finished(self, *_) -> None:
        self.load_worker = None
        self.changed.emit()

    # -- the click job ---------------------------------------------------------------------------
    def click(self, req, on_done) -> None:
        """Segment ``req`` (a ClickRequest) in a worker; ``on_done(req, (obj, labels))`` on
        the GUI thread if it is still the latest request when it ends (and, with a
        clean-up set, once before with the raw mask, ``raw=True``, while it is cleaned)."""
        from napari.qt.threading import create_worker

        from .jobs import segment_job

        self._seq += 1
        job = self._seq
        worker = create_worker(
            shielded(segment_job),
            self.session.segmenter,
            self.session.model_lock,
            req,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(functools.partial(self._on_click_step, job, req, on_done))
        worker.returned.connect(functools.partial(self._on_click_done, job, req, on_done))
        worker.errored.connect(functools.partial(self._on_click_error, job))
        worker.finished.connect(functools.partial(self._on_click_finished, job, req))
        self.current_worker = worker
        self.click_step = ""
        self._quiet_end = False
        worker.start()

    def defer_click(self, quiet: bool) -> None:
        """A click request while one runs: stop that one at its next step, run this after."""
        self._pending = quiet if self._pending is None else (self._pending and quiet)
        if self.current_worker is not None:
            self.current_worker.quit()

    def supersede(self, quiet: bool = False) -> None:
        """Stop the running click job at its next step, without reporting it cancelled
        (``quiet``: nor "ready" when it ends: a commit said what happened)."""
        self._pending = None
        self._quiet_end = self._quiet_end or quiet
        if self.current_worker is not None:
            self.current_worker.quit()

    @property
    def cleaning(self) -> bool:
        """The latest click's raw mask is shown and being cleaned, nothing newer asked."""
        return self.click_step == "cleaning" and self._is_current(self._seq)

    def _is_current(self, job: int) -> bool:
        return (
            job == self._seq
            and job not in self._cancelled
            and self._pending is None
            and self.current_worker is not None
            and not self.current_worker.abort_requested
        )

    @guarded
    def _on_click_step(self, job: int, req, on_done, step) -> None:
        if job != self._seq:
            return
        if isinstance(step, RawPreview):  # the decoded mask, shown while it is cleaned
            self.click_step = "cleaning"
            if self._is_current(job):
                on_done(req, (step.obj, step.labels), raw=True)
            self.changed.emit()
            return
        self.click_step = step
        if step == "encoding":
            self.session.status("Encoding the image (once per image, tile or slice and contrast)...")
        elif step == "post-processing":
            self.session.status(f"Decoding object {self.session.object_id}...")
        self.changed.emit()

    @guarded
    def _on_click_done(self, job: int, req, on_done, result) -> None:
        if self._is_current(job):
            on_done(req, result)

    @guarded
    def _on_click_error(self, job: int, exc) -> None:
        if job in self._cancelled or job != self._seq:
            return
        self.session.report(f"SAM3: segmentation failed: {user_message(exc)}")

    @guarded
    def _on_click_finished(self, job: int, req, *_) -> None:
        if job != self._seq:
            return
        stopped = self.current_worker is not None and self.current_worker.abort_requested
        self.current_worker = None
        self.click_step = ""
        self.changed.emit()
        if job in self._cancelled:
            self.session.status("Segmentation cancelled: nothing changed")
            return
        if self._pending is not None:
            quiet, self._pending = self._pending, None
            self.click_again.emit(quiet)
        elif stopped and not self._quiet_end:
            self.session.status(f"Object {self.session.object_id}: ready")

    # -- the long task ---------------------------------------------------------------------------
    def check_idle(self) -> None:
        """Raise UserError while a long task runs."""
        from .errors import UserError

        if self.task is not None:
            raise UserError(f"a {self.task.title} is running: wait for it or cancel it")

    def start(self, task) -> object:
        """Run a LongTask in a worker: its yields, result, errors and end go to its methods."""
        from napari.qt.threading import create_worker

        fn, *args = task.job(self.progress_callback(task))
        worker = create_worker(shielded(fn), *args, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(functools.partial(self._on_task_yield, task))
        worker.returned.connect(functools.partial(self._on_task_returned, task))
        worker.errored.connect(functools.partial(self._on_task_error, task))
        worker.finished.connect(functools.partial(self._on_task_finished, task))
        task.worker = worker
        self.task = task
        self.task_started.emit(task)
        self.changed.emit()
        worker.start()
        return task

    def progress_callback(self, task):
        """``progress(done, total)`` for the core, called in the worker: raises once Cancel
        was pressed, else shows the progress on the GUI thread."""
        ref = weakref.ref(self)

        def progress(done, total):
            if task.cancelled:
                raise Cancelled()
            runner = ref()
            if runner is not None and not qt_deleted(runner):
                runner._task_progress.emit(task, int(done), int(total))

        return progress

    def stop_task(self, task) -> None:
        """Stop ``task`` at its next step (what it finished stays)."""
        task.cancelled = True
        if task.worker is not None:
            task.worker.quit()

    @guarded
    def _on_task_yield(self, task, value) -> None:
        if task is not self.task or task.cancelled:
            return  # a step that arrives after Cancel is dropped whole
        task.on_yield(value)
        self.changed.emit()

    @guarded
    def _on_task_returned(self, task, value) -> None:
        if task is self.task and not task.cancelled:
            task.on_returned(value)

    @guarded
    def _on_task_progress(self, task, done: int, total: int) -> None:
        if task is not self.task or task.cancelled:
            return
        task.done, task.total = int(done), int(total)
        self.changed.emit()

    @guarded
    def _on_task_error(self, task, exc) -> None:
        exc = getattr(exc, "original", exc)  # WorkerError
        if task.cancelled or isinstance(exc, Cancelled):
            return
        task.failed = True
        self.session.report(f"SAM3: {task.failure(exc)}")

    @guarded
    def _on_task_finished(self, task, *_) -> None:
        if task is not self.task:
            return
        self.task = None
        self.task_finished.emit(task)
        self.changed.emit()
        task.on_finished()

    # -- cancel ------------------------------------------------------------------------------
    def cancel(self) -> list[str]:
        """Stop the click job (its result is dropped) and the long task (what it finished
        stays); returns the names of what was stopped."""
        self._pending = None
        stopped = []
        if self.current_worker is not None:
            self._cancelled.add(self._seq)
            self.current_worker.quit()
            stopped.append("segmentation")
        task = self.task
        if task is not None and not task.cancelled:
            self.stop_task(task)
            stopped.append(task.title)
        return stopped
