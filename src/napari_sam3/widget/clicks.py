"""Click segmentation of the current object: live requests, the preview, commit, refine.

Every change of the current object's prompts on the shown slice schedules a request
(debounced while Live is on); the result is the object's mask on that slice, shown in
the image's preview layer. *Commit* writes it into the labels layer (one undo step,
other objects' pixels kept unless "Overwrite other labels" is on) and moves on to the
next object id. No widgets here: the Object section shows and drives this.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import QObject, QTimer

from ..core.prompts import PromptError
from . import layer_data, provenance_log
from .errors import UserError, guarded
from .image_source import same, unwrap
from .jobs import ClickRequest, click_labels

DEBOUNCE_MS = 150  # live preview: changes within this window are segmented once


@dataclass
class Preview:
    """The current object's mask on one slice: labels over ``region`` of that plane."""

    obj_id: int
    lead: tuple
    region: tuple[slice, slice]
    labels: np.ndarray  # int32, obj_id inside the mask, 0 elsewhere
    spatial_shape: tuple
    request: ClickRequest | None = None  # what made it (for the provenance of a commit)
    result: object = None  # its ObjectMask: the tile it was decoded in, its scores
    raw: bool = False  # the decoder's mask, shown before the clean-up (jobs.RawPreview)

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    @property
    def full(self) -> bool:
        """A 2D image segmented in one piece: the preview is the whole image."""
        h, w = self.spatial_shape[-2:]
        r, c = self.region
        return not self.lead and (r.start, r.stop, c.start, c.stop) == (0, h, 0, w)


def _set_labels(layer, data: np.ndarray) -> None:
    """Show ``data`` in the preview layer: same shape, only the changed pixels are written
    (napari then redraws only their bounding box; no undo is kept for a preview), else
    the data is replaced."""
    layer = unwrap(layer)
    old = layer.data
    if not isinstance(old, np.ndarray) or old.shape != data.shape or old.dtype != data.dtype:
        layer.data = data.copy()  # the layer's own: later writes change it in place
        return
    idx = np.nonzero(old != data)
    if len(idx[0]) > data.size // 8:  # most of it: replacing is cheaper
        layer.data = data.copy()
    elif len(idx[0]):
        layer.data_setitem(idx, data[idx])
        layer._undo_history.clear()  # a preview has no undo (napari keeps one per write)
        layer._redo_history.clear()


def _where(lead: tuple) -> str:
    return f" on {layer_data.format_slice(lead)}" if lead else ""


class ClickSegmentation(QObject):
    """Segments the current object on the current slice; keeps, shows and commits it."""

    def __init__(self, session, runner, binder, parent=None):
        super().__init__(parent)
        self.session, self.runner, self.binder = session, runner, binder
        self.recorder = provenance_log.recorder(session, binder)
        self.live = True
        self.preview: Preview | None = None
        self.mask_prompt: tuple[int, tuple, np.ndarray] | None = None  # (id, slice, mask)
        self._mask_box: tuple[slice, slice] | None = None  # where the mask's label was found
        self._warned_no_model = False
        self._dirty = False  # a change arrived within the debounce window
        self._clean_up = (session.post.max_hole_area, session.post.max_sprinkle_area)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_timeout)
        binder.prompts_edited.connect(self._on_prompts_edited)
        binder.slice_changed.connect(self._on_slice_changed)
        binder.role_changed.connect(self._on_role_changed)
        session.object_changed.connect(self._on_object_changed)
        session.settings_changed.connect(self._on_settings_changed)
        session.model_changed.connect(self._on_model_changed)
        runner.click_again.connect(self._on_click_again)
        session.on_close(self._timer.stop)

    @property
    def busy(self) -> bool:
        """A coalesced change is waiting for the end of the debounce window."""
        return self._dirty and self._timer.isActive()

    @property
    def preview_mask(self) -> np.ndarray | None:
        """The current object's preview mask (bool) over ``preview_region``, or None."""
        return None if self.preview is None else self.preview.mask

    @property
    def preview_region(self) -> tuple | None:
        """(slice, (row slice, col slice)) of the preview, or None."""
        return None if self.preview is None else (self.preview.lead, self.preview.region)

    # -- live requests ---------------------------------------------------------------------------
    def schedule(self) -> None:
        """A change of the prompts (Live on): the first change of a burst is segmented at
        once; later ones within ``DEBOUNCE_MS`` of the last are coalesced into one request
        when the window ends (the latest state wins)."""
        if not self.live:
            return
        if self._timer.isActive() or self.runner.current_worker is not None:
            self._dirty = True
            self._timer.start()
            return
        self._dirty = False
        self._timer.start()
        self._start(quiet=True)

    def stop(self) -> None:
        self._timer.stop()
        self._dirty = False

    def set_live(self, live: bool) -> None:
        self.live = bool(live)
        if live:
            self.schedule()
        else:
            self._timer.stop()

    @guarded
    def _on_timeout(self) -> None:
        if self._dirty:
            self._dirty = False
            self._start(quiet=True)

    @guarded
    def _on_click_again(self, quiet: bool) -> None:
        self.segment(quiet=quiet)

    @guarded
    def _on_prompts_edited(self) -> None:
        self.schedule()

    @guarded
    def _on_slice_changed(self) -> None:
        """Another slice: show the current object there if it has prompts on it."""
        if self.binder.image_layer is not None and self.session.object_id in self.binder.prompt_ids():
            self.schedule()

    @guarded
    def _on_role_changed(self, role: str) -> None:
        if role == "image":
            self.runner.supersede()
            self.clear_preview()
            self.mask_prompt = None
        elif role == "channels":  # the same prompts on other pixels: segment again
            self.runner.supersede()
            self.clear_preview()
            if self.session.object_id in self.binder.prompt_ids():
                self.schedule()

    @guarded
    def _on_object_changed(self, obj_id: int) -> None:
        if self.mask_prompt is not None and self.mask_prompt[0] != obj_id:
            self.mask_prompt = None
        self.runner.supersede()
        if self.preview is not None:  # (after a commit the layer clears once it landed)
            self.clear_preview()
        if obj_id in self.binder.prompt_ids():
            self.schedule()

    @guarded
    def _on_settings_changed(self) -> None:
        post = self.session.post
        clean_up = (post.max_hole_area, post.max_sprinkle_area)
        if clean_up != self._clean_up:  # overwriting matters at commit only
            self._clean_up = clean_up
            if self.preview is not None:
                self.schedule()

    @guarded
    def _on_model_changed(self, segmenter) -> None:
        self._warned_no_model = False
        if self.preview is None and self.session.object_id in self.binder.prompt_ids():
            self.schedule()

    # -- segmentation ----------------------------------------------------------------------------
    def _request(self, quiet: bool) -> ClickRequest | None:
        session, binder = self.session, self.binder
        image_layer = binder.image_layer
        if image_layer is None:
            if quiet:
                return None
            raise UserError("no image: add an image layer and choose it in the widget")
        src = binder.source()
        lead = binder.current_slice(src)
        obj_id = session.object_id
        mask = None
        if self.mask_prompt is not None and self.mask_prompt[0] == obj_id:
            mask = self.mask_prompt[1:]
        prompts = binder.object_prompts(obj_id, src, only=lead, mask=mask)
        prompt, ignored = prompts.get(lead, (None, 0))
        if prompt is None:
            if quiet:
                # a preview on another slice stays (it is only shown there)
                st = self.preview
                if st is None or st.lead == lead or obj_id not in binder.prompt_ids():
                    self.clear_preview()
                return None
            if session.segmenter is None:
                raise UserError("no SAM3 model loaded: click 'Load model' first")
            raise UserError(
                f"object {obj_id} has no prompt{_where(lead)}: click points or draw a rectangle"
            )
        if session.segmenter is None:
            raise UserError("no SAM3 model loaded: click 'Load model' first")
        post = session.post
        return ClickRequest(
            image=src.plane_at(lead),
            lead=lead,
            spatial_shape=src.spatial_shape,
            limits=src.limits,
            prompt=prompt,
            obj_id=obj_id,
            max_hole_area=post.max_hole_area,
            max_sprinkle_area=post.max_sprinkle_area,
            image_layer=image_layer,
            ignored=ignored,
        )

    def segment(self, quiet: bool = False) -> bool:
        """Segment the current object on the current slice in a worker; the result goes
        to the preview layer.

        Returns False (and reports one line) when it cannot start. With a job already
        running, that job is stopped at its next step and this request runs after it
        (the latest request wins).
        """
        self.stop()
        return self._start(quiet)

    def _start(self, quiet: bool) -> bool:
        from napari.utils import notifications

        if self.runner.current_worker is not None:
            self.runner.defer_click(quiet)
            return True
        try:
            req = self._request(quiet)
            if self.runner.task is None:
                self.session.sync_tiling()
        except UserError as exc:
            if quiet and self.session.segmenter is None and "model" in str(exc):
                self.session.status(f"SAM3: {exc}")
                if not self._warned_no_model:
                    self._warned_no_model = True
                    notifications.show_warning(f"SAM3: {exc}")
            else:
                self.session.report(f"SAM3: {exc}")
            return False
        except (PromptError, layer_data.LayerError) as exc:
            self.session.report(f"SAM3: {exc}")
            return False
        if req is None:
            return False
        self.session.status(f"Segmenting object {req.obj_id}{_where(req.lead)}...")
        self.runner.click(req, self._on_done)
        return True

    def _on_done(self, req: ClickRequest, result, raw: bool = False) -> None:
        if req.obj_id != self.session.object_id or not same(req.image_layer,
                                                              self.binder.image_layer):
            return
        obj, labels = result
        region = tuple(slice(int(s.start or 0), int(s.stop)) for s in obj.region)
        self.show(Preview(req.obj_id, req.lead, region, labels, req.spatial_shape, req, obj,
                          raw))
        area = int(np.count_nonzero(labels))
        note = f"; {req.ignored} non-rectangle shape(s) ignored" if req.ignored else ""
        where = _where(req.lead)
        if area:
            self.session.status(
                f"Object {req.obj_id}{where}: {area} px (predicted IoU {obj.iou_score:.2f}); "
                f"Commit to keep it{note}"
            )
        else:
            self.session.status(
                f"Object {req.obj_id}{where}: empty mask; add or move prompts{note}")

    # -- preview ---------------------------------------------------------------------------------
    def show(self, st: Preview) -> None:
        """A 2D image segmented whole gets a full-size preview; otherwise the preview is
        the object's tile on its slice: a (1, ..., h, w) layer placed with ``translate``,
        so it shows on that slice only and never has the size of a huge image."""
        image = self.binder.image_layer
        ndim = len(st.spatial_shape)
        scale = np.ones(ndim) if image is None else np.asarray(image.scale, dtype=np.float64)
        base = np.zeros(ndim) if image is None else np.asarray(image.translate, np.float64)
        data = st.labels.astype(np.int32, copy=False)
        if not st.full:
            data = data.reshape((1,) * len(st.lead) + data.shape)
        origin = np.array(st.lead + (st.region[0].start, st.region[1].start), dtype=np.float64)
        translate = base + scale * origin
        layer = self.binder.preview_layer
        if layer is None or layer.ndim != ndim:
            self.binder.new_preview(data.copy(), scale, translate)
        else:
            if not np.allclose(layer.scale, scale):
                layer.scale = scale
            if not np.allclose(layer.translate, translate):
                layer.translate = translate
            _set_labels(layer, data)
        self.preview = st

    def _clear_stale_preview(self) -> None:
        if self.preview is None:  # no newer preview was shown meanwhile
            self.clear_preview()

    def clear_preview(self) -> None:
        self.preview = None
        layer = self.binder.preview_layer
        if layer is not None and np.any(layer.data):
            _set_labels(layer, np.zeros(layer.data.shape, np.int32))

    # -- commit / refine -------------------------------------------------------------------------
    def commit(self) -> bool:
        """Write the preview of the current object into the labels layer (undoable).

        Only the preview's slice and region are read and written, as one undo step
        (napari's ``data_setitem`` for NumPy and Zarr labels, the region history of a
        pyramid, whose every level is updated over the region). Other objects
        keep their pixels unless "Overwrite other labels" is on. Then the object's
        prompts on that slice are removed, the object becomes the labels layer's
        selected label (so *Propagate* can follow it) and a new object id is chosen.
        """
        session, binder = self.session, self.binder
        obj_id = session.object_id
        st = self.preview
        # shown raw, its clean-up still running: the commit cleans it here (the same labels)
        cleaning = (self.runner.cleaning and not self.busy and st is not None and st.raw
                    and st.obj_id == obj_id)
        if not cleaning and (self.runner.current_worker is not None or self.busy):
            session.report(
                "SAM3: the preview is still being computed; commit when it is shown", "warning"
            )
            return False
        if st is None or st.obj_id != obj_id:
            session.report(
                f"SAM3: nothing to commit: object {obj_id} has no preview pending (segment "
                "it first; propagated slices are already written)")
            return False
        labels = binder.labels_layer
        if labels is None:
            session.report("SAM3: no labels layer to commit into: choose one in the widget")
            return False
        try:
            target = binder.target(labels)
        except UserError as exc:
            session.report(f"SAM3: {exc}")
            return False
        if target.shape != tuple(st.spatial_shape):
            session.report(
                f"SAM3: labels layer '{labels.name}' has shape {target.shape}, "
                f"the image is {tuple(st.spatial_shape)}"
            )
            return False
        from ..core.postprocess import paste_object

        if st.raw:  # shown before its clean-up (still running, or stopped): cleaned here
            st = dataclasses.replace(st, labels=click_labels(st.result, st.request), raw=False)
            self.runner.supersede(quiet=True)  # its own cleaned mask is this one
        key = st.lead + st.region
        crop = target.read(key)
        overwrite = session.post.overwrite
        idx, values = paste_object(crop, st.mask, obj_id, overwrite=overwrite)
        if len(idx[0]):
            op = self._commit_op(st, obj_id, target, overwrite)
            new = crop.copy()
            new[idx] = values
            with self.recorder.writing(labels):
                target.write_region(key, crop, new)
            if op is not None:
                self.recorder.append(labels, op, key)
        session.wrote(labels, obj_id)
        written = int(np.count_nonzero(values == obj_id))
        binder.remove_prompts(obj_id, st.lead)
        self.mask_prompt = None
        self.preview = None
        target.when_landed(self._clear_stale_preview)  # no blink before the labels show
        unwrap(labels).selected_label = obj_id
        new_id = self.new_object()
        where = _where(st.lead)
        if written:
            text = f"Committed object {obj_id}{where} ({written} px changed to it)"
        else:
            text = f"Object {obj_id}{where}: nothing new to commit (its pixels were already there)"
        session.status(f"{text}; now object {new_id}")
        return True

    def _commit_op(self, st: Preview, obj_id: int, target, overwrite: bool) -> dict | None:
        """The ``prompts`` operation of committing ``st`` (before it is written): its
        prompt, tile and scores; a mask prompt (Refine selected) as a reference to the
        label it was taken from when those pixels are unchanged, else stored."""
        from ..core.provenance import prompts_op

        req = st.request
        if req is None:
            return None
        refs = None
        if req.prompt.mask is not None and self._mask_unchanged(target, st.lead, obj_id,
                                                                req.prompt.mask):
            refs = {0: {"labels_id": int(obj_id)}}
        op = prompts_op([req.prompt], [obj_id], [st.result],
                        slice_index=provenance_log.slice_of(st.lead), limits=req.limits,
                        max_hole_area=req.max_hole_area,
                        max_sprinkle_area=req.max_sprinkle_area, mask_refs=refs)
        op["commit"] = {"overwrite": bool(overwrite)}
        return op

    def _mask_unchanged(self, target, lead: tuple, obj_id: int, mask) -> bool:
        """The label's pixels are still the refined mask: on the whole slice for a NumPy
        layer; for a large or lazy one, over the box the label was found in (what lies
        outside was not read, so as not to read the slice on the GUI thread)."""
        from .labels_target import PlaneView

        if PlaneView(target, lead).in_memory:
            return np.array_equal(target.read(lead) == obj_id, mask)
        box = self._mask_box  # (the mask is all False outside it: see _refine)
        if box is None:
            return False
        return np.array_equal(target.read(lead + tuple(box)) == obj_id, mask[box])

    def new_object(self) -> int:
        """Switch to a fresh object id: one more than any label or prompt id."""
        new_id = self.binder.next_object_id()
        self.session.object_id = new_id
        self.session.status(f"Object {new_id}: click points or draw a box")
        return new_id

    def refine_selected(self) -> bool:
        """Segment the label selected in the labels layer (napari's ``selected_label``,
        what its picker sets) with its pixels on the current slice as a mask prompt; it
        becomes the current object, so *Commit* replaces it."""
        session, binder = self.session, self.binder
        labels = binder.labels_layer
        if labels is None:
            session.report("SAM3: no labels layer: choose one in the widget")
            return False
        obj_id = int(unwrap(labels).selected_label)
        if obj_id <= 0:
            session.report("SAM3: select the label to refine in the labels layer first "
                           "(its picker, or the label number)")
            return False
        try:
            target, lead = binder.edit_target(labels)
        except (UserError, layer_data.LayerError) as exc:
            session.report(f"SAM3: {exc}")
            return False
        from .tasks import find_label

        return find_label(session, self.runner, target, lead, obj_id, functools.partial(
            self._refine, labels, binder.image_layer, target, lead, obj_id))

    def _refine(self, labels, image, target, lead: tuple, obj_id: int, box) -> bool:
        """:meth:`refine_selected` once the label's box on the slice is known."""
        binder = self.binder
        if (not same(labels, binder.labels_layer) or not same(image, binder.image_layer)
                or not binder.alive(labels)):
            self.session.report(f"SAM3: the layers changed while label {obj_id} was looked "
                                "for: not refined")
            return False
        if box is None:
            self.session.report(
                f"SAM3: label {obj_id} has no pixels in '{labels.name}'{_where(lead)} to refine")
            return False
        mask = np.zeros(target.shape[len(lead):], dtype=bool)  # (pages only where set)
        mask[box] = target.read(lead + tuple(box)) == obj_id
        self.session.object_id = obj_id
        self.mask_prompt = (obj_id, lead, mask)
        self._mask_box = tuple(box)
        return self.segment(quiet=False)
