"""The layers the widget uses: combo choices, the layers it creates, the image's geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.layers import Image, Labels, Points, Shapes

from . import _layers
from ._scratch_labels import LARGE_PIXELS, new_labels_data
from ._widget_errors import _guarded, _UserError

POINTS_NAME = "SAM3 points"
BOXES_NAME = "SAM3 boxes"
PREVIEW_NAME = "SAM3 preview"
LABELS_NAME = "SAM3 labels"
EXEMPLARS_NAME = "SAM3 exemplars"
# Above LARGE_PIXELS pixels (voxels for stacks) the labels layer the widget creates is a
# Zarr array in a scratch folder instead of a NumPy array (see _scratch_labels).


def _unwrap(obj):
    """The napari object behind a PublicOnlyProxy (plugins get proxies)."""
    return getattr(obj, "__wrapped__", obj)


def _same(a, b) -> bool:
    """Identity of layers, seen through napari's PublicOnlyProxy."""
    if a is None or b is None:
        return a is b
    return _unwrap(a) is _unwrap(b)


@dataclass
class _Source:
    """The chosen image layer as the core sees it."""

    layer: object  # the layer (as napari handed it to us)
    data: object  # full-resolution array-like (level 0 of a multiscale), never loaded whole
    rgb: bool
    n_lead: int  # leading z/t axes before (Y, X)
    plane: tuple[int, int]  # (H, W)
    limits: tuple[float, float] | None  # one normalisation for every tile and slice

    @property
    def ndim(self) -> int:
        return self.n_lead + 2

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape[: self.ndim])

    @property
    def large(self) -> bool:
        return self.plane[0] * self.plane[1] > LARGE_PIXELS

    def plane_at(self, lead: tuple):
        return _layers.plane_of(self.data, lead)


class _LayersMixin:
    """Layer choices, the layers the widget creates, and the chosen image's geometry."""

    def save_labels(self, path: str | None = None) -> list[str]:
        """Write the labels layer with the plugin's writer (``.tif`` or ``.zarr``); without
        ``path``, ask for one. Returns the written paths ([] if nothing was written)."""
        from ._writers import save_labels_layer

        labels = self.labels_layer
        if labels is None:
            self._report("SAM3: no labels layer to save")
            return []
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(
                self, "Save labels", f"{labels.name}.tif",
                "Labels TIFF (*.tif *.tiff);;Labels OME-Zarr (*.zarr)",
            )
            if not path:
                return []
        try:
            written = save_labels_layer(_unwrap(labels), path)
        except OSError as exc:
            self._report(str(exc) if str(exc).startswith("SAM3") else f"SAM3: {exc}")
            return []
        self._set_status(f"Saved '{labels.name}' to {written[0]}")
        return written

    @_guarded
    def _on_save_clicked(self, *_) -> None:
        self.save_labels()

    def _layer_alive(self, layer) -> bool:
        return layer is not None and any(_same(ly, layer) for ly in self.viewer.layers)

    @property
    def image_layer(self):
        return self._combo_layer(self.image_combo)

    @property
    def points_layer(self):
        return self._combo_layer(self.points_combo)

    @property
    def shapes_layer(self):
        return self._combo_layer(self.shapes_combo)

    @property
    def labels_layer(self):
        return self._combo_layer(self.labels_combo)

    @property
    def exemplars_layer(self):
        return self._combo_layer(self.exemplars_combo)

    @property
    def preview_layer(self):
        return self._preview_layer if self._layer_alive(self._preview_layer) else None

    def _combo_layer(self, combo):
        layer = combo.currentData()
        return layer if self._layer_alive(layer) else None

    # -- layer lists ------------------------------------------------------------------------
    @_guarded
    def _on_layer_inserted(self, event) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self._on_layers_changed)
        self._refresh_combos()

    @_guarded
    def _on_layers_changed(self, event=None) -> None:
        self._refresh_combos()

    def _fill_combo(self, combo, kind, preferred: str, exclude=()) -> None:
        keep = combo.currentData()
        choices = [
            ly
            for ly in self.viewer.layers
            if isinstance(ly, kind) and not any(_same(ly, e) for e in exclude)
        ]
        combo.blockSignals(True)
        try:
            combo.clear()
            for ly in choices:
                combo.addItem(ly.name, ly)
            index = next((i for i, ly in enumerate(choices) if _same(ly, keep)), -1)
            if index < 0:
                index = next((i for i, ly in enumerate(choices) if ly.name == preferred), -1)
            if index < 0 and choices:
                index = 0
            combo.setCurrentIndex(index)
        finally:
            combo.blockSignals(False)

    def _refresh_combos(self) -> None:
        self._fill_combo(self.image_combo, Image, "")
        self._fill_combo(self.points_combo, Points, POINTS_NAME)
        self._fill_combo(self.shapes_combo, Shapes, BOXES_NAME)
        preview = self.preview_layer
        self._fill_combo(
            self.labels_combo,
            Labels,
            LABELS_NAME,
            exclude=(preview,) if preview is not None else (),
        )
        self._fill_exemplars_combo()
        for role in ("image", "points", "shapes", "exemplars"):
            self._sync_role(role)

    def _fill_exemplars_combo(self) -> None:
        """A "(none)" item, then every Shapes layer; keeps the choice, else "SAM3 exemplars"."""
        combo = self.exemplars_combo
        keep = combo.currentData()
        choices = [ly for ly in self.viewer.layers if isinstance(ly, Shapes)]
        combo.blockSignals(True)
        try:
            combo.clear()
            combo.addItem("(none)", None)
            for ly in choices:
                combo.addItem(ly.name, ly)
            index = next((i for i, ly in enumerate(choices) if _same(ly, keep)), -1)
            if index < 0 and not self._exemplars_off:
                index = next((i for i, ly in enumerate(choices) if ly.name == EXEMPLARS_NAME), -1)
            combo.setCurrentIndex(index + 1)
        finally:
            combo.blockSignals(False)

    @_guarded
    def _on_combo_changed(self, role: str, *_) -> None:
        if role == "exemplars":
            self._exemplars_off = self.exemplars_combo.currentIndex() == 0
        if role in self._bound:
            self._sync_role(role)

    def _sync_role(self, role: str) -> None:
        layer = {
            "image": self.image_layer,
            "points": self.points_layer,
            "shapes": self.shapes_layer,
            "exemplars": self.exemplars_layer,
        }[role]
        if _same(layer, self._bound[role]):
            return
        old = self._bound[role]
        self._bound[role] = layer
        if role == "image":
            self._supersede()
            self._clear_preview()
            self._mask_prompt = None
            self._run = None  # the threshold no longer moves a result of another image
            self._update_axis_info()
            if layer is not None:
                self._ensure_timer.start()
        elif role == "points":
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_prompt_data)
                old.bind_key("t", None, overwrite=True)
            if layer is not None:
                self._adopt_points(layer)
        elif role == "exemplars":
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_exemplars_data)
                old.bind_key("t", None, overwrite=True)
            if layer is not None:
                self._adopt_exemplars(layer)
        else:
            if self._layer_alive(old):
                old.events.data.disconnect(self._on_shapes_data)
            if layer is not None:
                self._adopt_shapes(layer)

    def _select(self, combo, layer) -> None:
        for i in range(combo.count()):
            if _same(combo.itemData(i), layer):
                combo.setCurrentIndex(i)
                return

    @_guarded
    def _ensure_layers(self) -> None:
        """Select (or create) "SAM3 points", "SAM3 boxes", "SAM3 labels" and the preview,
        with the image's dimensions (a stack gets nD prompt and labels layers)."""
        image = self.image_layer
        if image is None:
            return
        try:
            src = self._source(image)
        except _layers.LayerError as exc:
            self._report(f"SAM3: {exc}", "warning")
            return
        common = {"scale": image.scale, "translate": image.translate}
        shape, plane = src.spatial_shape, src.plane

        def find(name, kind, ok):
            return next(
                (
                    ly
                    for ly in self.viewer.layers
                    if ly.name == name and isinstance(ly, kind) and ok(ly)
                ),
                None,
            )

        labels = find(LABELS_NAME, Labels, lambda ly: tuple(ly.data.shape) == shape)
        if labels is None:
            data, folder = new_labels_data(shape, src.n_lead, LARGE_PIXELS)
            labels = self.viewer.add_labels(data, name=LABELS_NAME, opacity=0.6, **common)
            if folder is not None:
                self._scratch.add(labels, folder)
                self._report(
                    f"SAM3: the image is large: '{LABELS_NAME}' lives in {folder} until you "
                    "save it (Save labels); it is deleted when the layer is removed",
                    "info",
                )
        preview = self.preview_layer
        if preview is None or preview.ndim != src.ndim:
            preview = find(PREVIEW_NAME, Labels, lambda ly: ly.ndim == src.ndim)
            if preview is None:
                full = not src.n_lead and not src.large
                preview = self.viewer.add_labels(
                    np.zeros(plane if full else (1,) * src.ndim, np.int32),
                    name=PREVIEW_NAME,
                    opacity=0.5,
                    **common,
                )
            self._preview_layer = preview
        boxes = find(BOXES_NAME, Shapes, lambda ly: ly.ndim == src.ndim)
        if boxes is None:
            boxes = self.viewer.add_shapes(
                ndim=src.ndim,
                name=BOXES_NAME,
                edge_color="yellow",
                face_color="transparent",
                edge_width=max(1.0, max(plane) / 300),
                features={"object_id": np.zeros(0, int)},
                feature_defaults={"object_id": self.object_id},
                **common,
            )
        points = find(POINTS_NAME, Points, lambda ly: ly.ndim == src.ndim)
        if points is None:
            points = self.viewer.add_points(
                ndim=src.ndim,
                name=POINTS_NAME,
                size=float(np.clip(max(plane) / 60, 4, 30)),
                border_color="white",
                border_width=0.1,
                features={"object_id": np.zeros(0, int), "positive": np.zeros(0, bool)},
                feature_defaults={"object_id": self.object_id, "positive": self.positive},
                **common,
            )
        self._refresh_combos()  # drops the preview from the labels choices
        self._select(self.labels_combo, labels)
        self._select(self.shapes_combo, boxes)
        self._select(self.points_combo, points)
        self._sync_role("points")
        self._sync_role("shapes")
        self._update_axis_info()
        self.viewer.layers.selection.active = points
        points.mode = "add"

    def _max_label(self, labels) -> int:
        """Largest id in a labels layer; a huge lazy one is not scanned (the widget's own
        writes count then)."""
        data = _unwrap(labels).data
        if not isinstance(data, np.ndarray) and int(np.prod(data.shape)) > LARGE_PIXELS:
            return self._max_written
        arr = np.asarray(data)
        return max(int(arr.max()) if arr.size else 0, 0)

    # -- image and slices -------------------------------------------------------------------
    def _source(self, layer=None) -> _Source:
        """The image layer (default: the chosen one) as the core sees it. Raises
        _UserError without an image and LayerError for one that cannot be used."""
        layer = self.image_layer if layer is None else layer
        if layer is None:
            raise _UserError("no image: add an image layer and choose it in the widget")
        raw = _unwrap(layer)
        data = raw.data[0] if raw.multiscale else raw.data
        n_lead, plane = _layers.image_geometry(data.shape, raw.rgb, raw.name)
        limits = None
        if not (raw.rgb and np.dtype(data.dtype) == np.uint8):
            limits = tuple(float(v) for v in raw.contrast_limits)
        return _Source(layer, data, bool(raw.rgb), n_lead, plane, limits)

    def current_slice(self, src: _Source | None = None) -> tuple[int, ...]:
        """Indices of the image's leading (z/t) axes at the viewer's current position;
        () for a 2D image."""
        src = self._source() if src is None else src
        if not src.n_lead:
            return ()
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        pos = np.asarray(src.layer.world_to_data(point), dtype=np.float64)
        shape = src.data.shape
        return tuple(int(np.clip(np.rint(pos[a]), 0, int(shape[a]) - 1)) for a in range(src.n_lead))

    def propagation_axis(self, src: _Source | None = None) -> tuple[int, dict[int, int]]:
        """(axis, fixed): the leading axis the user steps through (``dims.last_used``, else
        the first one), the other leading axes fixed at their current index."""
        src = self._source() if src is None else src
        if not src.n_lead:
            raise _UserError(
                f"'{src.layer.name}' is a 2D image: propagation needs a z-stack or time series"
            )
        dims = self.viewer.dims
        offset = int(dims.ndim) - src.ndim
        axis = int(dims.last_used) - offset
        if not 0 <= axis < src.n_lead:
            hidden = set(dims.not_displayed)
            axis = next((a for a in range(src.n_lead) if a + offset in hidden), 0)
        lead = self.current_slice(src)
        return axis, {a: lead[a] for a in range(src.n_lead) if a != axis}

    def field_of_view(self, src: _Source | None = None) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1) of the current plane visible on the canvas (data pixels
        of level 0, end exclusive), from the camera and the canvas size."""
        src = self._source() if src is None else src
        camera = self.viewer.scene.camera
        height, width = (float(v) for v in self.viewer.canvas.size)
        center = np.asarray(camera.center, dtype=np.float64)[-2:]
        half = np.array([height, width]) / (2.0 * float(camera.zoom))
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)
        rows, cols = list(self.viewer.dims.displayed)[-2:]
        corners = []
        for dr in (-1, 1):
            for dc in (-1, 1):
                p = point.copy()
                p[rows], p[cols] = center + half * (dr, dc)
                corners.append(np.asarray(src.layer.world_to_data(p), dtype=np.float64)[-2:])
        region = _layers.region_of(corners, src.plane)
        if region is None:
            raise _UserError("the image is not in view: nothing to precompute")
        return region
