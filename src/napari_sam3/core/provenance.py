"""How a label image was made: a versioned, JSON-able record written with every output.

The record (schema ``napari-sam3/provenance``, :data:`VERSION`) is one dict::

    {"schema": "napari-sam3/provenance", "version": 1,
     "software": {"name": "napari-sam3", "version": "0.1.0"},
     "model": {"source": "facebook/sam3", "fingerprint": {...}},  # model_fingerprint
     "device": "cpu", "dtype": "float32",
     "tiling": {"tile_size": 1008, "overlap": 252},
     "image": {"path": ..., "shape": [...], "dtype": "uint16", "axis": 0 | null,
               "fixed": {}, "rgb": false,  # the stack axis, other leading axes, channels
               "fingerprint": {"kind": "full" | "sampled", "value": hex}},
     "labels": {"shape": [...]},
     "operations": [op, ...]}                                     # in the order applied

Every operation has a ``kind``; the replayable ones store what made them:

* ``prompts`` (a commit on one image or slice): ``slice`` (null on a 2D image),
  ``limits``, ``postprocess`` and ``objects``: per object its ``id``, ``points``
  (row, col), ``labels`` (1 positive, 0 negative), ``box`` (row0, col0, row1, col1),
  ``mask`` (null, ``{"labels_id": n}``: the mask of label n before this operation, or
  ``{"bbox": [...], "rle": [...]}`` inline), the ``tile`` it was decoded in (row0,
  col0, row1, col1; null: untiled) and its ``iou_score`` and ``object_score``; a
  widget commit also has ``commit`` (``{"overwrite": bool}``): each object is decoded
  over its tile and pasted by the commit rule (other objects' pixels kept unless
  ``overwrite``, the object's old pixels outside its new mask cleared);
* ``propagation``: ``direction``, ``start``, ``stop`` (excluded), ``score_threshold``,
  ``stop_after``, ``limits``, ``postprocess``, ``objects`` (as above, each with its
  ``slice``) and per tracked slice the ids and object scores (``slices``);
* ``concept``: ``model`` (source and fingerprint of the detector), ``text``,
  ``exemplars``, ``exemplar_labels``, ``threshold``, ``min_area``, ``postprocess``,
  ``limits``, ``slices`` (null on a 2D image), ``start_id`` and ``instances`` (id,
  slice, score, area);
* ``everything``: ``settings`` (``EverythingSettings``), ``limits``, ``slices``,
  ``start_id`` and ``instances``.

Edits of ids (:data:`EDITS`, replayed): ``delete`` (``ids`` -> 0) and ``merge`` (``ids``
-> ``into``) on ``slice`` (null: the whole image).

External operations (:data:`EXTERNAL`: ``brush``, ``import``) are results, not replayed
computations: ``region`` (``slice``, ``bbox``) and ``values`` (run-length label values
of that region after the edit; on a stack with ``slice`` null, of every slice) or a
``source`` file. Replay writes them back as stored.

A ``slice`` is a slice index along the recorded ``axis``, or (images with several
leading axes) the list of leading indices.

NumPy only: no torch, Qt or napari. :func:`replay` lives in :mod:`.replay`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA = "napari-sam3/provenance"
VERSION = 1
REPLAYED = ("prompts", "propagation", "concept", "everything")
EDITS = ("delete", "merge")
EXTERNAL = ("brush", "import")
KINDS = REPLAYED + EDITS + EXTERNAL
#: Images up to this size are fingerprinted by a hash of every pixel; larger ones by
#: ``embedding_store.image_id`` (a fixed sample of windows).
FULL_HASH_BYTES = 256 << 20
#: Guards every record's list of :meth:`Provenance.fill_later` threads (held briefly).
_PENDING_LOCK = threading.Lock()


class ProvenanceError(ValueError):
    """A record that cannot be read or replayed; the message says why."""


# -- fingerprints -------------------------------------------------------------------------------
def image_fingerprint(data) -> dict:
    """``{"kind": "full", "value": ...}`` (every pixel hashed, plane by plane) for images up
    to :data:`FULL_HASH_BYTES`, else ``{"kind": "sampled", ...}`` (``image_id``)."""
    shape = tuple(int(s) for s in data.shape)
    dtype = np.dtype(data.dtype)
    if int(np.prod(shape)) * dtype.itemsize > FULL_HASH_BYTES:
        from .embedding_store import image_id

        return {"kind": "sampled", "value": image_id(data)}
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{shape}{dtype.str}".encode())
    planes = range(shape[0]) if len(shape) > 3 else [Ellipsis]
    for k in planes:
        h.update(np.ascontiguousarray(np.asarray(data[k]), dtype=dtype).tobytes())
    return {"kind": "full", "value": h.hexdigest()}


def _software() -> dict:
    from .. import __version__

    return {"name": "napari-sam3", "version": __version__}


def model_record(model) -> dict:
    """``{"source", "fingerprint"}`` of a loaded ``Sam3Segmenter``/``ConceptSegmenter``."""
    return {"source": str(model.model_id), "fingerprint": jsonable(model.fingerprint)}


# -- JSON helpers ---------------------------------------------------------------------------------
def jsonable(value):
    """NumPy arrays and scalars, tuples and dataclass-like dicts as plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def encode_mask(mask: np.ndarray) -> dict | None:
    """A boolean mask as ``{"shape", "bbox", "rle"}``: run lengths (first run False) of
    its bounding box in C order; None for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    box = [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1]
    flat = mask[box[0]:box[2], box[1]:box[3]].ravel()
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"shape": list(mask.shape), "bbox": box, "rle": runs}


def decode_mask(ref: dict) -> np.ndarray:
    """The mask :func:`encode_mask` encoded."""
    out = np.zeros(tuple(ref["shape"]), dtype=bool)
    r0, c0, r1, c1 = ref["bbox"]
    flat = np.zeros((r1 - r0) * (c1 - c0), dtype=bool)
    pos = 0
    for j, n in enumerate(ref["rle"]):
        if j % 2:
            flat[pos:pos + n] = True
        pos += n
    out[r0:r1, c0:c1] = flat.reshape(r1 - r0, c1 - c0)
    return out


def encode_values(values: np.ndarray) -> list[list[int]]:
    """Label values (any shape) as ``[[value, count], ...]`` runs in C order."""
    flat = np.asarray(values).ravel()
    if not flat.size:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], edges])
    counts = np.diff(np.concatenate([starts, [flat.size]]))
    return [[int(flat[s]), int(n)] for s, n in zip(starts, counts, strict=True)]


def decode_values(runs, shape) -> np.ndarray:
    """The array :func:`encode_values` encoded, int32, of ``shape``."""
    values = np.array([v for v, _ in runs], dtype=np.int32)
    counts = np.array([n for _, n in runs], dtype=np.int64)
    return np.repeat(values, counts).reshape(tuple(shape))


# -- operations -------------------------------------------------------------------------------------
def prompt_record(prompt, obj_id: int, mask_ref: dict | None = None) -> dict:
    """One object's prompts as stored: id, points, labels, box and mask (a reference)."""
    mask = None
    if prompt.mask is not None:
        mask = mask_ref if mask_ref is not None else encode_mask(prompt.mask)
    return {"id": int(obj_id), "points": np.asarray(prompt.points, dtype=float).tolist(),
            "labels": np.asarray(prompt.point_labels).astype(int).tolist(),
            "box": None if prompt.box is None else np.asarray(prompt.box, float).tolist(),
            "mask": mask}


def prompt_from_record(rec: dict, labels_before=None):
    """The ObjectPrompt of a stored object; ``labels_before``: the plane's labels as they
    were before the operation, for a ``{"labels_id": n}`` mask reference."""
    from .prompts import ObjectPrompt

    mask = rec.get("mask")
    if mask is not None:
        if "labels_id" in mask:
            if labels_before is None:
                raise ProvenanceError(f"object {rec['id']}: its mask refers to label "
                                      f"{mask['labels_id']}, but no labels were given")
            mask = np.asarray(labels_before) == int(mask["labels_id"])
        else:
            mask = decode_mask(mask)
    return ObjectPrompt(points=rec.get("points") or [], point_labels=rec.get("labels"),
                        box=rec.get("box"), mask=mask)


def prompt_kind(rec: dict) -> str:
    """'points', 'box', 'points+box', 'mask', ... of a stored object."""
    parts = [name for name, on in (("points", bool(rec.get("points"))),
                                   ("box", rec.get("box") is not None),
                                   ("mask", rec.get("mask") is not None)) if on]
    return "+".join(parts) or "none"


def postprocess_record(max_hole_area: int, max_sprinkle_area: int) -> dict:
    return {"max_hole_area": int(max_hole_area), "max_sprinkle_area": int(max_sprinkle_area)}


def prompts_op(prompts, ids, results=None, *, slice_index: int | None = None, limits=None,
               max_hole_area: int = 0, max_sprinkle_area: int = 0, mask_refs=None) -> dict:
    """The ``prompts`` operation of a commit: ObjectPrompts and their ids, ``results`` the
    ``ObjectMask`` of each (its ``tile`` and scores; None where not decoded), on slice
    ``slice_index`` with ``limits`` and the clean-up; ``mask_refs``: per object index a
    reference for its mask prompt, e.g. ``{"labels_id": 3}`` (default: run-length coded)."""
    objects = [prompt_record(p, i, (mask_refs or {}).get(k))
               for k, (p, i) in enumerate(zip(prompts, ids, strict=True))]
    for rec, obj in zip(objects, results or [None] * len(objects), strict=True):
        if obj is not None:
            rec.update(tile=None if obj.tile is None else [int(v) for v in obj.tile],
                       iou_score=float(obj.iou_score), object_score=float(obj.object_score))
    return {"kind": "prompts", "slice": slice_index, "limits": jsonable(limits),
            "postprocess": postprocess_record(max_hole_area, max_sprinkle_area),
            "objects": objects}


def external_op(kind: str, region_values, *, bbox=None, slice_index: int | None = None,
                source: str | None = None, note: str | None = None) -> dict:
    """A brush edit or imported labels, stored as its result: the label values of
    ``bbox`` (row0, col0, row1, col1; default the whole plane) after it, on ``slice``."""
    if kind not in EXTERNAL:
        raise ValueError(f"external operations are {', '.join(EXTERNAL)}, not {kind!r}")
    op: dict[str, Any] = {"kind": kind, "slice": slice_index, "source": source}
    if region_values is not None:
        values = np.asarray(region_values)
        box = [0, 0, *values.shape[-2:]] if bbox is None else [int(v) for v in bbox]
        op["region"] = {"bbox": box, "shape": list(values.shape)}
        op["values"] = encode_values(values)
        op["ids"] = sorted(int(v) for v in np.unique(values) if v != 0)
    if note:
        op["note"] = note
    return op


def edit_op(kind: str, ids, *, into: int = 0, slice_index=None) -> dict:
    """A ``delete`` (``ids`` -> 0) or ``merge`` (``ids`` -> ``into``) of label ids on
    ``slice`` (None: the whole image or stack)."""
    if kind not in EDITS:
        raise ValueError(f"id edits are {', '.join(EDITS)}, not {kind!r}")
    op: dict[str, Any] = {"kind": kind, "slice": jsonable(slice_index),
                          "ids": sorted(int(i) for i in ids)}
    if kind == "merge":
        op["into"] = int(into)
    return op


# -- the record -----------------------------------------------------------------------------------
@dataclass
class Provenance:
    """A labels output's record (see the module docstring); :meth:`to_json` /
    :meth:`from_json` round-trip it exactly."""

    model: dict = field(default_factory=dict)
    device: str = ""
    dtype: str = ""
    tiling: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    operations: list = field(default_factory=list)
    software: dict = field(default_factory=_software)
    version: int = VERSION

    @classmethod
    def start(cls, model, image=None, *, path: str | None = None, axis: int | None = None,
              fixed: dict | None = None, rgb: bool | None = None,
              labels_shape=None) -> Provenance:
        """A new record for ``model`` (a loaded segmenter) on ``image`` (its array; the
        content fingerprint is taken now), with no operation yet."""
        rec = cls(model=model_record(model), device=str(model.device),
                  dtype=str(model.dtype).replace("torch.", ""),
                  tiling={"tile_size": int(model.tile_size), "overlap": int(model.overlap)})
        if image is not None:
            rec.image = {"path": path, "shape": [int(s) for s in image.shape],
                         "dtype": str(np.dtype(image.dtype)), "axis": axis,
                         "fixed": {str(k): int(v) for k, v in (fixed or {}).items()},
                         "rgb": rgb,
                         "fingerprint": image_fingerprint(image)}
        if labels_shape is not None:
            rec.labels = {"shape": [int(s) for s in labels_shape]}
        return rec

    def fill_later(self, where: dict, key: str, compute) -> None:
        """Set ``where[key] = compute()`` in a background thread (a fingerprint of a
        large image takes seconds); :meth:`to_dict` waits for it. The key is there (None)
        at once, so ``where`` keeps its size while another thread reads it."""
        where.setdefault(key, None)

        def run():
            try:
                where[key] = compute()
            except Exception as e:  # noqa: BLE001 - a record without it, saying why
                where[key] = {"kind": "failed", "value": None, "error": str(e)}

        thread = threading.Thread(target=run, name="napari-sam3 fingerprint", daemon=True)
        with _PENDING_LOCK:
            thread.start()
            self.__dict__.setdefault("_pending", []).append(thread)

    def __deepcopy__(self, memo) -> Provenance:
        return Provenance.from_dict(self.to_dict())

    def wait(self) -> None:
        """Block until every :meth:`fill_later` value is set (in any thread: each caller
        joins the threads; they leave the list only once joined)."""
        with _PENDING_LOCK:
            threads = list(self.__dict__.get("_pending", ()))
        for thread in threads:
            thread.join()
        with _PENDING_LOCK:
            pending = self.__dict__.get("_pending")
            if pending:
                pending[:] = [t for t in pending if t not in threads]

    def append(self, op: dict) -> dict:
        """Add an operation (a dict with a ``kind`` from :data:`KINDS`) at the end; it is
        stored as JSON values (a copy)."""
        if not isinstance(op, dict) or op.get("kind") not in KINDS:
            raise ProvenanceError(f"an operation needs a kind out of {', '.join(KINDS)}")
        op = jsonable(copy.deepcopy(op))
        self.operations.append(op)
        return op

    def to_dict(self) -> dict:
        self.wait()
        return {"schema": SCHEMA, "version": self.version, "software": self.software,
                "model": self.model, "device": self.device, "dtype": self.dtype,
                "tiling": self.tiling, "image": self.image, "labels": self.labels,
                "operations": self.operations}

    @classmethod
    def from_dict(cls, d: dict) -> Provenance:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ProvenanceError("not a napari-sam3 provenance record")
        if int(d.get("version", 0)) > VERSION:
            raise ProvenanceError(f"provenance version {d.get('version')} is newer than this "
                                  f"napari-sam3 reads ({VERSION}): upgrade napari-sam3")
        names = ("model", "device", "dtype", "tiling", "image", "labels", "operations",
                 "software")
        return cls(**{k: copy.deepcopy(d[k]) for k in names if k in d},
                   version=int(d["version"]))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ProvenanceError(f"the provenance is not valid JSON: {e}") from None

    # -- checks --------------------------------------------------------------------------------
    def mismatches(self, model=None, image=None) -> list[str]:
        """What differs between the record and ``model`` (a loaded segmenter) or ``image``
        (its array): the model fingerprint (per part), device, dtype, tiling, the image's
        shape or pixels. Empty: a replay gives the same labels."""
        found = []
        if model is not None:
            was, now = self.model.get("fingerprint", {}), jsonable(model.fingerprint)
            parts = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            names = {"weights": "weights", "config": "config", "processor":
                     "processor settings", "id": "model id", "revision": "hub revision",
                     "class": "model class"}
            found += [f"{names.get(k, k)} differ" for k in parts]
            for what, was_v, now_v in (
                ("device", self.device, str(model.device)),
                ("dtype", self.dtype, str(model.dtype).replace("torch.", "")),
                ("tile size", self.tiling.get("tile_size"), int(model.tile_size)),
                ("overlap", self.tiling.get("overlap"), int(model.overlap)),
            ):
                if was_v not in (None, "") and was_v != now_v:
                    found.append(f"{what} {now_v} (recorded {was_v})")
        if image is not None and self.image:
            shape = [int(s) for s in image.shape]
            if shape != self.image.get("shape"):
                found.append(f"image shape {shape} (recorded {self.image.get('shape')})")
            elif image_fingerprint(image) != self.image.get("fingerprint"):
                found.append("image pixels differ")
        return found

    # -- summaries -----------------------------------------------------------------------------
    def label_properties(self, areas: dict[int, int] | None = None) -> list[dict]:
        """Per label value: ``label-value``, ``score``, ``prompt kind``, ``slice`` and
        (from ``areas``) ``area``, from the last operation that made it (NGFF
        ``image-label`` properties)."""
        props: dict[int, dict] = {}
        for op in self.operations:
            if op["kind"] in EDITS:
                if op.get("slice") is None:  # gone (a merge's target keeps its entry)
                    for v in op.get("ids", []):
                        props.pop(int(v), None)
                continue
            for item in _label_items(op):
                props[item["label-value"]] = item
        if areas is not None:
            for v in list(props):
                if v not in areas:
                    del props[v]  # painted over since
            for v, n in areas.items():
                props.setdefault(int(v), {"label-value": int(v)})["area"] = int(n)
        return [props[v] for v in sorted(props)]


def _label_items(op: dict) -> list[dict]:
    kind = op["kind"]
    if kind in ("prompts", "propagation"):
        return [{"label-value": o["id"], "score": o.get("iou_score"),
                 "prompt kind": ("propagation: " if kind == "propagation" else "")
                 + prompt_kind(o), "slice": o.get("slice", op.get("slice"))}
                for o in op.get("objects", [])]
    if kind in ("concept", "everything"):
        what = "concept" if kind == "concept" else "everything"
        return [{"label-value": r["id"], "score": r.get("score"), "prompt kind": what,
                 "slice": r.get("slice")} for r in op.get("instances", [])]
    return [{"label-value": i, "score": None, "prompt kind": kind, "slice": op.get("slice")}
            for i in op.get("ids", [])]


def replay(provenance: Provenance, image, segmenter, out=None, *, concept=None):
    """Re-run the recorded operations on ``image`` into ``out``: see
    :func:`napari_sam3.core.replay.replay`."""
    from .replay import replay as run

    return run(provenance, image, segmenter, out, concept=concept)


__all__ = ["SCHEMA", "VERSION", "KINDS", "REPLAYED", "EDITS", "EXTERNAL", "Provenance",
           "ProvenanceError", "image_fingerprint", "model_record", "prompt_record", "prompts_op",
           "prompt_from_record", "external_op", "edit_op", "encode_mask", "decode_mask",
           "encode_values", "decode_values", "replay", "jsonable"]
