"""Point and box prompts: their layers' features and events, polarity, object ids, slices."""

from __future__ import annotations

import numpy as np
from napari.layers import Points

from . import _layers
from ._widget_errors import _guarded, _UserError
from ._widget_layers import _Source, _unwrap

# napari data-event actions sent before a change is made (the "...ed" one follows it)
_UNFINISHED = {"adding", "removing", "changing"}


class _PromptsMixin:
    """Points and boxes layers, polarity, object ids and the prompts of an object."""

    @property
    def object_id(self) -> int:
        return int(self.object_id_spin.value())

    @object_id.setter
    def object_id(self, value: int) -> None:
        self.object_id_spin.setValue(int(value))

    @property
    def positive(self) -> bool:
        """Polarity of new points."""
        return self.positive_checkbox.isChecked()

    def _adopt_points(self, layer) -> None:
        """Make sure the layer has our features, colours and the polarity key."""
        n = len(layer.data)
        feats = layer.features
        missing = {}
        if "object_id" not in feats:
            missing["object_id"] = np.full(n, self.object_id, dtype=int)
        if "positive" not in feats:
            missing["positive"] = np.ones(n, dtype=bool)
        if missing:
            new = feats.copy()
            for k, v in missing.items():
                new[k] = v
            layer.features = new
        self._update_point_defaults(layer)
        layer.events.data.connect(self._on_prompt_data)
        layer.bind_key("t", self._on_t_key, overwrite=True)
        self._recolor(layer)

    def _adopt_shapes(self, layer) -> None:
        if "object_id" not in layer.features:
            new = layer.features.copy()
            new["object_id"] = np.full(len(layer.data), self.object_id, dtype=int)
            layer.features = new
        layer.feature_defaults = {"object_id": self.object_id}
        self._non_rect = _layers.count_non_rectangles(layer.shape_type)
        layer.events.data.connect(self._on_shapes_data)

    def _update_point_defaults(self, layer) -> None:
        layer.feature_defaults = {"object_id": self.object_id, "positive": self.positive}

    def _recolor(self, layer) -> None:
        n = len(layer.data)
        if n == 0:
            return
        pos = _layers.feature_column(layer.features, "positive", n, True)
        colors = _layers.polarity_colors(pos)
        if layer.face_color.shape != colors.shape or not np.allclose(layer.face_color, colors):
            layer.face_color = colors

    # -- prompt and dims events -------------------------------------------------------------
    @_guarded
    def _on_prompt_data(self, event) -> None:
        if str(getattr(event, "action", "")) in _UNFINISHED:
            return
        layer = self.points_layer
        if layer is not None:
            self._recolor(layer)
        self._schedule()

    @_guarded
    def _on_shapes_data(self, event) -> None:
        if str(getattr(event, "action", "")) in _UNFINISHED:
            return
        layer = self.shapes_layer
        if layer is not None:
            count = _layers.count_non_rectangles(layer.shape_type)
            if count > self._non_rect:
                self._report(
                    f"SAM3 uses rectangles as box prompts: {count} non-rectangle "
                    f"shape{'s' if count != 1 else ''} in '{layer.name}' ignored",
                    "info",
                )
            self._non_rect = count
        self._schedule()

    @_guarded
    def _on_step_changed(self, event=None) -> None:
        """Another slice: show the current object there if it has prompts on it."""
        self._update_axis_info()
        if self._bound["image"] is not None and self.object_id in self._prompt_ids_in_layers():
            self._schedule()

    @_guarded
    def _on_axis_changed(self, event=None) -> None:
        self._update_axis_info()

    @_guarded
    def _on_t_key(self, layer=None) -> None:
        """Key ``t`` on the layer (napari's key handler)."""
        self.toggle_polarity()

    def toggle_polarity(self) -> bool:
        """Flip the polarity of new points and of the selected points; returns the new one."""
        self.positive_checkbox.setChecked(not self.positive)  # -> _on_positive_toggled
        return self.positive

    @_guarded
    def _on_positive_toggled(self, checked: bool) -> None:
        layer = self.points_layer
        if layer is None:
            return
        self._update_point_defaults(layer)
        selected = sorted(i for i in layer.selected_data if i < len(layer.data))
        if selected:
            layer.features = _layers.flip_polarity(layer.features, len(layer.data), selected)
            self._recolor(layer)
            self._schedule()
        self._set_status(
            f"New points are {'positive' if checked else 'negative'}"
            + (f"; {len(selected)} selected point(s) flipped" if selected else "")
        )

    # -- object ids -------------------------------------------------------------------------
    @_guarded
    def _on_object_id_changed(self, value: int) -> None:
        for layer, kind in ((self.points_layer, "points"), (self.shapes_layer, "shapes")):
            if layer is None:
                continue
            if kind == "points":
                self._update_point_defaults(layer)
            else:
                layer.feature_defaults = {"object_id": int(value)}
        if self._mask_prompt is not None and self._mask_prompt[0] != value:
            self._mask_prompt = None
        self._supersede()
        self._clear_preview()
        if value in self._prompt_ids_in_layers():
            self._schedule()

    def _prompt_ids_in_layers(self) -> set[int]:
        pairs = []
        for layer in (self.points_layer, self.shapes_layer):
            if layer is not None:
                pairs.append((layer.features, len(layer.data)))
        return _layers.prompt_ids(*pairs)

    def new_object(self) -> int:
        """Switch to a fresh object id: one more than any label or prompt id."""
        labels = self.labels_layer
        max_label = self._max_label(labels) if labels is not None else 0
        new_id = _layers.next_object_id(max_label, self._prompt_ids_in_layers())
        self.object_id = new_id
        self._set_status(f"Object {new_id}: click points or draw a box")
        return new_id

    @_guarded
    def _on_new_object_clicked(self, *_) -> None:
        self.new_object()

    # -- prompts per slice ------------------------------------------------------------------
    def _prompt_slice_of(self, layer, src: _Source) -> list[tuple]:
        """The slice of each item (point or shape) of a prompt layer."""
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        if isinstance(_unwrap(layer), Points):
            coords = _layers.to_image_coords_nd(layer, src.layer, layer.data, point)
            return [tuple(int(v) for v in np.rint(c[: src.n_lead])) for c in coords]
        out = []
        for d in layer.data:
            c = _layers.to_image_coords_nd(layer, src.layer, d, point).mean(axis=0)
            out.append(tuple(int(v) for v in np.rint(c[: src.n_lead])))
        return out

    def _object_prompts(self, obj_id: int, src: _Source, only: tuple | None = None) -> dict:
        """``{slice: (ObjectPrompt or None, ignored shapes)}`` of one object (see
        ``_layers.prompts_by_slice``); with ``only``, that slice alone."""
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        kwargs = {}
        points, shapes = self.points_layer, self.shapes_layer
        if points is not None and len(points.data):
            kwargs["points"] = _layers.to_image_coords_nd(points, src.layer, points.data, point)
            kwargs["point_features"] = points.features
        if shapes is not None and len(shapes.data):
            kwargs["shapes"] = [
                _layers.to_image_coords_nd(shapes, src.layer, d, point) for d in shapes.data
            ]
            kwargs["shape_types"] = list(shapes.shape_type)
            kwargs["shape_features"] = shapes.features
        mask = None
        if self._mask_prompt is not None and self._mask_prompt[0] == obj_id:
            mask = self._mask_prompt[1:]
        return _layers.prompts_by_slice(
            obj_id, src.plane, n_lead=src.n_lead, mask=mask, only=only, **kwargs
        )

    def _remove_prompts(self, obj_id: int, lead: tuple = ()) -> None:
        """Delete the object's points and shapes on slice ``lead`` (all of a 2D image)."""
        try:
            src = self._source()
        except (_UserError, _layers.LayerError):
            src = None
        for layer, handler in (
            (self.points_layer, self._on_prompt_data),
            (self.shapes_layer, self._on_shapes_data),
        ):
            if layer is None or not len(layer.data):
                continue
            idx = _layers.object_indices(layer.features, len(layer.data), obj_id)
            if lead and src is not None and len(idx):
                slices = self._prompt_slice_of(layer, src)
                idx = np.array([i for i in idx if slices[i] == lead], dtype=np.intp)
            if len(idx):
                layer.events.data.disconnect(handler)
                try:
                    layer.selected_data = set()
                    layer.remove(idx.tolist())
                finally:
                    layer.events.data.connect(handler)
        shapes = self.shapes_layer
        if shapes is not None:
            self._non_rect = _layers.count_non_rectangles(shapes.shape_type)
