"""Where clicks are instant: an outline layer of the tiles already encoded.

One hideable Shapes layer per image ("SAM3 encoded tiles"), tagged like the other
managed layers, redrawn when a click, a precompute or a propagation ends, when the
slice or the model changes; one the user deletes is not made again for that image.
Only tiled images get one (an untiled image is encoded
whole on the first click). Reading it costs no pixels: the segmenter remembers which
tiles it encoded (``Sam3Segmenter.encoded_tiles``).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QObject

from . import layer_data
from .binder import TAG, image_key, tag_of
from .errors import UserError, guarded
from .image_source import unwrap

ENCODED_NAME = "SAM3 encoded tiles"


class EncodedOverlay(QObject):
    """Keeps the current image's "encoded tiles" outline layer up to date."""

    def __init__(self, session, runner, binder, parent=None):
        super().__init__(parent)
        self.session, self.runner, self.binder = session, runner, binder
        self._shown: tuple | None = None
        self._dismissed: set = set()  # images whose outline layer the user deleted
        runner.changed.connect(self._on_runner_changed)
        binder.slice_changed.connect(self.update)
        binder.role_changed.connect(self._on_role_changed)
        session.model_changed.connect(self.update)
        layers = binder.viewer.layers
        layers.events.removed.connect(self._on_removed)
        session.on_close(lambda: layers.events.removed.disconnect(self._on_removed))

    def _on_removed(self, event) -> None:
        layer = getattr(event, "value", None)
        tag = tag_of(layer) if layer is not None else {}
        if tag.get("role") == "encoded":
            self._dismissed.add(tag.get("image"))

    def layer(self):
        image = self.binder.image_layer
        if image is None:
            return None
        key = image_key(image)
        return next((ly for ly in self.binder.viewer.layers
                     if tag_of(ly) == {"role": "encoded", "image": key}), None)

    @guarded
    def _on_runner_changed(self) -> None:
        if self.runner.current_worker is None and self.runner.task is None:
            self.update()

    @guarded
    def _on_role_changed(self, role: str) -> None:
        if role == "image":
            self._shown = None
            self.update()

    @guarded
    def update(self, *_) -> None:
        seg, binder = self.session.segmenter, self.binder
        if seg is None or binder.image_layer is None:
            return
        try:
            src = binder.source()
            lead = binder.current_slice(src)
        except (UserError, layer_data.LayerError):
            return
        plane = src.plane_at(lead)
        if seg.tiles(plane).single:
            return
        boxes = seg.encoded_tiles(plane, src.limits)
        state = (lead, tuple(boxes))
        layer = self.layer()
        if state == self._shown and layer is not None:
            return
        self._shown = state
        if layer is None and (not boxes or image_key(src.layer) in self._dismissed):
            return
        rects = [np.array([[*lead, r0, c0], [*lead, r1, c1]], dtype=np.float64)
                 for r0, c0, r1, c1 in boxes]
        if layer is None:
            self._add(src, rects)
        else:
            layer.data = rects
            layer.shape_type = ["rectangle"] * len(rects)

    def _add(self, src, rects) -> None:
        viewer, image = self.binder.viewer, src.layer
        active = viewer.layers.selection.active  # adding a layer selects it: keep the user's
        viewer.add_shapes(
            rects, shape_type="rectangle", ndim=src.ndim, name=ENCODED_NAME,
            edge_color="cyan", face_color="transparent", opacity=0.35,
            edge_width=max(1.0, max(src.plane) / 500),
            metadata={TAG: {"role": "encoded", "image": image_key(image)}},
            scale=unwrap(image).scale, translate=unwrap(image).translate,
        )
        if active is not None:
            viewer.layers.selection.active = active
