"""Brush, eraser and fill on labels napari cannot edit (multiscale): an edit window.

*Edit region* opens the labels of the part of the current slice on screen (at full
resolution, at most ``MAX_SIDE`` pixels a side around the view's centre) as an editable
single-resolution Labels layer placed over it (``translate``), in paint mode; napari's
tools and undo work there. *Apply edits* writes the pixels changed in the window back
as one undo step of the labels layer (pixels written there meanwhile and not edited in
the window are kept) and removes the window; removing the window discards its edits.
"""

from __future__ import annotations

import numpy as np

from ..core import planes
from .errors import UserError
from .image_source import unwrap

EDIT_NAME = "SAM3 edit window"
MAX_SIDE = 4096  # the window's largest side (64 MiB of int32)
TAG = "napari_sam3"


def _around_centre(region: tuple[int, int, int, int], side: int) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = region
    out = []
    for lo, hi in ((r0, r1), (c0, c1)):
        if hi - lo > side:
            lo = (lo + hi) // 2 - side // 2
            hi = lo + side
        out.append((lo, hi))
    return out[0][0], out[1][0], out[0][1], out[1][1]


class EditWindow:
    """The open edit window (at most one) of the chosen labels layer."""

    def __init__(self, session, binder):
        self.session, self.binder = session, binder
        self.layer = None
        self._labels = self._key = self._base = None

    @property
    def is_open(self) -> bool:
        return self.layer is not None and self.binder.alive(self.layer)

    def open(self) -> bool:
        """Open the window over the part of the current slice on screen."""
        session, binder = self.session, self.binder
        try:
            if self.is_open:
                raise UserError("an edit window is open: apply its edits or remove it first")
            src = binder.source()
            labels = binder.labels_for(src)
            target = binder.target(labels)
            lead = binder.current_slice(src)
            fov = binder.field_of_view(src)
        except UserError as exc:
            session.report(f"SAM3: {exc}")
            return False
        region = _around_centre(fov, MAX_SIDE)
        key = lead + planes.region_slices(region)
        base = target.read(key)
        raw = unwrap(labels)
        scale = np.asarray(raw.scale, dtype=np.float64)
        origin = np.array(lead + region[:2], dtype=np.float64)
        self.layer = binder.viewer.add_labels(
            base.reshape((1,) * len(lead) + base.shape).copy(), name=EDIT_NAME, opacity=0.8,
            scale=scale, translate=np.asarray(raw.translate, np.float64) + scale * origin,
            metadata={TAG: {"role": "edit", "image": ""}})
        self.layer.selected_label = max(int(raw.selected_label), 1)
        binder.viewer.layers.selection.active = self.layer
        self.layer.mode = "paint"
        self._labels, self._key, self._base = labels, key, base
        r0, c0, r1, c1 = region
        cut = " (the view's centre: zoom in for another part)" if region != fov else ""
        session.status(f"Editing rows {r0}-{r1}, cols {c0}-{c1} of '{labels.name}'{cut}: "
                       "paint, erase or fill, then Apply edits")
        return True

    def apply(self) -> bool:
        """Write the window's changed pixels into the labels layer (one undo step)."""
        session, binder = self.session, self.binder
        if not self.is_open:
            self._forget()
            session.report("SAM3: no edit window is open (Edit region opens one)")
            return False
        if not binder.alive(self._labels):
            session.report("SAM3: the labels layer of the edit window was removed")
            self.close()
            return False
        edited = np.asarray(unwrap(self.layer).data).reshape(self._base.shape)
        changed = edited != self._base
        n = int(np.count_nonzero(changed))
        if n:
            where = np.nonzero(changed)
            lead = self._key[: len(self._key) - 2]
            rows, cols = self._key[-2], self._key[-1]
            full = tuple(np.full(n, v, dtype=np.intp) for v in lead) + (
                where[0] + rows.start, where[1] + cols.start)
            from .provenance_log import recorder

            target = binder.target(self._labels)
            log = recorder(session, binder)
            with log.writing(self._labels):
                target.set_pixels(full, edited[changed])
            r0, c0 = int(where[0].min()), int(where[1].min())
            box = [rows.start + r0, cols.start + c0, rows.start + int(where[0].max()) + 1,
                   cols.start + int(where[1].max()) + 1]
            log.record_values(self._labels, {tuple(lead): box}, "edit window")
            session.wrote(self._labels, int(edited.max()))
        name = self._labels.name
        self.close()
        session.status(f"Applied the edit window to '{name}': {n} px changed (Ctrl+Z undoes)"
                       if n else "The edit window had no changes")
        return True

    def close(self) -> None:
        """Remove the window (its edits are dropped)."""
        layer = self.layer
        self._forget()
        if layer is not None and self.binder.alive(layer):
            self.binder.viewer.layers.remove(layer)

    def _forget(self) -> None:
        self.layer = None
        self._labels = self._key = self._base = None
