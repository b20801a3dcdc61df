"""The exemplars layer of Find concept: polarity, colours, events, exemplar boxes per slice."""

from __future__ import annotations

import numpy as np
from napari.layers import Shapes

from . import _layers
from ._widget_errors import _guarded, _UserError
from ._widget_layers import EXEMPLARS_NAME, _Source
from ._widget_prompts import _UNFINISHED


def _set_feature_default(layer, name: str, value) -> None:
    """Set one feature default of a layer, keeping the other columns' defaults."""
    current = layer.feature_defaults
    defaults = {k: current[k].iloc[0] for k in current.columns} if len(current) else {}
    defaults[name] = value
    layer.feature_defaults = defaults


class _ExemplarsMixin:
    """Draw positive / negative exemplar rectangles and read them per slice."""

    @property
    def exemplar_positive(self) -> bool:
        """Polarity of new exemplar rectangles."""
        return self.exemplar_positive_checkbox.isChecked()

    def draw_exemplars(self):
        """Make the exemplars layer (created as "SAM3 exemplars" if none is chosen) active in
        rectangle mode; returns it."""
        src = self._source()
        layer = self.exemplars_layer
        if layer is None:
            layer = next(
                (
                    ly
                    for ly in self.viewer.layers
                    if ly.name == EXEMPLARS_NAME and isinstance(ly, Shapes) and ly.ndim == src.ndim
                ),
                None,
            )
            if layer is None:
                image = src.layer
                color = _layers.POSITIVE_COLOR if self.exemplar_positive else _layers.NEGATIVE_COLOR
                layer = self.viewer.add_shapes(
                    ndim=src.ndim,
                    name=EXEMPLARS_NAME,
                    edge_color=[color],
                    face_color="transparent",
                    edge_width=max(1.0, max(src.plane) / 300),
                    features={"positive": np.zeros(0, bool)},
                    feature_defaults={"positive": self.exemplar_positive},
                    scale=image.scale,
                    translate=image.translate,
                )
            self._exemplars_off = False
            self._refresh_combos()
            self._select(self.exemplars_combo, layer)
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self._set_status(
            f"Draw rectangles around example objects in '{layer.name}' "
            f"({'positive' if self.exemplar_positive else 'negative'}; key t toggles)"
        )
        return layer

    @_guarded
    def _on_draw_exemplars_clicked(self, *_) -> None:
        try:
            self.draw_exemplars()
        except (_UserError, _layers.LayerError) as exc:
            self._report(f"SAM3: {exc}")

    def _adopt_exemplars(self, layer) -> None:
        if "positive" not in layer.features:
            new = layer.features.copy()
            new["positive"] = np.ones(len(layer.data), dtype=bool)
            layer.features = new
        _set_feature_default(layer, "positive", self.exemplar_positive)
        self._non_rect_exemplars = _layers.count_non_rectangles(layer.shape_type)
        layer.events.data.connect(self._on_exemplars_data)
        layer.bind_key("t", self._on_exemplar_t_key, overwrite=True)
        self._recolor_exemplars(layer)

    def _recolor_exemplars(self, layer) -> None:
        n = len(layer.data)
        if n == 0:
            return
        pos = _layers.feature_column(layer.features, "positive", n, True)
        colors = _layers.polarity_colors(pos)
        current = np.asarray(layer.edge_color)
        if current.shape != colors.shape or not np.allclose(current, colors):
            layer.edge_color = colors

    @_guarded
    def _on_exemplars_data(self, event) -> None:
        if str(getattr(event, "action", "")) in _UNFINISHED:
            return
        layer = self.exemplars_layer
        if layer is None:
            return
        self._recolor_exemplars(layer)
        count = _layers.count_non_rectangles(layer.shape_type)
        if count > self._non_rect_exemplars:
            self._report(
                f"SAM3 uses rectangles as exemplars: {count} non-rectangle "
                f"shape{'s' if count != 1 else ''} in '{layer.name}' ignored",
                "info",
            )
        self._non_rect_exemplars = count

    @_guarded
    def _on_exemplar_t_key(self, layer=None) -> None:
        """Key ``t`` on the layer (napari's key handler)."""
        self.toggle_exemplar_polarity()

    def toggle_exemplar_polarity(self) -> bool:
        """Flip the polarity of new exemplars and of the selected ones; returns the new one."""
        self.exemplar_positive_checkbox.setChecked(not self.exemplar_positive)
        return self.exemplar_positive

    @_guarded
    def _on_exemplar_positive_toggled(self, checked: bool) -> None:
        layer = self.exemplars_layer
        if layer is None:
            return
        _set_feature_default(layer, "positive", bool(checked))
        selected = sorted(i for i in layer.selected_data if i < len(layer.data))
        if selected:
            layer.features = _layers.flip_polarity(layer.features, len(layer.data), selected)
            self._recolor_exemplars(layer)
        self._set_status(
            f"New exemplars are {'positive' if checked else 'negative'}"
            + (f"; {len(selected)} selected exemplar(s) flipped" if selected else "")
        )

    def _exemplar_prompts(self, src: _Source) -> tuple[dict, int]:
        """``({slice: (boxes, labels)}, ignored shapes)`` of the exemplars layer."""
        layer = self.exemplars_layer
        if layer is None or not len(layer.data):
            return {}, 0
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        shapes = [_layers.to_image_coords_nd(layer, src.layer, d, point) for d in layer.data]
        return _layers.exemplar_boxes_by_slice(
            shapes, list(layer.shape_type), layer.features, src.plane, src.n_lead
        )
