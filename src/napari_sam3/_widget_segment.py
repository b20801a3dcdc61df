"""Click segmentation of the current object: live requests, worker, preview, commit, refine."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from napari.utils import notifications

from . import _layers
from ._widget_errors import _guarded, _shielded, _user_message, _UserError
from ._widget_jobs import _Request, _segment_job
from ._widget_layers import PREVIEW_NAME, _same, _unwrap
from .core.prompts import PromptError


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


class _SegmentMixin:
    """Segment the current object on the current slice, show it, commit or refine it."""

    @property
    def preview_mask(self) -> np.ndarray | None:
        """The current object's preview mask (bool) over ``preview_region``, or None."""
        return None if self._preview is None else self._preview.mask

    @property
    def preview_region(self) -> tuple | None:
        """(slice, (row slice, col slice)) of the preview, or None."""
        return None if self._preview is None else (self._preview.lead, self._preview.region)

    # -- live preview -----------------------------------------------------------------------
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
        from .core.postprocess import paste_object

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
