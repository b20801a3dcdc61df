"""The long tasks, one class per kind: precompute, propagation, concept search, everything.

A task is built on the GUI thread with everything its worker needs, run by the
:class:`~napari_sam3.widget.runner.JobRunner`, and handles its own steps, errors and
end (on the GUI thread). The base class holds what every task has: progress and Cancel.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import jobs, layer_data, provenance_log, results
from .errors import UserError, user_message
from .image_source import unwrap


class LongTask:
    """A job with progress and Cancel; subclasses say what runs and what its steps do."""

    title = "task"  # "a {title} is running", "{title} cancelled"

    def __init__(self, session):
        self.session = session
        self.worker = None
        self.total = 0
        self.done = 0
        self.cancelled = False
        self.failed = False

    def job(self, progress) -> tuple:
        """``(generator function, *args)`` to run in the worker; ``progress`` is the
        core's ``progress(done, total)`` callback (it raises once Cancel is pressed)."""
        raise NotImplementedError

    def on_yield(self, value) -> None:
        """A step of the worker, on the GUI thread."""

    def on_returned(self, value) -> None:
        """The worker's return value, on the GUI thread (not after Cancel)."""

    def failure(self, exc) -> str:
        return f"{self.title} failed: {user_message(exc)}"

    def on_finished(self) -> None:
        """The worker ended (done, cancelled or failed)."""


class FindLabelTask(LongTask):
    """Find a label's bounding box on a plane of a large or lazy labels layer, block by
    block, so napari never waits for the whole plane to be read; ``then(box)`` runs on the
    GUI thread with ``(row slice, col slice)`` or None (no such pixel)."""

    title = "label search"

    def __init__(self, session, plane, label: int, then):
        super().__init__(session)
        self.plane, self.label, self.then = plane, int(label), then
        self.found = None  # (box,) once returned

    def job(self, progress) -> tuple:
        from ..core.planes import iter_label_box

        return iter_label_box, self.plane, self.label

    def on_yield(self, value) -> None:
        self.done, self.total = value

    def on_returned(self, box) -> None:
        self.found = (box,)

    def on_finished(self) -> None:
        """``then(box)`` once the task is over (so it may start a click or another task)."""
        if self.cancelled:
            self.session.status(f"Search for label {self.label} cancelled: nothing changed")
        elif self.found is not None:
            self.then(*self.found)


def find_label(session, runner, target, lead: tuple, label: int, then) -> bool:
    """``then(box)`` with the bounding box of ``label`` on slice ``lead`` of ``target`` (or
    None): at once for a NumPy layer, else after a :class:`FindLabelTask` read
    the plane block by block in a worker (progress, Cancel; returns True once started)."""
    from ..core.planes import label_box
    from .labels_target import PlaneView

    plane = PlaneView(target, lead)
    if plane.in_memory:
        return then(label_box(np.asarray(target.read(lead)), label))
    try:
        runner.check_idle()
    except UserError as exc:
        session.report(f"SAM3: {exc}")
        return False
    session.status(f"Looking for label {label} in '{unwrap(target.layer).name}'...")
    runner.start(FindLabelTask(session, plane, label, then))
    return True


class PrecomputeTask(LongTask):
    """Encode the tiles of ``(plane, limits, region)`` jobs ahead of clicks; with a
    ``scheduler`` address, on that dask scheduler's workers (same progress and Cancel)."""

    title = "precompute"

    def __init__(self, session, planes: list, scheduler: str | None = None):
        super().__init__(session)
        self.planes = planes
        self.scheduler = scheduler or None
        self.encoded = 0

    def job(self, progress) -> tuple:
        from ..core.distributed.run import precompute_planes

        return (precompute_planes, self.session.segmenter, self.session.model_lock,
                self.planes, self.scheduler)

    def on_yield(self, value) -> None:
        self.done, self.total, self.encoded = value
        where = f" on {self.scheduler}" if self.scheduler else ""
        self.session.status(
            f"Precomputing{where}: {self.done}/{self.total} tiles "
            f"({self.encoded} encoded, {self.done - self.encoded} already cached)"
        )

    def on_finished(self) -> None:
        if self.failed:
            return
        if self.cancelled:
            self.session.status(
                f"Precompute cancelled: {self.done} of {self.total} tiles done (they stay cached)"
            )
        else:
            self.session.status(
                f"Precomputed {self.total} tiles ({self.encoded} encoded, "
                f"{self.total - self.encoded} were cached)"
            )


class PropagationTask(LongTask):
    """Track one object through the stack, writing each slice into the labels as it comes."""

    title = "propagation"

    def __init__(self, session, binder, *, obj_id, labels, view, stack, prompts, kwargs,
                 post, source_note=""):
        super().__init__(session)
        self.binder = binder
        self.obj_id, self.labels, self.view = obj_id, labels, view
        self.stack, self.prompts, self.kwargs, self.post = stack, prompts, kwargs, post
        self.total = kwargs["stop"] - kwargs["start"]
        self.written: set[int] = set()
        self.summaries: list = []  # per slice written: index, region, ids, object scores
        self.source_note = source_note
        self.recorder = provenance_log.recorder(session, binder)

    def job(self, progress) -> tuple:
        s = self.session
        return jobs.propagate_job, s.segmenter, s.model_lock, self.stack, self.prompts, self.kwargs

    def on_yield(self, result) -> None:
        """One propagated slice into the labels layer, whole."""
        from ..core.propagation import write_slice

        if not self.binder.alive(self.labels):
            self.cancelled = True
            self.worker.quit()
            self.session.report(
                "SAM3: the labels layer was removed: propagation stopped", "warning")
            return
        if not self.summaries:
            self.recorder.hold(self.labels)  # napari edits meanwhile: after the run's op
        with self.recorder.writing(self.labels):
            write_slice(self.view, result, self.post.max_hole_area,
                        self.post.max_sprinkle_area)
        self.labels.refresh()
        rows, cols = result.region  # announced (autosaved) now; logged at the end
        self.session.labels_recorded.emit(self.labels, provenance_log.region_key(
            self.view.target.lead(int(result.index)),
            (rows.start or 0, cols.start or 0, rows.stop, cols.stop)))
        self.written.add(int(result.index))
        self.summaries.append(SimpleNamespace(
            index=int(result.index), region=tuple(result.region), ids=list(result.ids),
            object_scores=[float(v) for v in result.object_scores]))
        self.done = len(self.written)
        self.session.wrote(self.labels, self.obj_id)
        self.session.status(
            f"Propagating object {self.obj_id}: {self.done}/{self.total} slices "
            f"(slice {result.index})"
        )

    def _record(self) -> None:
        """The run in the labels' provenance: a ``propagation`` operation, or (cancelled,
        failed) the values of the slices it wrote."""
        if not self.summaries or not self.binder.alive(self.labels):
            return
        view = self.view.target
        if self.cancelled or self.failed:
            boxes = {}
            for r in self.summaries:
                rows, cols = r.region
                boxes[view.lead(r.index)] = [rows.start or 0, cols.start or 0, rows.stop,
                                             cols.stop]
            self.recorder.record_values(self.labels, boxes, "propagation stopped early")
            return
        from ..core.replay import propagation_op

        kw = self.kwargs
        op = propagation_op(self.prompts, kw["direction"], kw["start"], kw["stop"],
                            limits=kw["limits"], score_threshold=0.0,
                            stop_after=kw["stop_after"],
                            max_hole_area=self.post.max_hole_area,
                            max_sprinkle_area=self.post.max_sprinkle_area,
                            results=self.summaries)
        if view.n_lead > 1:
            op["axis"], op["fixed"] = int(kw["axis"]), dict(kw["fixed"])
        self.recorder.append(self.labels, op)

    def on_finished(self) -> None:
        try:
            self._record()
        finally:
            self.recorder.release(self.labels, record=self.binder.alive(self.labels))
        if self.failed:
            return
        done = sorted(self.written)
        span = f" ({done[0]} to {done[-1]})" if done else ""
        undo = "; too large for undo" if self.view.step.too_large else "; Ctrl+Z undoes it"
        undo = undo if done else ""
        if self.cancelled:
            self.session.status(
                f"Propagation cancelled: {len(done)} slice(s) written{span}, the others "
                f"unchanged{undo}"
            )
        else:
            self.session.status(
                f"Propagated object {self.obj_id}{self.source_note}: {len(done)} slice(s) "
                f"written{span}{undo}"
            )


class InstancesTask(LongTask):
    """A concept search or segment-everything run over slices; written when it ends."""

    kind = ""  # "concept" or "everything"
    name = ""  # for messages

    def __init__(self, session, binder, *, labels, source, n_lead, spatial_shape):
        super().__init__(session)
        self.binder = binder
        self.labels, self.source = labels, source
        self.n_lead, self.spatial_shape = n_lead, tuple(spatial_shape)
        self.results: list | None = None  # [(slice, ConceptResult or EverythingResult)]
        self.step = ""
        self.threshold = lambda: None  # the concept threshold when the run is written

    def on_yield(self, value) -> None:
        self.step = value[0]
        if value[0] == "loading":
            self.session.status(f"Loading the concept model {value[1]} (once)...")
            return
        _, i, n, lead = value
        where = f" on {layer_data.format_slice(lead)} ({i + 1}/{n})" if lead else ""
        self.session.status(f"{self.doing}{where}...")

    @property
    def doing(self) -> str:
        return "Segmenting everything"

    def on_returned(self, value) -> None:
        self.results = value

    def failure(self, exc) -> str:
        return f"{self.name} failed: {user_message(exc)}"

    def on_finished(self) -> None:
        if self.cancelled:
            self.session.status(f"{self.name} cancelled: the labels are unchanged")
            return
        if self.failed or self.results is None:
            return
        try:
            results.start_run(self.session, self.binder, self, self.threshold())
        except UserError as exc:
            self.session.report(f"SAM3: {exc}")


class ConceptTask(InstancesTask):
    """Find every instance of a text and/or exemplar concept on each slice."""

    title = "concept search"
    kind = "concept"
    name = "Find concept"

    def __init__(self, session, binder, *, model, planes, text, options, holder, key, **kw):
        super().__init__(session, binder, **kw)
        self.model, self.planes, self.text, self.options = model, planes, text, options
        self.holder, self.key = holder, key  # holder: {"concept": the detector, once loaded}

    @property
    def doing(self) -> str:
        return f"Finding {self.source}"

    def job(self, progress) -> tuple:
        s = self.session
        return (jobs.concept_job, s.segmenter, s.model_lock, self.holder, self.model,
                self.planes, self.text, self.options, progress)

    def failure(self, exc) -> str:
        if self.step == "loading":
            from ..core.model import ModelLoadError

            msg = user_message(exc)
            return msg if isinstance(exc, ModelLoadError) else f"cannot load the concept model: {msg}"
        return super().failure(exc)

    def on_finished(self) -> None:
        concept = self.holder.get("concept")
        if concept is not None:
            self.session.set_concept(concept, self.key)
        super().on_finished()


class EverythingTask(InstancesTask):
    """Segment every object the point grid finds on each slice."""

    title = "segment-everything run"
    kind = "everything"
    name = "Segment everything"

    def __init__(self, session, binder, *, planes, settings, limits, **kw):
        super().__init__(session, binder, **kw)
        self.planes, self.settings, self.limits = planes, settings, limits

    def job(self, progress) -> tuple:
        s = self.session
        return (jobs.everything_job, s.segmenter, s.model_lock, self.planes, self.settings,
                self.limits, progress)
