"""The prompt layers in napari: our features on them, polarity colours, prompts per slice.

Points carry features ``object_id`` and ``positive``; boxes (rectangles of a Shapes
layer) ``object_id``; exemplar rectangles ``positive``. Coordinates go from each
layer's data to the image's data here; the NumPy side is ``layer_data``.
"""

from __future__ import annotations

import numpy as np

from . import layer_data
from .image_source import ImageSource, unwrap

# napari data-event actions sent before a change is made (the "...ed" one follows it)
UNFINISHED = {"adding", "removing", "changing"}


def finished(event) -> bool:
    """False for the event napari sends before a change (only the one after counts)."""
    return str(getattr(event, "action", "")) not in UNFINISHED


def set_feature_default(layer, name: str, value) -> None:
    """Set one feature default of a layer, keeping the other columns' defaults."""
    current = layer.feature_defaults
    defaults = {k: current[k].iloc[0] for k in current.columns} if len(current) else {}
    defaults[name] = value
    layer.feature_defaults = defaults


def add_missing_features(layer, columns: dict) -> None:
    """Give the layer each feature column it lacks (value per existing item)."""
    feats = layer.features
    missing = {k: v for k, v in columns.items() if k not in feats}
    if missing:
        new = feats.copy()
        for k, v in missing.items():
            new[k] = np.full(len(layer.data), v)
        layer.features = new


def recolor(layer, attribute: str) -> None:
    """Green / red ``face_color`` (points) or ``edge_color`` (exemplars) from ``positive``."""
    n = len(layer.data)
    if n == 0:
        return
    pos = layer_data.feature_column(layer.features, "positive", n, True)
    colors = layer_data.polarity_colors(pos)
    current = np.asarray(getattr(layer, attribute))
    if current.shape != colors.shape or not np.allclose(current, colors):
        setattr(layer, attribute, colors)


def flip_selected(layer) -> int:
    """Flip the polarity of the layer's selected items; returns how many."""
    selected = sorted(i for i in layer.selected_data if i < len(layer.data))
    if selected:
        layer.features = layer_data.flip_polarity(layer.features, len(layer.data), selected)
    return len(selected)


def item_slices(layer, src: ImageSource, world_point) -> list[tuple]:
    """The slice of each item (point or shape) of a prompt layer."""
    from napari.layers import Points

    if isinstance(unwrap(layer), Points):
        coords = layer_data.to_image_coords_nd(layer, src.layer, layer.data, world_point)
        return [tuple(int(v) for v in np.rint(c[: src.n_lead])) for c in coords]
    out = []
    for d in layer.data:
        c = layer_data.to_image_coords_nd(layer, src.layer, d, world_point).mean(axis=0)
        out.append(tuple(int(v) for v in np.rint(c[: src.n_lead])))
    return out


def object_prompts(points, shapes, src: ImageSource, obj_id: int, world_point, *,
                   only: tuple | None = None, mask=None) -> dict:
    """``{slice: (ObjectPrompt or None, ignored shapes)}`` of one object from the points
    and boxes layers (see ``layer_data.prompts_by_slice``); ``mask`` is (slice, bool plane)
    or None; with ``only``, that slice alone."""
    kwargs = {}
    if points is not None and len(points.data):
        kwargs["points"] = layer_data.to_image_coords_nd(
            points, src.layer, points.data, world_point
        )
        kwargs["point_features"] = points.features
    if shapes is not None and len(shapes.data):
        kwargs["shapes"] = [
            layer_data.to_image_coords_nd(shapes, src.layer, d, world_point) for d in shapes.data
        ]
        kwargs["shape_types"] = list(shapes.shape_type)
        kwargs["shape_features"] = shapes.features
    return layer_data.prompts_by_slice(
        obj_id, src.plane, n_lead=src.n_lead, mask=mask, only=only, **kwargs
    )


def prompt_ids(*layers) -> set[int]:
    """Object ids that have a point or a box in any of the layers."""
    pairs = [(ly.features, len(ly.data)) for ly in layers if ly is not None]
    return layer_data.prompt_ids(*pairs)


def remove_object_items(layer, obj_id: int, src: ImageSource | None, lead: tuple,
                        world_point, handler) -> int:
    """Delete the object's items on slice ``lead`` (all of them for a 2D image), with
    ``handler`` disconnected from the layer's data events meanwhile; returns how many."""
    if layer is None or not len(layer.data):
        return 0
    idx = layer_data.object_indices(layer.features, len(layer.data), obj_id)
    if lead and src is not None and len(idx):
        slices = item_slices(layer, src, world_point)
        idx = np.array([i for i in idx if slices[i] == lead], dtype=np.intp)
    if not len(idx):
        return 0
    layer.events.data.disconnect(handler)
    try:
        layer.selected_data = set(idx.tolist())
        layer.remove_selected()
    finally:
        layer.events.data.connect(handler)
    return len(idx)


def exemplar_prompts(layer, src: ImageSource, world_point) -> tuple[dict, int]:
    """``({slice: (boxes, labels)}, ignored shapes)`` of an exemplars layer."""
    if layer is None or not len(layer.data):
        return {}, 0
    shapes = [layer_data.to_image_coords_nd(layer, src.layer, d, world_point) for d in layer.data]
    return layer_data.exemplar_boxes_by_slice(
        shapes, list(layer.shape_type), layer.features, src.plane, src.n_lead
    )
