"""The widget's provenance: every labels layer it writes into carries how it was made.

The log is a :class:`~napari_sam3.core.provenance.Provenance` kept in the layer's
``metadata[PROVENANCE_KEY]``, so napari's File > Save with our writers stores it with
the labels and ``napari-sam3 replay`` reproduces them. One :class:`ProvenanceRecorder`
per session (:func:`recorder`):

* SAM operations (commit, propagation, concept / everything runs, delete / merge of
  ids) are appended by the code that writes them, inside :meth:`~ProvenanceRecorder.writing`
  (which starts the log first and keeps napari's paint events of that write out);
* everything else that changes the labels (napari's brush, fill and eraser, its undo
  and redo, the edit window, undo of a pyramid) is stored as its result: the label
  values of the changed region after it (``brush`` operations), so replay gives the
  final labels;
* labels with content the widget did not make get one ``import`` operation when their
  log starts: their values (small layers) or their source path, with a fingerprint.

The header (model, device, dtype, tiling, image path and shape) is filled at the first
SAM operation; the image fingerprint is taken in a background thread (a 20,000^2 image
must not freeze napari) and waited for when the record is saved.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np

from .._writers import PROVENANCE_KEY
from ..core import provenance
from ..core.provenance import Provenance
from .errors import log
from .image_source import level0, unwrap

#: Imported labels up to this many pixels are stored in the record; larger ones by their
#: source path and a fingerprint.
IMPORT_VALUES_PIXELS = 1 << 24

#: The session attribute holding its recorder (dropped when the session closes, so a
#: closed dock's session, and the model it holds, can be freed).
_RECORDER_ATTR = "_provenance_recorder"


def recorder(session, binder) -> ProvenanceRecorder:
    """The session's recorder (made on first use)."""
    rec = session.__dict__.get(_RECORDER_ATTR)
    if rec is None:
        rec = ProvenanceRecorder(session, binder)
        if not session.closed:
            session.__dict__[_RECORDER_ATTR] = rec
    return rec


def slice_of(lead: tuple):
    """A recorded ``slice``: None on a 2D image, the index on a stack, else the list."""
    lead = tuple(int(v) for v in lead)
    if not lead:
        return None
    return lead[0] if len(lead) == 1 else list(lead)


def region_key(lead: tuple, bbox) -> tuple:
    r0, c0, r1, c1 = (int(v) for v in bbox)
    return tuple(int(v) for v in lead) + (slice(r0, r1), slice(c0, c1))


def changed_boxes(atoms, ndim: int) -> dict[tuple, list[int]]:
    """``{lead: [row0, col0, row1, col1]}``: where a napari history item (a list of
    ``(indices, old, new)`` or masked paint atoms) changed the labels, per slice."""
    boxes: dict[tuple, list[int]] = {}

    def grow(lead, r0, c0, r1, c1):
        b = boxes.get(lead)
        boxes[lead] = [r0, c0, r1, c1] if b is None else [
            min(b[0], r0), min(b[1], c0), max(b[2], r1), max(b[3], c1)]

    for atom in atoms:
        if isinstance(atom, tuple) and len(atom) == 3:
            idx = [np.asarray(i, dtype=np.intp).reshape(-1) for i in atom[0]]
            if not idx or not idx[0].size:
                continue
            leads = np.stack(idx[:-2], axis=1) if ndim > 2 else np.zeros((len(idx[0]), 0))
            for lead in {tuple(int(v) for v in row) for row in leads}:
                sel = np.all(leads == np.asarray(lead), axis=1) if lead else slice(None)
                rr, cc = idx[-2][sel], idx[-1][sel]
                grow(lead, int(rr.min()), int(cc.min()), int(rr.max()) + 1, int(cc.max()) + 1)
            continue
        key = tuple(atom.slice_key)
        starts = [int(k.start or 0) if isinstance(k, slice) else int(k) for k in key]
        if atom.mask is not None:
            hit = np.nonzero(atom.mask)
            if not hit[0].size:
                continue
            lo = [s + int(h.min()) for s, h in zip(starts, hit, strict=True)]
            hi = [s + int(h.max()) + 1 for s, h in zip(starts, hit, strict=True)]
        else:
            lo = starts
            hi = [int(k.stop) if isinstance(k, slice) else int(k) + 1 for k in key]
        for lead in np.ndindex(*[h - lo_ for lo_, h in zip(lo[:-2], hi[:-2], strict=True)]):
            full = tuple(int(a + b) for a, b in zip(lead, lo[:-2], strict=True))
            grow(full, lo[-2], lo[-1], hi[-2], hi[-1])
    return boxes


def apply_atoms(values: np.ndarray, atoms, lead: tuple, bbox) -> np.ndarray:
    """``values`` (the labels over ``bbox`` of slice ``lead``) with the new values of a
    napari history item written over them: napari emits its paint event before the
    stroke reaches the layer's data."""
    r0, c0, r1, c1 = (int(v) for v in bbox)
    for atom in atoms:
        if isinstance(atom, tuple) and len(atom) == 3:
            idx = [np.asarray(i, dtype=np.intp).reshape(-1) for i in atom[0]]
            new = np.broadcast_to(np.asarray(atom[2]), idx[0].shape)
            sel = np.ones(idx[0].shape, bool)
            for a, v in enumerate(lead):
                sel &= idx[a] == v
            rr, cc = idx[-2][sel], idx[-1][sel]
            inside = (rr >= r0) & (rr < r1) & (cc >= c0) & (cc < c1)
            values[rr[inside] - r0, cc[inside] - c0] = new[sel][inside]
            continue
        key = tuple(atom.slice_key)
        lo = [int(k.start or 0) if isinstance(k, slice) else int(k) for k in key]
        if any(not lo[a] <= v < (int(key[a].stop) if isinstance(key[a], slice) else lo[a] + 1)
               for a, v in enumerate(lead)):
            continue
        rows = slice(lo[-2], int(key[-2].stop))
        cols = slice(lo[-1], int(key[-1].stop))
        mask = np.ones((rows.stop - rows.start, cols.stop - cols.start), bool)
        if atom.mask is not None:
            mask = np.asarray(atom.mask)[tuple(v - lo[a] for a, v in enumerate(lead))]
        a0, b0 = max(rows.start, r0), max(cols.start, c0)
        a1, b1 = min(rows.stop, r1), min(cols.stop, c1)
        if a0 >= a1 or b0 >= b1:
            continue
        part = mask[a0 - rows.start:a1 - rows.start, b0 - cols.start:b1 - cols.start]
        window = values[a0 - r0:a1 - r0, b0 - c0:b1 - c0]
        window[part] = atom.new_value
    return values


class ProvenanceRecorder:
    """Starts, extends and announces the provenance log of the widget's labels layers."""

    def __init__(self, session, binder):
        self.session, self.binder = session, binder
        self._writing = 0
        self._attached: dict[int, tuple] = {}  # id(raw) -> (weakref to raw, paint callback)
        # id(raw) -> [(boxes, note)]: napari edits made while a task writes into the layer
        self._held: dict[int, list] = {}
        binder.role_changed.connect(self._on_role_changed)
        self._on_role_changed("labels")
        session.on_close(self.detach_all)  # (at once if closed: then nothing stays attached)

    # -- the log ---------------------------------------------------------------------------------
    def log(self, labels) -> Provenance:
        """The layer's log, started (with an ``import`` operation for labels of content
        the widget did not make) if it has none; its header filled once a model is
        loaded and the image is known."""
        raw = unwrap(labels)
        rec = raw.metadata.get(PROVENANCE_KEY)
        if isinstance(rec, dict):
            rec = Provenance.from_dict(rec)
            raw.metadata[PROVENANCE_KEY] = rec
        owner = rec.__dict__.get("_owner") if isinstance(rec, Provenance) else None
        if owner is not None and owner() is not raw:
            # napari's Duplicate copies the metadata shallowly: the copy gets its own log
            rec = Provenance.from_dict(rec.to_dict())
            raw.metadata[PROVENANCE_KEY] = rec
        if rec is None:
            rec = Provenance(labels={"shape": [int(s) for s in level0(raw).shape]})
            raw.metadata[PROVENANCE_KEY] = rec
            self._record_import(raw, rec)
        rec.__dict__.setdefault("_owner", weakref.ref(raw))
        self._attach(raw)
        self._fill_header(rec, raw)
        return rec

    def _watch_pyramid(self, raw) -> None:
        """Record our region undo / redo of a multiscale layer like napari's."""
        target = self.binder.targets.of(raw)
        if getattr(target, "pyramid", None) is None or target.restored is not None:
            return
        ref = weakref.ref(raw)

        def restored(keys, name):
            layer = ref()
            if layer is None or self._writing or self.session.closed:
                return
            boxes: dict[tuple, list[int]] = {}
            for key in keys:
                lead = tuple(int(k) for k in key[:-2])
                rows, cols = key[-2:]
                b = boxes.get(lead, [rows.start, cols.start, rows.stop, cols.stop])
                boxes[lead] = [min(b[0], rows.start), min(b[1], cols.start),
                               max(b[2], rows.stop), max(b[3], cols.stop)]
            self._record_edit(layer, boxes, f"undo history ({name})")

        target.restored = restored

    def _fill_header(self, rec: Provenance, raw) -> None:
        seg = self.session.segmenter
        if not rec.model and seg is not None:
            rec.model = provenance.model_record(seg)
            rec.device, rec.dtype = str(seg.device), str(seg.dtype).replace("torch.", "")
            rec.tiling = {"tile_size": int(seg.tile_size), "overlap": int(seg.overlap)}
        if rec.image or self.binder.image_layer is None:
            return
        try:
            src = self.binder.source()
        except Exception:  # noqa: BLE001 - no usable image yet: filled later
            return
        if list(src.spatial_shape) != rec.labels.get("shape"):
            return
        composite = src.data is not level0(src.layer)  # channels: no one file
        path = None if composite else getattr(unwrap(src.layer).source, "path", None)
        rec.image = {"path": None if path is None else str(path),
                     "shape": [int(s) for s in src.data.shape],
                     "dtype": str(np.dtype(src.data.dtype)),
                     "axis": 0 if src.n_lead else None,
                     "fixed": {str(a): 0 for a in range(1, src.n_lead)},
                     "rgb": bool(src.rgb), "fingerprint": None}
        if composite:
            rec.image["channels"] = True
        data = src.data
        rec.fill_later(rec.image, "fingerprint", lambda: provenance.image_fingerprint(data))

    def _record_import(self, raw, rec: Provenance) -> None:
        try:
            top = self.binder.max_label(raw)
        except Exception:  # noqa: BLE001 - unreadable: nothing to say it held
            log.debug("SAM3: largest id of %s unknown", raw.name, exc_info=True)
            return
        if top <= 0:
            return
        target = self.binder.targets.of(raw)
        shape = tuple(int(s) for s in target.shape)
        path = getattr(raw.source, "path", None)
        note = f"labels from elsewhere: ids up to {top}"
        if int(np.prod(shape)) <= IMPORT_VALUES_PIXELS:
            values = target.read(tuple(slice(0, s) for s in shape))
            op = provenance.external_op("import", values, source=path and str(path), note=note)
            op["fingerprint"] = provenance.image_fingerprint(values)
            rec.append(op)
            return
        op = rec.append(provenance.external_op("import", None, source=path and str(path),
                                               note=note))
        op["max_id"] = int(top)
        data = target.data
        rec.fill_later(op, "fingerprint", lambda: provenance.image_fingerprint(data))

    @contextmanager
    def writing(self, labels):
        """A SAM write into ``labels``: the log is started before it, and napari's paint
        events of the write are not recorded as edits."""
        self.log(labels)
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1

    def append(self, labels, op: dict, region=None) -> dict:
        """Add ``op`` to the layer's log and announce it (``labels_recorded``)."""
        rec = self.log(labels)
        seg = self.session.segmenter
        if (op.get("kind") in provenance.REPLAYED and seg is not None and rec.model
                and rec.model.get("fingerprint") != provenance.jsonable(seg.fingerprint)):
            op = {**op, "model": provenance.model_record(seg)}  # another model since
        stored = rec.append(op)
        self.session.labels_recorded.emit(labels, region)
        return stored

    def replace(self, labels, old: dict, op: dict, region=None) -> dict | None:
        """Replace ``old`` (an operation of the layer's log) by ``op`` when ``old`` is the
        last operation; None (nothing changed) otherwise."""
        rec = self.log(labels)
        if not rec.operations or rec.operations[-1] is not old:
            return None
        rec.operations.pop()
        return self.append(labels, op, region)

    def drop_last(self, labels, old: dict) -> bool:
        """Remove ``old`` if it is the layer's last operation (a result cleared at once)."""
        rec = self.log(labels)
        if not rec.operations or rec.operations[-1] is not old:
            return False
        rec.operations.pop()
        self.session.labels_recorded.emit(labels, None)
        return True

    def record_values(self, labels, boxes: dict, note: str, atoms=None) -> None:
        """Store the label values of each ``{lead: bbox}`` as they are now, with the new
        values of ``atoms`` (a napari history item still being written) over them (a
        ``brush`` operation per slice): the result of an edit that is not a SAM one."""
        if not boxes:
            return
        target = self.binder.targets.of(labels)
        for lead, bbox in sorted(boxes.items()):
            key = region_key(lead, bbox)
            values = np.array(target.read(key))
            if atoms:
                values = apply_atoms(values, atoms, lead, bbox)
            self.append(labels, provenance.external_op(
                "brush", values, bbox=bbox, slice_index=slice_of(lead), note=note), key)

    # -- napari's own edits ----------------------------------------------------------------------
    def hold(self, labels) -> None:
        """Keep napari's edits of ``labels`` out of its log until :meth:`release`: a task
        writing into it over time (a propagation) appends its operation at its end, and
        the edits made meanwhile must come after it."""
        self._held.setdefault(id(unwrap(labels)), [])

    def release(self, labels, record: bool = True) -> None:
        """Record the edits held since :meth:`hold` (after the task's operation), as the
        values of their regions now: replay then gives the labels as they are.
        ``record=False``: drop them (the layer is gone)."""
        held = self._held.pop(id(unwrap(labels)), None)
        for boxes, note in held if record and held else ():
            self.record_values(labels, boxes, note)

    def _record_edit(self, layer, boxes: dict, note: str, atoms=None) -> None:
        """A napari edit: recorded now, or (held) its regions announced and kept."""
        held = self._held.get(id(layer))
        if held is None:
            self.record_values(layer, boxes, note, atoms)
            return
        held.append((boxes, note))
        for lead, bbox in sorted(boxes.items()):
            self.session.labels_recorded.emit(layer, region_key(lead, bbox))

    def _on_role_changed(self, role: str) -> None:
        if role == "labels" and self.binder.labels_layer is not None:
            self._attach(unwrap(self.binder.labels_layer))

    def _attach(self, raw) -> None:
        hit = self._attached.get(id(raw))
        if hit is not None and hit[0]() is raw:
            return
        if getattr(raw, "multiscale", False):  # napari paints no multiscale labels
            try:
                self._watch_pyramid(raw)
            except Exception:  # noqa: BLE001 - a pyramid we cannot write: nothing to record
                log.debug("SAM3: cannot follow %s", raw.name, exc_info=True)
            return
        ref = weakref.ref(raw)

        def on_paint(event):
            layer = ref()
            if layer is not None and not self._writing and not self.session.closed:
                self._record_edit(layer, changed_boxes(event.value, layer.ndim),
                                  f"napari {layer.mode}", event.value)

        raw.events.paint.connect(on_paint)
        for name in ("undo", "redo"):
            setattr(raw, name, self._recorded_history(raw, name))
        self._attached[id(raw)] = (ref, on_paint)

    def _recorded_history(self, raw, name: str):
        """``raw.undo`` / ``raw.redo`` that also record the region they restore."""
        method = getattr(type(raw), name).__get__(raw)
        ref = weakref.ref(raw)

        def call():
            layer = ref()
            history = raw._undo_history if name == "undo" else raw._redo_history
            item = list(history[-1]) if history else None
            method()
            if item and layer is not None and not self._writing and not self.session.closed:
                self._record_edit(layer, changed_boxes(item, layer.ndim), f"napari {name}")

        return call

    def detach_all(self) -> None:
        """Stop following napari (the session closed) and let the session go."""
        if self.session.__dict__.get(_RECORDER_ATTR) is self:
            del self.session.__dict__[_RECORDER_ATTR]
        try:
            self.binder.role_changed.disconnect(self._on_role_changed)
        except (TypeError, ValueError, RuntimeError):
            pass
        self._held.clear()
        for ref, on_paint in self._attached.values():
            raw = ref()
            if raw is None:
                continue
            try:
                raw.events.paint.disconnect(on_paint)
            except (TypeError, ValueError, RuntimeError):
                pass
            for name in ("undo", "redo"):
                raw.__dict__.pop(name, None)
        self._attached.clear()


__all__ = ["recorder", "ProvenanceRecorder", "slice_of", "region_key", "changed_boxes",
           "apply_atoms",
           "IMPORT_VALUES_PIXELS"]
