"""Find concept and Segment everything: start a run over the chosen slices, follow its steps."""

from __future__ import annotations

from . import _layers
from ._widget_errors import _guarded, _UserError
from ._widget_jobs import _concept_job, _everything_job, _Task
from ._widget_layers import EXEMPLARS_NAME, _Source
from .core.prompts import PromptError

INSTANCE_SCOPES = ("current slice", "whole stack")
DEFAULT_MIN_SCORE = 0.05  # same as concept.DEFAULT_MIN_SCORE


class _InstancesMixin:
    """Run the concept detector or the point grid over the current slice or the stack."""

    @property
    def concept(self):
        """The ``ConceptSegmenter`` in use (None until the first *Find concept*)."""
        return self._concept

    def everything_settings(self):
        """``EverythingSettings`` from the section's parameters and the post-processing ones."""
        from .core.everything import EverythingSettings

        return EverythingSettings(
            points_per_side=int(self.points_per_side_spin.value()),
            pred_iou_thresh=float(self.pred_iou_spin.value()),
            stability_score_thresh=float(self.stability_spin.value()),
            min_area=int(self.min_area_spin.value()),
            max_hole_area=int(self.max_hole_area.value()),
            max_sprinkle_area=int(self.max_sprinkle_area.value()),
        )

    def _scope_leads(self, src: _Source, scope: str) -> tuple[list[tuple], int]:
        """The slices a run covers and the axis they run along."""
        if scope not in INSTANCE_SCOPES:
            raise ValueError(f"scope must be one of {INSTANCE_SCOPES}")
        if scope == "whole stack" and src.n_lead:
            axis, fixed = self.propagation_axis(src)
            view = _layers.AxisView(src.data, axis, fixed, src.n_lead)
            return [view.lead(k) for k in range(view.shape[0])], axis
        return [self.current_slice(src)], 0

    def find_concept(self, scope: str | None = None) -> bool:
        """Find every instance of the concept (text and/or exemplars) in a worker and write
        them into the labels layer, one id each (see the module docstring).

        ``scope`` (default: the combo's): "current slice" or, for stacks, "whole stack".
        The concept detector is loaded on first use (same device, dtype, tiling and cache
        folder as the model above). Returns False (one line reported) when it cannot start.
        """
        scope = scope or self.scope_combo.currentText()
        try:
            src, labels = self._writing_task_checks()
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
            src, labels = self._writing_task_checks()
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
