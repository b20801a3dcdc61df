"""Which napari layer plays which role, and the layers the widget makes for each image.

Roles: the image, the points and boxes (prompts), the labels to write into, the
exemplars of Find concept; plus the preview of the current object. Each image gets
its own managed set ("SAM3 points", "SAM3 boxes", "SAM3 preview", "SAM3 labels"),
tagged in the layers' metadata with the image they belong to, so choosing another
image switches to that image's set (made on first use) instead of adding copies.

The binder listens to the viewer (layers added, removed, renamed; the slice shown)
and to the prompt layers' data, and says what happened through signals; sections
show its choices and change them through :meth:`LayerBinder.choose`.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from ..core.pyramid import Pyramid
from . import image_source, layer_data, prompt_layers, scratch_labels
from .errors import UserError, guarded
from .image_source import ImageSource, same, unwrap
from .labels_target import LabelTargets
from .largest_ids import LargestIds
from .scratch_labels import ScratchFolders, new_labels_data

POINTS_NAME = "SAM3 points"
BOXES_NAME = "SAM3 boxes"
PREVIEW_NAME = "SAM3 preview"
LABELS_NAME = "SAM3 labels"
EXEMPLARS_NAME = "SAM3 exemplars"
ROLES = ("image", "points", "shapes", "labels", "exemplars")
TAG = "napari_sam3"  # metadata key of the layers we make: {"role": ..., "image": ...}
_PREFERRED = {"points": POINTS_NAME, "shapes": BOXES_NAME, "labels": LABELS_NAME}


def _offer_delete(message: str, delete) -> None:
    """A warning with a *Delete* button (napari notification actions): never blocks."""
    from napari.utils import notifications
    from napari.utils.notifications import Notification, NotificationSeverity

    notifications.notification_manager.dispatch(
        Notification(message, severity=NotificationSeverity.WARNING,
                     actions=[("Delete", lambda *_: delete())])
    )


def image_key(layer) -> str:
    raw = unwrap(layer)
    return str(getattr(raw, "unique_id", None) or id(raw))


def tag_of(layer) -> dict:
    tag = unwrap(layer).metadata.get(TAG)
    return tag if isinstance(tag, dict) else {}


def _kinds():
    from napari.layers import Image, Labels, Points, Shapes

    return {"image": Image, "points": Points, "shapes": Shapes, "labels": Labels,
            "exemplars": Shapes, "preview": Labels}


class LayerBinder(QObject):
    """The layers of each role, their events, and the image's geometry."""

    layers_changed = Signal()  # the viewer's layers or their names changed
    role_changed = Signal(str)  # the layer playing a role (or "channels") changed
    prompts_edited = Signal()  # the chosen points or boxes changed
    exemplars_edited = Signal()
    slice_changed = Signal()  # the viewer shows another slice
    axis_changed = Signal()  # the viewer's last used axis changed
    polarity_key = Signal()  # key t on the points layer
    exemplar_polarity_key = Signal()  # key t on the exemplars layer

    def __init__(self, session, viewer, parent=None):
        super().__init__(parent)
        self.session = session
        self.viewer = viewer
        self.roles: dict[str, object] = dict.fromkeys(ROLES)
        self.positive = True  # polarity of new points
        self.exemplar_positive = True
        self.exemplars_off = False  # the user chose "(none)" for exemplars
        self.channels: list | None = None  # up to three image layers as R, G, B
        self._preview = None
        self._non_rect = 0
        self._non_rect_exemplars = 0
        self.scratch = ScratchFolders(viewer.layers, _offer_delete)
        self.targets = LabelTargets(viewer.layers)
        self.largest = LargestIds(session, self)
        self.largest.found.connect(self._on_largest_found)
        self._ensure_timer = QTimer(self)
        self._ensure_timer.setSingleShot(True)
        self._ensure_timer.setInterval(0)
        self._ensure_timer.timeout.connect(self.ensure_layers)
        layers = viewer.layers
        self._connections = [
            (layers.events.inserted, self._on_inserted),
            (layers.events.removed, self._on_layers_changed),
            (viewer.dims.events.current_step, self._on_step),
            (viewer.dims.events.last_used, self._on_axis),
        ]
        for emitter, callback in self._connections:
            emitter.connect(callback)
        for layer in layers:
            layer.events.name.connect(self._on_layers_changed)
        session.object_changed.connect(self._on_object_changed)
        session.on_close(self._detach)
        self.refresh()

    # -- the layers of each role ---------------------------------------------------------------
    def alive(self, layer) -> bool:
        return layer is not None and any(same(ly, layer) for ly in self.viewer.layers)

    def layer(self, role: str):
        layer = self.roles[role]
        return layer if self.alive(layer) else None

    image_layer = property(lambda self: self.layer("image"))
    points_layer = property(lambda self: self.layer("points"))
    shapes_layer = property(lambda self: self.layer("shapes"))
    labels_layer = property(lambda self: self.layer("labels"))
    exemplars_layer = property(lambda self: self.layer("exemplars"))

    @property
    def preview_layer(self):
        return self._preview if self.alive(self._preview) else None

    @property
    def busy(self) -> bool:
        return self._ensure_timer.isActive() or self.targets.pending or self.largest.busy

    def candidates(self, role: str) -> list:
        """The layers that can play ``role`` (labels: not a preview or an edit window)."""
        kind = _kinds()[role]
        out = [ly for ly in self.viewer.layers if isinstance(ly, kind)]
        if role == "labels":
            out = [ly for ly in out if tag_of(ly).get("role") not in ("preview", "edit")
                   and not same(ly, self.preview_layer)]
        elif role in ("shapes", "exemplars"):
            out = [ly for ly in out if tag_of(ly).get("role") != "encoded"]
        return out

    def _preferred(self, role: str):
        choices = self.candidates(role)
        if role == "exemplars":
            if self.exemplars_off:
                return None
            return next((ly for ly in choices if ly.name == EXEMPLARS_NAME), None)
        image = self.layer("image")
        if image is not None and role in _PREFERRED:
            mine = [ly for ly in choices if tag_of(ly).get("image") == image_key(image)]
            if mine:
                return mine[0]
            named = [ly for ly in choices if ly.name == _PREFERRED[role]]
            if named:
                return named[0]
        return choices[0] if choices else None

    def refresh(self) -> None:
        """Keep each role's layer while it exists, else pick the preferred one."""
        changed = []
        for role in ROLES:
            current = self.layer(role)
            if current is None or not any(same(current, c) for c in self.candidates(role)):
                current = self._preferred(role)
            if not same(current, self.roles[role]):
                changed.append(role)
                self._rebind(role, current)
        self.layers_changed.emit()
        for role in changed:
            self.role_changed.emit(role)

    def choose(self, role: str, layer) -> None:
        """The user chose ``layer`` (None: none) for ``role``."""
        if role == "exemplars":
            self.exemplars_off = layer is None
        if same(layer, self.roles[role]):
            return
        self._rebind(role, layer)
        self.role_changed.emit(role)
        if role == "labels" and layer is not None:
            self.session.object_id = self.next_object_id()  # never an id the layer has

    def _rebind(self, role: str, layer) -> None:
        old = self.roles[role]
        self.roles[role] = layer
        if self.alive(old):
            self._release(role, old)
        if layer is None:
            return
        if role == "labels" and self._lazy_foreign(layer):
            raw = unwrap(layer)
            self.largest.start(raw, raw.data[0] if raw.multiscale else raw.data)
        if role == "image":
            self._ensure_timer.start()
        elif role == "points":
            prompt_layers.add_missing_features(
                layer, {"object_id": self.session.object_id, "positive": True}
            )
            self._point_defaults(layer)
            layer.events.data.connect(self._on_points_data)
            layer.bind_key("t", self._on_t_key, overwrite=True)
            prompt_layers.recolor(layer, "face_color")
        elif role == "shapes":
            prompt_layers.add_missing_features(layer, {"object_id": self.session.object_id})
            layer.feature_defaults = {"object_id": self.session.object_id}
            self._non_rect = layer_data.count_non_rectangles(layer.shape_type)
            layer.events.data.connect(self._on_shapes_data)
        elif role == "exemplars":
            prompt_layers.add_missing_features(layer, {"positive": True})
            prompt_layers.set_feature_default(layer, "positive", self.exemplar_positive)
            self._non_rect_exemplars = layer_data.count_non_rectangles(layer.shape_type)
            layer.events.data.connect(self._on_exemplars_data)
            layer.bind_key("t", self._on_exemplar_t_key, overwrite=True)
            prompt_layers.recolor(layer, "edge_color")

    def _release(self, role: str, layer) -> None:
        handlers = {"points": self._on_points_data, "shapes": self._on_shapes_data,
                    "exemplars": self._on_exemplars_data}
        if role in handlers:
            layer.events.data.disconnect(handlers[role])
        if role in ("points", "exemplars"):
            layer.bind_key("t", None, overwrite=True)

    def _detach(self) -> None:
        self._ensure_timer.stop()
        # self.scratch stays connected: a scratch layer removed after the dock closed
        # still has its folder deleted, or kept with a Delete offer
        self.targets.disconnect()
        for emitter, callback in self._connections:
            emitter.disconnect(callback)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._on_layers_changed)
        for role in ("points", "shapes", "exemplars"):
            if self.alive(self.roles[role]):
                self._release(role, self.roles[role])
        self.roles = dict.fromkeys(ROLES)

    # -- the managed layers of an image --------------------------------------------------------
    def _managed(self, role: str, image, base: str, ok):
        """This image's layer of ``role``: tagged for it, else an untagged one named
        ``base`` (adopted), else None."""
        kind, key = _kinds()[role], image_key(image)
        layers = [ly for ly in self.viewer.layers if isinstance(ly, kind) and ok(ly)]
        found = next((ly for ly in layers if tag_of(ly) == {"role": role, "image": key}), None)
        if found is None:
            found = next((ly for ly in layers if ly.name == base and not tag_of(ly)), None)
            if found is not None:
                unwrap(found).metadata[TAG] = {"role": role, "image": key}
        return found

    def _new_name(self, base: str, image) -> str:
        names = {ly.name for ly in self.viewer.layers}
        return base if base not in names else f"{base} ({unwrap(image).name})"

    def _tagged(self, role: str, image) -> dict:
        return {"metadata": {TAG: {"role": role, "image": image_key(image)}},
                "scale": image.scale, "translate": image.translate}

    @guarded
    def ensure_layers(self) -> None:
        """Select (or create) the image's points, boxes, labels and preview layers, with
        its dimensions (a stack gets nD layers); the object id continues after its labels."""
        image = self.image_layer
        if image is None:
            return
        try:
            src = self.source(image)
        except layer_data.LayerError as exc:
            self.session.report(f"SAM3: {exc}", "warning")
            return
        shape, plane, viewer = src.spatial_shape, src.plane, self.viewer
        labels = self._managed("labels", image, LABELS_NAME,
                               lambda ly: tuple(ly.data.shape) == shape)
        if labels is None:
            raw = unwrap(src.layer)
            levels = ([tuple(int(s) for s in lv.shape[: src.ndim]) for lv in raw.data]
                      if raw.multiscale else None)
            data, folder = new_labels_data(shape, src.n_lead, scratch_labels.LARGE_PIXELS,
                                           image_levels=levels)
            name = self._new_name(LABELS_NAME, image)
            pyramid = data if isinstance(data, Pyramid) else None
            if pyramid is not None and len(pyramid.levels) == 1:  # napari needs 2 levels
                data, pyramid = pyramid.levels[0], None
            labels = viewer.add_labels(data if pyramid is None else pyramid.levels,
                                       name=name, opacity=0.6,
                                       multiscale=pyramid is not None,
                                       **self._tagged("labels", image))
            if pyramid is not None:
                self.targets.add(labels, pyramid)
            if folder is not None:
                self.scratch.add(labels, folder)
                self.session.report(
                    f"SAM3: the image is large: '{name}' lives in {folder} until you save it "
                    "(Save labels); it is deleted when the layer is removed", "info")
        preview = self._managed("preview", image, PREVIEW_NAME, lambda ly: ly.ndim == src.ndim)
        if preview is None:
            full = not src.n_lead and not src.large
            preview = viewer.add_labels(
                np.zeros(plane if full else (1,) * src.ndim, np.int32),
                name=self._new_name(PREVIEW_NAME, image), opacity=0.5,
                **self._tagged("preview", image))
        self._preview = preview
        boxes = self._managed("shapes", image, BOXES_NAME, lambda ly: ly.ndim == src.ndim)
        if boxes is None:
            boxes = viewer.add_shapes(
                ndim=src.ndim, name=self._new_name(BOXES_NAME, image), edge_color="yellow",
                face_color="transparent", edge_width=max(1.0, max(plane) / 300),
                features={"object_id": np.zeros(0, int)},
                feature_defaults={"object_id": self.session.object_id},
                **self._tagged("shapes", image))
        points = self._managed("points", image, POINTS_NAME, lambda ly: ly.ndim == src.ndim)
        if points is None:
            points = viewer.add_points(
                ndim=src.ndim, name=self._new_name(POINTS_NAME, image),
                size=float(np.clip(max(plane) / 60, 4, 30)), border_color="white",
                border_width=0.1,
                features={"object_id": np.zeros(0, int), "positive": np.zeros(0, bool)},
                feature_defaults={"object_id": self.session.object_id,
                                  "positive": self.positive},
                **self._tagged("points", image))
        for role, layer in (("labels", labels), ("shapes", boxes), ("points", points)):
            if not same(layer, self.roles[role]):
                self._rebind(role, layer)
                self.role_changed.emit(role)
        self.layers_changed.emit()
        self.session.object_id = self.next_object_id()
        viewer.layers.selection.active = points
        points.mode = "add"

    def new_preview(self, data, scale, translate):
        """A preview layer for the current image (when the managed one was removed)."""
        image = self.image_layer
        extra = {} if image is None else {"metadata": self._tagged("preview", image)["metadata"]}
        self._preview = self.viewer.add_labels(
            data, name=PREVIEW_NAME, opacity=0.5, scale=scale, translate=translate, **extra
        )
        self.layers_changed.emit()
        return self._preview

    # -- the image -----------------------------------------------------------------------------
    def source(self, layer=None) -> ImageSource:
        """The chosen image (or ``layer``), or the chosen channels, as the core sees it.
        UserError without an image, LayerError for one that cannot be used."""
        if layer is None and self.channels:
            live = [ly for ly in self.channels if self.alive(ly)]
            if live:
                return image_source.channels_source(live)
        layer = self.image_layer if layer is None else layer
        if layer is None:
            raise UserError("no image: add an image layer and choose it in the widget")
        return image_source.image_source(layer)

    def current_slice(self, src: ImageSource | None = None) -> tuple[int, ...]:
        return image_source.current_slice(self.viewer, src or self.source())

    def propagation_axis(self, src: ImageSource | None = None) -> tuple[int, dict[int, int]]:
        return image_source.propagation_axis(self.viewer, src or self.source())

    def field_of_view(self, src: ImageSource | None = None) -> tuple[int, int, int, int]:
        return image_source.field_of_view(self.viewer, src or self.source())

    def world_point(self) -> np.ndarray:
        return np.asarray(self.viewer.dims.point, dtype=np.float64)

    def labels_for(self, src: ImageSource):
        """The labels layer to write into, of the image's shape; else UserError."""
        labels = self.labels_layer
        if labels is None:
            raise UserError("no labels layer to write into: choose one in the widget")
        data = unwrap(labels).data
        if tuple(data.shape) != src.spatial_shape:
            raise UserError(
                f"labels layer '{labels.name}' has shape {tuple(data.shape)}, "
                f"the image is {src.spatial_shape}"
            )
        return labels

    def target(self, labels):
        """How the widget reads and writes ``labels`` (see :mod:`.labels_target`); a layer
        whose largest id is still being read is not written into yet."""
        if self.largest.scanning(labels):
            raise UserError(f"still reading the largest id of '{unwrap(labels).name}' (so new "
                            "ids do not collide with its labels): try again in a moment")
        return self.targets.of(labels)

    def edit_target(self, labels) -> tuple:
        """``(target, slice)`` for editing ``labels`` on the shown slice of the chosen image
        (Delete, Merge, Refine); UserError or LayerError when they do not fit."""
        src = self.source()
        self.labels_for(src)
        return self.target(labels), self.current_slice(src)

    @staticmethod
    def _large_lazy(raw) -> bool:
        data = raw.data[0] if raw.multiscale else raw.data
        return (not isinstance(data, np.ndarray)
                and int(np.prod(data.shape)) > scratch_labels.LARGE_PIXELS)

    def _lazy_foreign(self, layer) -> bool:
        """A large lazy labels layer the widget did not make (its ids are unknown)."""
        raw = unwrap(layer)
        return self._large_lazy(raw) and self.scratch.folder_of(raw) is None

    def _on_largest_found(self, raw, top: int) -> None:
        if same(raw, self.labels_layer):
            self.session.object_id = max(self.session.object_id, self.next_object_id())

    def max_label(self, labels) -> int:
        """Largest id in a labels layer; a huge lazy one is read once, chunk by chunk in a
        worker, when chosen (``largest``), and the widget's own writes count; a multiscale
        one is read at full resolution."""
        raw = unwrap(labels)
        data = raw.data[0] if raw.multiscale else raw.data
        if self._large_lazy(raw):
            return max(self.session.max_written(raw), self.largest.known(raw) or 0)
        if raw.multiscale:
            try:
                self.target(raw).wait()  # its writes may still be landing
            except UserError:
                pass  # not a pyramid we write: nothing of ours is landing
        arr = np.asarray(data)
        return max(int(arr.max()) if arr.size else 0, 0)

    def next_object_id(self) -> int:
        """One more than any label of the labels layer and any prompt id."""
        labels = self.labels_layer
        top = self.max_label(labels) if labels is not None else 0
        return layer_data.next_object_id(top, self.prompt_ids())

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(self) -> set[int]:
        return prompt_layers.prompt_ids(self.points_layer, self.shapes_layer)

    def object_prompts(self, obj_id: int, src: ImageSource, only=None, mask=None) -> dict:
        return prompt_layers.object_prompts(
            self.points_layer, self.shapes_layer, src, obj_id, self.world_point(),
            only=only, mask=mask)

    def remove_prompts(self, obj_id: int, lead: tuple = ()) -> None:
        """Delete the object's points and boxes on slice ``lead`` (all of a 2D image)."""
        try:
            src = self.source()
        except (UserError, layer_data.LayerError):
            src = None
        point = self.world_point()
        prompt_layers.remove_object_items(
            self.points_layer, obj_id, src, lead, point, self._on_points_data)
        prompt_layers.remove_object_items(
            self.shapes_layer, obj_id, src, lead, point, self._on_shapes_data)
        if self.shapes_layer is not None:
            self._non_rect = layer_data.count_non_rectangles(self.shapes_layer.shape_type)

    def exemplar_prompts(self, src: ImageSource) -> tuple[dict, int]:
        return prompt_layers.exemplar_prompts(self.exemplars_layer, src, self.world_point())

    def set_positive(self, positive: bool) -> int:
        """Polarity of new points; the selected points flip too (returns how many)."""
        self.positive = bool(positive)
        layer = self.points_layer
        if layer is None:
            return 0
        self._point_defaults(layer)
        flipped = prompt_layers.flip_selected(layer)
        if flipped:
            prompt_layers.recolor(layer, "face_color")
            self.prompts_edited.emit()
        return flipped

    def set_exemplar_positive(self, positive: bool) -> int:
        self.exemplar_positive = bool(positive)
        layer = self.exemplars_layer
        if layer is None:
            return 0
        prompt_layers.set_feature_default(layer, "positive", self.exemplar_positive)
        flipped = prompt_layers.flip_selected(layer)
        if flipped:
            prompt_layers.recolor(layer, "edge_color")
        return flipped

    def _point_defaults(self, layer) -> None:
        layer.feature_defaults = {"object_id": self.session.object_id, "positive": self.positive}

    # -- events --------------------------------------------------------------------------------
    @guarded
    def _on_inserted(self, event) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self._on_layers_changed)
        self.refresh()

    @guarded
    def _on_layers_changed(self, event=None) -> None:
        self.refresh()

    @guarded
    def _on_step(self, event=None) -> None:
        self.slice_changed.emit()

    @guarded
    def _on_axis(self, event=None) -> None:
        self.axis_changed.emit()

    @guarded
    def _on_object_changed(self, obj_id: int) -> None:
        if self.points_layer is not None:
            self._point_defaults(self.points_layer)
        if self.shapes_layer is not None:
            self.shapes_layer.feature_defaults = {"object_id": int(obj_id)}

    @guarded
    def _on_points_data(self, event) -> None:
        if not prompt_layers.finished(event):
            return
        if self.points_layer is not None:
            prompt_layers.recolor(self.points_layer, "face_color")
        self.prompts_edited.emit()

    @guarded
    def _on_shapes_data(self, event) -> None:
        if not prompt_layers.finished(event):
            return
        layer = self.shapes_layer
        if layer is not None:
            self._non_rect = self._note_non_rect(layer, self._non_rect, "box prompts")
        self.prompts_edited.emit()

    @guarded
    def _on_exemplars_data(self, event) -> None:
        layer = self.exemplars_layer
        if not prompt_layers.finished(event) or layer is None:
            return
        prompt_layers.recolor(layer, "edge_color")
        self._non_rect_exemplars = self._note_non_rect(layer, self._non_rect_exemplars,
                                                       "exemplars")
        self.exemplars_edited.emit()

    def _note_non_rect(self, layer, before: int, what: str) -> int:
        count = layer_data.count_non_rectangles(layer.shape_type)
        if count > before:
            self.session.report(
                f"SAM3 uses rectangles as {what}: {count} non-rectangle "
                f"shape{'s' if count != 1 else ''} in '{layer.name}' ignored", "info")
        return count

    @guarded
    def _on_t_key(self, layer=None) -> None:
        self.polarity_key.emit()

    @guarded
    def _on_exemplar_t_key(self, layer=None) -> None:
        self.exemplar_polarity_key.emit()
