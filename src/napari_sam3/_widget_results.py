"""The last concept / everything result: write it, re-threshold it, clear it, its features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _layers
from ._widget_errors import _guarded, _UserError
from ._widget_jobs import _Task
from ._widget_layers import _unwrap

# Up to this many changed pixels a concept/everything write goes through napari's
# data_setitem (one undo step); a larger write is made window by window, without undo.
UNDO_PIXELS = 1 << 22


@dataclass
class _RunPlane:
    """One slice of a concept / everything result and the labels under it."""

    lead: tuple
    result: object  # ConceptResult or EverythingResult
    region: tuple[int, int, int, int] | None  # where its instances can be written
    base: np.ndarray | None  # the labels over ``region`` before the result was written
    written: bytes | None = None  # digest of what the last write left over ``region``


@dataclass
class _InstanceRun:
    """The last concept / everything result written into a labels layer.

    Every write starts again from the kept labels (``base``), so the threshold can be
    moved any number of times; ``start_id`` stays fixed.
    """

    kind: str  # "concept" or "everything"
    source: str
    labels: object
    planes: list[_RunPlane]
    start_id: int
    base_features: object  # pandas DataFrame: the layer's features before the first write
    n_lead: int
    spatial_shape: tuple
    threshold: float | None = None
    ids: tuple[int, int] | None = None  # (first, last) id written, None when none
    count: int = 0


class _ResultsMixin:
    """Write, re-threshold and clear the last concept / everything result."""

    @property
    def last_run(self) -> _InstanceRun | None:
        """The last concept / everything result written (None once cleared or edited)."""
        return self._run

    @property
    def threshold(self) -> float:
        return float(self.threshold_spin.value())

    def _start_run(self, task: _Task) -> None:
        """Keep the labels under the new result, then write it."""
        labels = task.labels
        if not self._layer_alive(labels):
            raise _UserError("the labels layer was removed: nothing written")
        data = _unwrap(labels).data
        if tuple(data.shape) != tuple(task.spatial_shape):
            raise _UserError(f"labels layer '{labels.name}' changed shape: nothing written")
        plane = tuple(int(v) for v in task.spatial_shape[-2:])
        planes = []
        for lead, res in task.results:
            items = res.candidates if task.kind == "concept" else res.instances
            region = _layers.union_region([x.bbox for x in items], plane)
            base = None
            if region is not None:
                base = np.array(data[tuple(lead) + _layers.region_slices(region)])
            planes.append(_RunPlane(tuple(lead), res, region, base))
        start_id = _layers.next_object_id(self._max_label(labels), self._prompt_ids_in_layers())
        run = _InstanceRun(
            kind=task.kind,
            source=task.source,
            labels=labels,
            planes=planes,
            start_id=start_id,
            base_features=_base_features(labels),
            n_lead=task.n_lead,
            spatial_shape=tuple(task.spatial_shape),
        )
        self._run = None
        if self._write_run(run, self.threshold if task.kind == "concept" else None):
            self._run = run

    def _run_currents(self, run: _InstanceRun) -> list | None:
        """The labels over each plane's region now, if they are still what the run's last
        write left there; else None (reported, and the run is dropped)."""
        if not self._layer_alive(run.labels):
            self._run = None
            raise _UserError("the labels layer of the last result was removed")
        data = _unwrap(run.labels).data
        if tuple(data.shape) != run.spatial_shape:
            self._run = None
            raise _UserError(f"labels layer '{run.labels.name}' changed shape")
        currents = []
        for p in run.planes:
            if p.region is None:
                currents.append(None)
            elif p.written is None:
                currents.append(p.base)
            else:
                cur = np.asarray(data[p.lead + _layers.region_slices(p.region)])
                if _layers.digest(cur) != p.written:
                    self._run = None
                    self._report(
                        "SAM3: the labels under the last result were edited since it was "
                        "written: it can no longer be re-thresholded or cleared (run it again)",
                        "warning",
                    )
                    return None
                currents.append(cur)
        return currents

    def _write_planes(self, run: _InstanceRun, currents: list, outs: list) -> bool:
        """Write what changed between ``currents`` and ``outs``: one ``data_setitem`` (one
        undo step) up to ``UNDO_PIXELS`` changed pixels, else region by region (no undo).
        Returns whether it is undoable."""
        labels = run.labels
        data = _unwrap(labels).data
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
                    data[p.lead + _layers.region_slices(p.region)] = out
            labels.refresh()
        for p, out in zip(run.planes, outs, strict=True):
            if out is not None:
                p.written = _layers.digest(out)
        return undoable

    def _write_run(self, run: _InstanceRun, threshold: float | None) -> bool:
        """(Re)write the run over its kept labels with ``threshold`` (concepts) and the
        current overwrite setting; update the features table. False when nothing could be
        written (reported)."""
        try:
            currents = self._run_currents(run)
        except _UserError as exc:
            self._report(f"SAM3: {exc}")
            return False
        if currents is None:
            return False
        dtype = np.dtype(_unwrap(run.labels).data.dtype)
        most = sum(
            len(p.result.candidates if run.kind == "concept" else p.result.instances)
            for p in run.planes
        )
        if dtype.kind in "iu" and run.start_id + most - 1 > np.iinfo(dtype).max:
            self._report(
                f"SAM3: labels layer '{run.labels.name}' is {dtype.name}: it cannot hold ids up "
                f"to {run.start_id + most - 1}; use an int32 labels layer"
            )
            self._run = None
            return False
        overwrite = self.overwrite_checkbox.isChecked()
        plane = run.spatial_shape[-2:]
        next_id = run.start_id
        outs, tables, floor = [], [], 0.0
        for p in run.planes:
            if p.region is None:
                outs.append(None)
                continue
            out = p.base.copy()
            view = _layers.OffsetView(out, p.region[:2], plane)
            if run.kind == "concept":
                floor = max(floor, p.result.min_score)
                t = max(float(threshold), p.result.min_score)
                p.result.relabel(t, out=view, overwrite=overwrite, start_id=next_id)
            else:
                p.result.labels(view, overwrite=overwrite, start_id=next_id)
            if p.result.painted.ids:
                next_id = int(p.result.painted.ids[-1]) + 1
            tables.append(_feature_rows(run, p))
            outs.append(out)
        undoable = self._write_planes(run, currents, outs)
        _set_features(run.labels, run.base_features, tables)
        ids = [int(i) for t in tables for i in t["index"]]
        run.threshold = threshold
        run.count = len(ids)
        run.ids = (min(ids), max(ids)) if ids else None
        if ids:
            self._max_written = max(self._max_written, max(ids))
            if (
                run.ids[0] <= self.object_id <= run.ids[1]
                and self.object_id not in self._prompt_ids_in_layers()
            ):
                self.object_id = run.ids[1] + 1
        what = (
            f"{run.source[0].upper()}{run.source[1:]}"
            if run.kind == "concept"
            else "Segment everything"
        )
        span = f" (ids {run.ids[0]}-{run.ids[1]})" if run.ids else ""
        where = f" on {len(run.planes)} slices" if len(run.planes) > 1 else ""
        above = ""
        if run.kind == "concept":
            above = f" above {max(float(threshold), floor):.3f}"
            if float(threshold) < floor:
                above += f" (all kept at detection; Find concept again to go below {floor:g})"
        note = "" if undoable else "; too large for undo: use Clear last result"
        self._set_status(
            f"{what}: {run.count} instance(s){above}{where} in '{run.labels.name}'{span}{note}"
        )
        return True

    # -- threshold --------------------------------------------------------------------------
    def apply_threshold(self, threshold: float | None = None) -> bool:
        """Re-filter the last concept result at ``threshold`` (default: the spin box's; a
        value given here is shown there) and rewrite it; no model call."""
        self._threshold_timer.stop()
        if threshold is not None:
            self._set_threshold_controls(float(threshold))
        run = self._run
        if run is None or run.kind != "concept":
            self._set_status(f"Threshold {self.threshold:.3f}: used by the next Find concept")
            return False
        return self._write_run(run, self.threshold)

    def _set_threshold_controls(self, value: float) -> None:
        for w in (self.threshold_spin, self.threshold_slider):
            w.blockSignals(True)
        try:
            self.threshold_spin.setValue(value)
            self.threshold_slider.setValue(round(self.threshold_spin.value() * 1000))
        finally:
            for w in (self.threshold_spin, self.threshold_slider):
                w.blockSignals(False)

    @_guarded
    def _on_threshold_slider(self, value: int) -> None:
        self.threshold_spin.setValue(value / 1000.0)  # -> _on_threshold_changed

    @_guarded
    def _on_threshold_changed(self, value: float) -> None:
        self.threshold_slider.blockSignals(True)
        try:
            self.threshold_slider.setValue(round(float(value) * 1000))
        finally:
            self.threshold_slider.blockSignals(False)
        if self._run is not None and self._run.kind == "concept":
            self._threshold_timer.start()
        else:
            self._set_status(f"Threshold {float(value):.3f}: used by the next Find concept")

    @_guarded
    def _on_threshold_timeout(self) -> None:
        self.apply_threshold()

    def clear_last_result(self) -> bool:
        """Restore the labels (and features) the last concept / everything result was
        written over, if they were not edited since."""
        run = self._run
        if run is None:
            self._set_status("No result to clear")
            return False
        if self.task is not None:
            self._report("SAM3: a job is running: wait for it or cancel it")
            return False
        try:
            currents = self._run_currents(run)
        except _UserError as exc:
            self._report(f"SAM3: {exc}")
            return False
        if currents is None:
            return False
        outs = [None if p.region is None else p.base for p in run.planes]
        self._write_planes(run, currents, outs)
        run.labels.features = run.base_features
        self._run = None
        self._set_status(f"Cleared the last result ({run.count} instance(s) removed)")
        return True

    @_guarded
    def _on_clear_result_clicked(self, *_) -> None:
        self.clear_last_result()


# -- features of concept / everything results ---------------------------------------------------
def _base_features(labels):
    """The layer's features as a DataFrame with an ``index`` column (label id per row)."""
    import pandas as pd

    base = pd.DataFrame(labels.features).copy()
    if len(base) and "index" not in base.columns:
        base.insert(0, "index", np.arange(len(base)))  # napari's default: row k is label k
    return base


def _feature_rows(run: _InstanceRun, plane: _RunPlane):
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
