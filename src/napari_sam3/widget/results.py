"""The last concept / everything result: write it, re-threshold it, clear it, its features.

Functions of the session (which keeps the last run), the binder (which knows the
layers) and the run; the Concepts section calls them, the instance tasks start a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import planes
from . import layer_data, provenance_log
from .errors import UserError
from .image_source import same, unwrap
from .labels_target import REGION_UNDO_PIXELS

# Up to this many changed pixels a concept/everything write goes through napari's
# data_setitem (one undo step); a larger write is made window by window, without undo.
UNDO_PIXELS = 1 << 22


@dataclass
class RunPlane:
    """One slice of a concept / everything result and the labels under it."""

    lead: tuple
    result: object  # ConceptResult or EverythingResult
    region: tuple[int, int, int, int] | None  # where its instances can be written
    base: np.ndarray | None  # the labels over ``region`` before the result was written
    written: bytes | None = None  # digest of what the last write left over ``region``


@dataclass
class InstanceRun:
    """The last concept / everything result written into a labels layer.

    Every write starts again from the kept labels (``base``), so the threshold can be
    moved any number of times; ``start_id`` stays fixed.
    """

    kind: str  # "concept" or "everything"
    source: str
    labels: object
    planes: list[RunPlane]
    start_id: int
    base_features: object  # pandas DataFrame: the layer's features before the first write
    n_lead: int
    spatial_shape: tuple
    threshold: float | None = None
    ids: tuple[int, int] | None = None  # (first, last) id written, None when none
    count: int = 0
    record: dict | None = None  # its provenance operation, but for threshold and instances
    op: dict | None = None  # the operation in the labels' log, once written


def start_run(session, binder, task, threshold: float | None = None) -> None:
    """Keep the labels under a finished task's result, then write it at ``threshold``
    (concepts); it becomes the session's last run once written."""
    labels = task.labels
    if not binder.alive(labels):
        raise UserError("the labels layer was removed: nothing written")
    target = binder.target(labels)
    if target.shape != tuple(task.spatial_shape):
        raise UserError(f"labels layer '{labels.name}' changed shape: nothing written")
    plane = tuple(int(v) for v in task.spatial_shape[-2:])
    run_planes = []
    for lead, res in task.results:
        region = planes.union_region([x.bbox for x in res.items], plane)
        base = None
        if region is not None:
            base = np.array(target.read(tuple(lead) + planes.region_slices(region)))
        run_planes.append(RunPlane(tuple(lead), res, region, base))
    start_id = layer_data.next_object_id(binder.max_label(labels), binder.prompt_ids())
    run = InstanceRun(
        kind=task.kind,
        source=task.source,
        labels=labels,
        planes=run_planes,
        start_id=start_id,
        base_features=_base_features(labels),
        n_lead=task.n_lead,
        spatial_shape=tuple(task.spatial_shape),
        record=_run_record(task),
    )
    session.last_run = None
    if write_run(session, binder, run, threshold) and same(labels, binder.labels_layer):
        session.last_run = run  # (a run of an image no longer chosen is written, not kept)


def _run_record(task) -> dict | None:
    """The ``concept`` / ``everything`` operation of a finished task (threshold, start id
    and instances are set when it is written)."""
    from ..core.provenance import jsonable
    from ..core.replay import concept_op, everything_op

    slices = None if not task.n_lead else [provenance_log.slice_of(lead)
                                           for lead, _ in task.results]
    if task.kind != "concept":
        return everything_op(task.settings, limits=task.limits, slices=slices, start_id=0,
                             instances=[])
    concept = task.holder.get("concept")
    if concept is None:
        return None
    o = task.options
    ex = [jsonable([boxes, labels]) for _, _, boxes, labels in task.planes]
    op = concept_op(concept, task.text, ex[0][0], ex[0][1], threshold=o["threshold"],
                    min_area=0, limits=o["limits"], max_hole_area=o["max_hole_area"],
                    max_sprinkle_area=o["max_sprinkle_area"], slices=slices, start_id=0,
                    instances=[])
    if any(e != ex[0] for e in ex[1:]):
        op["exemplars_by_slice"] = ex
    op["min_score"] = min(float(o["min_score"]), float(o["threshold"]))
    return op


def _record_run(session, binder, run: InstanceRun, tables, threshold) -> None:
    """The run in the labels' provenance: its operation, replaced while it is the last
    one (a threshold change); else the values it left over its regions."""
    recorder = provenance_log.recorder(session, binder)
    if run.record is None:
        op = None
    else:
        instances = [{"id": int(i), "slice": provenance_log.slice_of(p.lead),
                      "score": float(sc), "area": int(a)}
                     for p, t in tables for i, sc, a in zip(t["index"], t["score"], t["area"],
                                                            strict=True)]
        op = {**run.record, "start_id": int(run.start_id), "instances": instances,
              "overwrite": bool(session.post.overwrite)}
        if run.kind == "concept":
            op["threshold"] = float(threshold)
    if op is not None and run.op is None:
        run.op = recorder.append(run.labels, op)
        return
    if op is not None and (new := recorder.replace(run.labels, run.op, op)) is not None:
        run.op = new
        return
    _record_regions(recorder, run, f"{run.kind} result rewritten")


def _record_regions(recorder, run: InstanceRun, note: str) -> None:
    boxes = {p.lead: list(p.region) for p in run.planes if p.region is not None}
    recorder.record_values(run.labels, boxes, note)


def _currents(session, binder, run: InstanceRun) -> list | None:
    """The labels over each plane's region now, if they are still what the run's last
    write left there; else None (reported, and the run is dropped)."""
    if not binder.alive(run.labels):
        session.last_run = None
        raise UserError("the labels layer of the last result was removed")
    target = binder.target(run.labels)
    if target.shape != run.spatial_shape:
        session.last_run = None
        raise UserError(f"labels layer '{run.labels.name}' changed shape")
    currents = []
    for p in run.planes:
        if p.region is None:
            currents.append(None)
        elif p.written is None:
            currents.append(p.base)
        else:
            cur = target.read(p.lead + planes.region_slices(p.region))
            if planes.digest(cur) != p.written:
                session.last_run = None
                session.report(
                    "SAM3: the labels under the last result were edited since it was "
                    "written: it can no longer be re-thresholded or cleared (run it again)",
                    "warning",
                )
                return None
            currents.append(cur)
    return currents


def _write_planes(run: InstanceRun, target, currents: list, outs: list) -> bool:
    """Write what changed between ``currents`` and ``outs``: one ``data_setitem`` (one
    undo step) up to ``UNDO_PIXELS`` changed pixels, else region by region (no undo);
    a pyramid's regions are one step of its history unless they keep more than
    ``REGION_UNDO_PIXELS``. Returns whether it is undoable."""
    if target.pyramid is not None:
        return _write_pyramid_planes(run, target, currents, outs)
    labels = run.labels
    data = unwrap(labels).data
    dtype = np.dtype(data.dtype)
    parts: list[list[np.ndarray]] = [[] for _ in range(run.n_lead + 2)]
    values = []
    for p, cur, out in zip(run.planes, currents, outs, strict=True):
        if out is None:
            continue
        rr, cc = np.nonzero(out != cur)
        if not rr.size:
            continue
        for a, v in enumerate(p.lead):
            parts[a].append(np.full(rr.size, v, dtype=np.intp))
        parts[-2].append(rr + p.region[0])
        parts[-1].append(cc + p.region[1])
        values.append(out[rr, cc])
    changed = sum(v.size for v in values)
    undoable = True
    if changed and changed <= UNDO_PIXELS:
        labels.data_setitem(
            tuple(np.concatenate(x) for x in parts),
            np.concatenate(values).astype(dtype, copy=False),
        )
    elif changed:
        undoable = False
        for p, out in zip(run.planes, outs, strict=True):
            if out is not None:
                data[p.lead + planes.region_slices(p.region)] = out
        labels.refresh()
    for p, out in zip(run.planes, outs, strict=True):
        if out is not None:
            p.written = planes.digest(out)
    return undoable


def _write_pyramid_planes(run: InstanceRun, target, currents: list, outs: list) -> bool:
    step = target.step(REGION_UNDO_PIXELS)
    for p, cur, out in zip(run.planes, currents, outs, strict=True):
        if out is None:
            continue
        if not np.array_equal(out, cur):
            key = p.lead + planes.region_slices(p.region)
            step.record(key, cur, out)
            target.data[key] = out
        p.written = planes.digest(out)
    target.refresh()
    return not step.too_large


def write_run(session, binder, run: InstanceRun, threshold: float | None) -> bool:
    """(Re)write the run over its kept labels with ``threshold`` (concepts) and the
    current overwrite setting; update the features table. False when nothing could be
    written (reported)."""
    try:
        currents = _currents(session, binder, run)
    except UserError as exc:
        session.report(f"SAM3: {exc}")
        return False
    if currents is None:
        return False
    dtype = np.dtype(unwrap(run.labels).data.dtype)
    most = sum(len(p.result.items) for p in run.planes)
    if dtype.kind in "iu" and run.start_id + most - 1 > np.iinfo(dtype).max:
        session.report(
            f"SAM3: labels layer '{run.labels.name}' is {dtype.name}: it cannot hold ids up "
            f"to {run.start_id + most - 1}; use an int32 labels layer"
        )
        session.last_run = None
        return False
    from ..core.instances import paint_in_sequence

    plane = run.spatial_shape[-2:]
    painted = [p for p in run.planes if p.region is not None]
    outs = {id(p): p.base.copy() for p in painted}
    floor = max((p.result.min_score for p in painted), default=0.0)
    paint_in_sequence(
        [(p.result, planes.OffsetView(outs[id(p)], p.region[:2], plane)) for p in painted],
        start_id=run.start_id,
        overwrite=session.post.overwrite,
        threshold=threshold,
    )
    tables = [_feature_rows(run, p) for p in painted]
    with provenance_log.recorder(session, binder).writing(run.labels):
        undoable = _write_planes(run, binder.target(run.labels), currents,
                                 [outs.get(id(p)) for p in run.planes])
    _set_features(run.labels, run.base_features, tables)
    _record_run(session, binder, run, list(zip(painted, tables, strict=True)), threshold)
    ids = [int(i) for t in tables for i in t["index"]]
    run.threshold = threshold
    run.count = len(ids)
    run.ids = (min(ids), max(ids)) if ids else None
    if ids:
        session.wrote(run.labels, max(ids))
        if (
            run.ids[0] <= session.object_id <= run.ids[1]
            and session.object_id not in binder.prompt_ids()
        ):
            session.object_id = run.ids[1] + 1
    session.status(_summary(run, threshold, floor, undoable))
    return True


def _summary(run: InstanceRun, threshold, floor: float, undoable: bool) -> str:
    what = (f"{run.source[0].upper()}{run.source[1:]}" if run.kind == "concept"
            else "Segment everything")
    span = f" (ids {run.ids[0]}-{run.ids[1]})" if run.ids else ""
    where = f" on {len(run.planes)} slices" if len(run.planes) > 1 else ""
    above = ""
    if run.kind == "concept":
        above = f" above {max(float(threshold), floor):.3f}"
        if float(threshold) < floor:
            above += f" (all kept at detection; Find concept again to go below {floor:g})"
    note = "" if undoable else "; too large for undo: use Clear last result"
    return f"{what}: {run.count} instance(s){above}{where} in '{run.labels.name}'{span}{note}"


def clear_run(session, binder) -> bool:
    """Restore the labels (and features) the last run was written over, if they were not
    edited since."""
    run = session.last_run
    if run is None:
        session.status("No result to clear")
        return False
    try:
        currents = _currents(session, binder, run)
    except UserError as exc:
        session.report(f"SAM3: {exc}")
        return False
    if currents is None:
        return False
    outs = [None if p.region is None else p.base for p in run.planes]
    recorder = provenance_log.recorder(session, binder)
    with recorder.writing(run.labels):
        _write_planes(run, binder.target(run.labels), currents, outs)
    if run.op is None or not recorder.drop_last(run.labels, run.op):
        _record_regions(recorder, run, f"{run.kind} result cleared")
    run.labels.features = run.base_features
    session.last_run = None
    session.status(f"Cleared the last result ({run.count} instance(s) removed)")
    return True

# -- features of concept / everything results ---------------------------------------------------
def _base_features(labels):
    """The layer's features as a DataFrame with an ``index`` column (label id per row)."""
    import pandas as pd

    base = pd.DataFrame(labels.features).copy()
    if len(base) and "index" not in base.columns:
        base.insert(0, "index", np.arange(len(base)))  # napari's default: row k is label k
    return base


def _feature_rows(run: InstanceRun, plane: RunPlane):
    """The features of one plane's written instances (index, score, area, ..., source,
    slice)."""
    import pandas as pd

    table = pd.DataFrame(plane.result.features)
    table["source"] = run.source
    if run.n_lead == 1:
        table["slice"] = int(plane.lead[0])
    else:
        for a, v in enumerate(plane.lead):
            table[f"axis_{a}"] = int(v)
    return table


def _set_features(labels, base, tables) -> None:
    """The labels layer's features: the rows it had (but for reused ids), then ``tables``."""
    import pandas as pd

    new = [t for t in tables if len(t)]
    frames = []
    new_ids = set()
    for t in new:
        new_ids.update(int(i) for i in t["index"])
    if len(base):
        frames.append(base[~base["index"].isin(new_ids)] if new_ids else base)
    frames += new
    labels.features = pd.concat(frames, ignore_index=True) if frames else base
