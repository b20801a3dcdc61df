"""Recorded runs and their replay (see :mod:`napari_sam3.core.provenance` for the record).

* :func:`segment`: ``Sam3Segmenter.segment`` that appends a ``prompts`` operation with
  each object's prompts, the tile it was decoded in and its scores; with ``tiles`` it
  decodes each object in the given tile (a replay of cache-aware routing, whatever the
  cache holds now).
* :func:`propagate`: ``Sam3Segmenter.propagate``, recorded.
* :func:`concept_op`, :func:`everything_op`: the operations of a concept or
  segment-everything run that was painted with :func:`instances.paint_in_sequence`.
* :func:`replay`: every operation again, in order, into a label image.

torch is imported by the segmenters only.
"""

from __future__ import annotations

from dataclasses import replace as dc_replace

import numpy as np

from . import postprocess
from .defaults import DEFAULT_DIRECTION, DEFAULT_STOP_AFTER
from .planes import plane_of
from .postprocess import DEFAULTS, Flush
from .prompts import prompt_bbox
from .provenance import (
    EDITS,
    EXTERNAL,
    Provenance,
    ProvenanceError,
    decode_values,
    jsonable,
    model_record,
    postprocess_record,
    prompt_from_record,
    prompt_record,
    prompts_op,
)


def _forced_route(segmenter, image, prompts, tiles):
    """``route(bbox) -> Tile`` sending prompt i to the tile box ``tiles[i]`` (None: the
    fixed rule)."""
    grid = segmenter.tiles(image)
    by_box = {(t.r0, t.c0, t.r1, t.c1): t for t in grid.tiles}
    chosen = {}
    for p, box in zip(prompts, tiles, strict=True):
        if box is None:
            continue
        tile = by_box.get(tuple(int(v) for v in box))
        if tile is None:
            raise ProvenanceError(f"tile {list(box)} is not a tile of this image with tile "
                                  f"size {grid.tile_size} and overlap {grid.overlap}")
        chosen[tuple(float(v) for v in prompt_bbox(p))] = tile
    return lambda bbox: chosen.get(tuple(float(v) for v in bbox)) or grid.route(bbox)


def segment(log: Provenance | None, segmenter, image, prompts, *, ids=None, limits=None,
            out=None, slice_index: int | None = None, tiles=None, mask_refs=None,
            max_hole_area: int = DEFAULTS.max_hole_area,
            max_sprinkle_area: int = DEFAULTS.max_sprinkle_area) -> np.ndarray:
    """``segmenter.segment(image, prompts, ids=..., limits=..., out=...)`` (the same
    labels), appending a ``prompts`` operation to ``log``.

    ``slice_index``: the slice of a stack ``image`` is (recorded only); ``tiles``: per
    object the tile box (row0, col0, row1, col1) to decode it in, None for the fixed
    rule; ``mask_refs``: per object index a reference for its mask prompt, e.g.
    ``{"labels_id": 3}`` (default: the mask itself, run-length encoded).
    """
    from .segmenter import _checked_objects

    shape = tuple(image.shape[:2])
    prompts, ids = _checked_objects(prompts, shape, ids, out, max_hole_area, max_sprinkle_area)
    ids = list(range(1, len(prompts) + 1)) if ids is None else list(ids)
    if not segmenter.tiles(image).single:  # as segment does: one image is normalised whole
        limits = segmenter.resolve_limits(image, limits)
    results: list = [None] * len(prompts)
    route = None if tiles is None else _forced_route(segmenter, image, prompts, tiles)

    def stream():
        for later, objects in segmenter._objects_by_tile(image, prompts, limits, True, route):
            for i, obj in objects:
                results[i] = _Decoded(obj.tile, obj.iou_score, obj.object_score)
                yield obj.region, obj.logits, i
            yield Flush(later)

    if out is None:
        out = np.zeros(shape, dtype=np.int32)
    postprocess.paste_objects(out, stream() if prompts else [], ids,
                  max_hole_area=max_hole_area, max_sprinkle_area=max_sprinkle_area)
    if log is not None:
        log.append(prompts_op(prompts, ids, results, slice_index=slice_index, limits=limits,
                              max_hole_area=max_hole_area, max_sprinkle_area=max_sprinkle_area,
                              mask_refs=mask_refs))
    return out


class _Decoded:
    """What a record keeps of an ObjectMask: its tile and scores (not its logits)."""

    def __init__(self, tile, iou_score, object_score):
        self.tile, self.iou_score, self.object_score = tile, iou_score, object_score


def propagation_op(prompts_by_slice, direction, start, stop, *, limits, score_threshold,
                   stop_after, max_hole_area, max_sprinkle_area, results=()) -> dict:
    """The ``propagation`` operation of a run of ``Sam3Segmenter.iter_propagate``:
    ``prompts_by_slice`` ``{slice: {id: ObjectPrompt}}``, ``results`` its SliceResults (or
    ``(index, ids, object_scores, tile)`` summaries)."""
    from .propagation import normalize_prompts

    objects = [{**prompt_record(p, i), "slice": int(k)}
               for k, objs in normalize_prompts(prompts_by_slice).items()
               for i, p in objs.items()]
    slices, tiles = [], {}
    for r in results:
        rows, cols = r.region
        for i in r.ids:
            tiles[int(i)] = [rows.start, cols.start, rows.stop, cols.stop]
        slices.append({"slice": int(r.index), "ids": [int(i) for i in r.ids],
                       "object_scores": [float(s) for s in r.object_scores]})
    for o in objects:
        o["tile"] = tiles.get(o["id"])
    return {"kind": "propagation", "direction": direction, "start": int(start),
            "stop": int(stop), "score_threshold": float(score_threshold),
            "stop_after": int(stop_after), "limits": jsonable(limits),
            "postprocess": postprocess_record(max_hole_area, max_sprinkle_area),
            "objects": objects, "slices": slices}


def propagate(log: Provenance | None, segmenter, stack, prompts_by_slice, axis: int = 0,
              direction: str = DEFAULT_DIRECTION, start: int | None = None,
              stop: int | None = None, *, out=None, fixed=None, limits=None,
              score_threshold: float = 0.0, stop_after: int = DEFAULT_STOP_AFTER,
              max_hole_area: int = DEFAULTS.max_hole_area,
              max_sprinkle_area: int = DEFAULTS.max_sprinkle_area) -> np.ndarray:
    """``segmenter.propagate`` (the same labels), appending a ``propagation`` operation."""
    from .propagation import StackFrames, stack_limits, write_slice

    frames = StackFrames(stack, axis, fixed)
    limits = stack_limits(frames, limits)
    start = 0 if start is None else int(start)
    stop = len(frames) if stop is None else int(stop)
    if out is None:
        out = np.zeros((len(frames), *frames.shape[:2]), dtype=np.int32)
    done = []
    for result in segmenter.iter_propagate(stack, prompts_by_slice, axis, direction, start,
                                           stop, fixed=fixed, limits=limits,
                                           score_threshold=score_threshold,
                                           stop_after=stop_after):
        write_slice(out, result, max_hole_area, max_sprinkle_area)
        done.append(_Summary(result))
    if log is not None:
        log.append(propagation_op(prompts_by_slice, direction, start, stop, limits=limits,
                                  score_threshold=score_threshold, stop_after=stop_after,
                                  max_hole_area=max_hole_area,
                                  max_sprinkle_area=max_sprinkle_area, results=done))
    return out


class _Summary:
    """What a propagation record keeps of a SliceResult (not its logits)."""

    def __init__(self, result):
        self.index, self.region = result.index, result.region
        self.ids, self.object_scores = list(result.ids), list(result.object_scores)


def concept_op(model, text, exemplars, exemplar_labels, *, threshold, min_area, limits,
               max_hole_area, max_sprinkle_area, slices, start_id: int, instances) -> dict:
    """The ``concept`` operation of a detector run painted from ``start_id``, slice by
    slice (``slices``: None on a 2D image); ``instances``: id, slice, score, area rows."""
    return {"kind": "concept", "model": model_record(model), "text": text,
            "exemplars": jsonable(exemplars), "exemplar_labels": jsonable(exemplar_labels),
            "threshold": float(threshold), "min_area": int(min_area),
            "postprocess": postprocess_record(max_hole_area, max_sprinkle_area),
            "limits": jsonable(limits), "slices": None if slices is None else list(slices),
            "start_id": int(start_id), "instances": jsonable(instances)}


def everything_op(settings, *, limits, slices, start_id: int, instances) -> dict:
    """The ``everything`` operation of ``generate_everything`` runs painted from
    ``start_id`` (``settings``: an ``EverythingSettings``)."""
    return {"kind": "everything", "settings": jsonable(dict(settings.__dict__)),
            "limits": jsonable(limits), "slices": None if slices is None else list(slices),
            "start_id": int(start_id), "instances": jsonable(instances)}


# -- replay ---------------------------------------------------------------------------------------
def _planes(provenance: Provenance, image):
    """``(frames or None, axis, fixed)``: the recorded stack view of ``image``."""
    from .propagation import StackFrames

    labels_shape = provenance.labels.get("shape")
    rec = provenance.image or {}
    if labels_shape is None or len(labels_shape) == 2:
        return None, None, None
    axis = rec.get("axis") or 0
    fixed = {int(k): int(v) for k, v in (rec.get("fixed") or {}).items()}
    rgb = rec.get("rgb")
    if rgb is None:  # the CLI's rule
        rgb = len(image.shape) - len(fixed) - 1 == 3 and image.shape[-1] in (2, 3, 4)
    return StackFrames(image, axis, fixed, rgb=rgb), axis, fixed


def _limits(value):
    if value is None:
        return None
    return tuple(value) if np.ndim(value) == 1 else [tuple(v) for v in value]


def replay(provenance: Provenance, image, segmenter, out=None, *, concept=None,
           progress=None) -> np.ndarray:
    """Run every recorded operation again on ``image`` (the recorded array: a 2D image or
    the stack, viewed along the recorded axis) into ``out`` (default: new int32 zeros of
    the recorded labels shape); returns ``out``.

    ``segmenter``: a ``Sam3Segmenter`` (prompts, propagation, everything; None if the
    record has none of these); ``concept``: the ``ConceptSegmenter`` for concept
    operations (default: ``concept_for(segmenter, recorded source)``). Each object is
    decoded in its recorded tile. ``progress(i, n, op)`` before operation i. Fingerprints
    are not checked here: see :meth:`Provenance.mismatches`.
    """
    shape = tuple(provenance.labels.get("shape") or image.shape[:2])
    if out is None:
        out = np.zeros(shape, dtype=np.int32)
    frames, axis, fixed = _planes(provenance, image)
    ops = provenance.operations
    for n, op in enumerate(ops):
        if progress is not None:
            progress(n, len(ops), op)
        kind = op["kind"]
        if kind == "prompts":
            _replay_prompts(op, segmenter, image, frames, out)
        elif kind == "propagation":
            _replay_propagation(op, segmenter, image, axis, fixed, out)
        elif kind in ("concept", "everything"):
            if kind == "concept" and concept is None:
                from .concept import concept_for

                concept = concept_for(segmenter, op["model"]["source"])
            _replay_instances(op, concept if kind == "concept" else segmenter, image, frames,
                              out)
        elif kind in EDITS:
            _replay_edit(op, out)
        elif kind in EXTERNAL:
            _replay_external(op, out, n)
        else:
            raise ProvenanceError(f"operation {n + 1}: unknown kind {kind!r}")
    return out


def _lead(k) -> tuple:
    """The leading indices of a recorded ``slice``: () for null, a list as given."""
    if k is None:
        return ()
    return tuple(int(v) for v in k) if isinstance(k, list | tuple) else (int(k),)


def _plane(image, frames, k):
    """The recorded plane ``k`` of ``image`` (see :func:`_lead`)."""
    if k is None:
        return image
    return plane_of(image, _lead(k)) if isinstance(k, list | tuple) else frames[k]


def _replay_prompts(op, segmenter, image, frames, out) -> None:
    k = op.get("slice")
    plane = _plane(image, frames, k)
    target = plane_of(out, _lead(k))
    before = np.asarray(target) if any(o.get("mask") and "labels_id" in o["mask"]
                                       for o in op["objects"]) else None
    prompts = [prompt_from_record(o, before) for o in op["objects"]]
    if op.get("commit") is not None:
        _replay_commit(op, segmenter, plane, prompts, target)
        return
    segment(None, segmenter, plane, prompts, ids=[o["id"] for o in op["objects"]],
            limits=_limits(op.get("limits")), out=target,
            tiles=[o.get("tile") for o in op["objects"]], **op["postprocess"])


def _replay_commit(op, segmenter, plane, prompts, target) -> None:
    """A widget commit: each object decoded over its recorded tile (as the preview was),
    cleaned, and pasted by the commit rule (``postprocess.paste_object``)."""
    from .postprocess import masks_to_labels, paste_object
    from .prompts import as_prompts

    prompts = as_prompts(prompts, tuple(plane.shape[:2]))
    tiles = [o.get("tile") for o in op["objects"]]
    route = None if all(t is None for t in tiles) else _forced_route(segmenter, plane,
                                                                     prompts, tiles)
    decoded = {}
    for _, objects in segmenter._objects_by_tile(plane, prompts, _limits(op.get("limits")),
                                                 False, route):
        decoded.update(objects)
    overwrite = bool(op["commit"].get("overwrite", False))
    for i, o in enumerate(op["objects"]):
        obj = decoded[i]
        labels = masks_to_labels(obj.logits[None], ids=[o["id"]], **op["postprocess"])
        region = tuple(slice(int(s.start or 0), int(s.stop)) for s in obj.region)
        crop = np.array(target[region])
        idx, values = paste_object(crop, labels > 0, int(o["id"]), overwrite=overwrite)
        if len(idx[0]):
            crop[idx] = values
            target[region] = crop


def _replay_propagation(op, segmenter, image, axis, fixed, out) -> None:
    if "axis" in op:  # a widget run on an image with several leading axes
        axis = op["axis"]
        fixed = {int(a): int(v) for a, v in (op.get("fixed") or {}).items()}
        if len(out.shape) > 3:
            from .planes import AxisView

            out = AxisView(out, axis, fixed, len(out.shape) - 2)
    by_slice: dict[int, dict] = {}
    for o in op["objects"]:
        by_slice.setdefault(int(o["slice"]), {})[int(o["id"])] = prompt_from_record(o)
    propagate(None, segmenter, image, by_slice, axis or 0, op["direction"], op["start"],
              op["stop"], out=out, fixed=fixed, limits=_limits(op.get("limits")),
              score_threshold=op["score_threshold"], stop_after=op["stop_after"],
              **op["postprocess"])


def _replay_instances(op, model, image, frames, out) -> None:
    from .everything import SETTINGS, generate_everything
    from .instances import paint_in_sequence

    limits, skip = _limits(op.get("limits")), _skip_rule(op.get("skip"))
    slices = op.get("slices")
    per_slice = op.get("exemplars_by_slice")  # a widget run: each slice's own exemplars
    floor = op.get("min_score")  # a widget run: detected above it, painted at threshold
    if op["kind"] == "concept":
        found = {"threshold": op["threshold"]} if floor is None else {
            "threshold": floor, "min_score": floor}

        def run(plane, n):
            ex, ex_labels = op.get("exemplars"), op.get("exemplar_labels")
            if per_slice is not None:
                ex, ex_labels = per_slice[n]
            return model.detect(plane, op.get("text"), ex, exemplar_labels=ex_labels,
                                min_area=op["min_area"], limits=limits, skip=skip,
                                **found, **op["postprocess"])
    else:
        settings = dc_replace(SETTINGS, **op["settings"])

        def run(plane, n):
            return generate_everything(model, plane, settings=settings, limits=limits,
                                       skip=skip)

    pairs = ((run(image, 0), out),) if slices is None else (
        (run(_plane(image, frames, k), n), plane_of(out, _lead(k)))
        for n, k in enumerate(slices))
    paint = {} if floor is None or op["kind"] != "concept" else {"threshold": op["threshold"]}
    paint_in_sequence(pairs, start_id=op["start_id"], overwrite=bool(op.get("overwrite")),
                      **paint)


def _skip_rule(skip: dict | None):
    """The recorded empty-tile rule (``--skip-empty``, ``--skip-mask``), or None."""
    if not skip:
        return None
    from .distributed.empty import EmptyTiles

    mask = None
    if skip.get("skip_mask"):
        from .io import read_image

        mask = np.asarray(read_image(skip["skip_mask"]))
    return EmptyTiles(skip.get("skip_empty"), mask)


def _replay_edit(op, out) -> None:
    """A ``delete`` or ``merge`` of ids, on its slice or everywhere (plane by plane)."""
    k = op.get("slice")
    into = int(op.get("into", 0)) if op["kind"] == "merge" else 0
    leads = [_lead(k)] if k is not None or len(out.shape) == 2 else list(
        np.ndindex(*out.shape[:-2]))
    for lead in leads:
        target = plane_of(out, lead)
        plane = np.array(target[:, :])
        hit = np.isin(plane, op["ids"])
        if hit.any():
            plane[hit] = into
            target[:, :] = plane


def _replay_external(op, out, n: int) -> None:
    """A brush edit or imported labels written back: the stored values of its region, or
    (an import stored by reference) its ``source`` file, read again."""
    k = op.get("slice")
    target = plane_of(out, _lead(k))
    if "values" in op:
        region = op["region"]
        r0, c0, r1, c1 = region["bbox"]
        values = decode_values(op["values"], region["shape"])
        if values.ndim > 2:  # every slice of a stack
            out[..., r0:r1, c0:c1] = values
        else:
            target[r0:r1, c0:c1] = values
        return
    from pathlib import Path

    source = op.get("source")
    if not source or not Path(source).exists():
        raise ProvenanceError(f"operation {n + 1} ({op['kind']}) has no stored result and "
                              f"its source {source!r} is gone: it cannot be replayed")
    from .io import read_labels

    values = read_labels(source)
    if tuple(values.shape) != tuple(target.shape[:values.ndim]):
        raise ProvenanceError(f"operation {n + 1} ({op['kind']}): {source} holds labels of "
                              f"shape {values.shape}, not {tuple(target.shape)}")
    target[...] = values


__all__ = ["segment", "propagate", "propagation_op", "concept_op", "everything_op", "replay"]
