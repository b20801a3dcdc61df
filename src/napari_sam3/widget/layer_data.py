"""Layer data -> prompts: the NumPy side of the napari widget (no Qt, no torch).

The functions take plain layer *data* (arrays, shape types, feature tables) so
they work without napari. Coordinates stay in napari (row, col) order here; the
swap to SAM's (x, y) happens only in :func:`napari_sam3.core.prompts.rowcol_to_xy`.

Conventions of the widget's prompt layers:

* Points: one row per click; features ``object_id`` (int) and ``positive``
  (bool: True = inside the object, False = outside).
* Shapes: rectangles with feature ``object_id``; the last rectangle of an
  object is its box. Other shape types are not prompts: they are counted and
  reported back as ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.prompts import ObjectPrompt, PromptError

POSITIVE_COLOR = np.array([0.1, 0.85, 0.1, 1.0])  # green: inside the object
NEGATIVE_COLOR = np.array([0.95, 0.15, 0.15, 1.0])  # red: outside the object


class LayerError(ValueError):
    """A layer that cannot be used as SAM3 input (wrong dimensionality, shape...)."""


def image_shape_2d(shape: Sequence[int], rgb: bool, name: str = "image") -> tuple[int, int]:
    """(H, W) of a 2D gray ``(H, W)`` or rgb ``(H, W, C)`` image layer, else LayerError."""
    shape = tuple(int(s) for s in shape)
    spatial = shape[:-1] if rgb else shape
    if len(spatial) != 2:
        kind = "rgb " if rgb else ""
        raise LayerError(
            f"'{name}' is a {len(spatial)}D {kind}image of shape {shape}: SAM3 segmentation "
            "here works on 2D images (H, W) or (H, W, C) only"
        )
    if spatial[0] < 1 or spatial[1] < 1:
        raise LayerError(f"'{name}' is empty (shape {shape})")
    return spatial[0], spatial[1]


def flip_polarity(features, n: int, selected) -> object:
    """A copy of a feature table with the ``positive`` flag of rows ``selected`` flipped."""
    pos = np.array(feature_column(features, "positive", n, True), bool)
    rows = sorted(selected)
    pos[rows] = ~pos[rows]
    out = features.copy()
    out["positive"] = pos
    return out


def feature_column(features, name: str, n: int, default) -> np.ndarray:
    """Column ``name`` of a feature table (DataFrame or dict) as an array of length n.

    A missing column gives ``default`` for every row.
    """
    if features is not None and name in features:
        col = np.asarray(features[name])
        if len(col) == n:
            return col
        raise LayerError(f"feature '{name}' has {len(col)} values for {n} items")
    return np.full(n, default)


def _object_ids(features, n: int) -> np.ndarray:
    ids = feature_column(features, "object_id", n, -1)
    try:
        return np.asarray(ids, dtype=np.int64)
    except (TypeError, ValueError):
        raise LayerError("feature 'object_id' must hold integer object ids") from None


def _as_2d_coords(coords, what: str) -> np.ndarray:
    arr = np.asarray(coords, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise LayerError(
            f"{what} must be 2D (row, col) coordinates, got an array of shape {arr.shape}"
        )
    return arr


def object_indices(features, n: int, obj_id: int) -> np.ndarray:
    """Indices of the items (points or shapes) that belong to ``obj_id``."""
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(_object_ids(features, n) == int(obj_id))


def prompt_ids(*feature_tables_and_sizes) -> set[int]:
    """Object ids used by prompt layers: pass ``(features, n)`` pairs."""
    ids: set[int] = set()
    for features, n in feature_tables_and_sizes:
        if n:
            ids.update(int(i) for i in np.unique(_object_ids(features, n)) if i > 0)
    return ids


def next_object_id(max_label: int = 0, used_ids=()) -> int:
    """One more than the largest id in the labels and the prompt layers (at least 1)."""
    return int(max([int(max_label), 0, *(int(i) for i in used_ids)])) + 1


def _inside_or_error(rc: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    """Points inside the image's pixel extent are kept (clipped to pixel centres).

    napari draws pixel (r, c) from r-0.5 to r+0.5, so a click on the border half
    of the first/last pixel is inside and is moved to that pixel's centre.
    """
    h, w = shape
    for r, c in rc:
        if not (np.isfinite(r) and np.isfinite(c)):
            raise PromptError(f"{what} has a non-finite coordinate")
        if not (-0.5 <= r < h - 0.5 and -0.5 <= c < w - 0.5):
            raise PromptError(
                f"{what} at (row {r:.1f}, col {c:.1f}) is outside the {h}x{w} image: "
                "move or delete it"
            )
    out = rc.copy()
    out[:, 0] = np.clip(out[:, 0], 0, h - 1)
    out[:, 1] = np.clip(out[:, 1], 0, w - 1)
    return out


def points_for_object(
    data, features, obj_id: int, image_shape=None
) -> tuple[np.ndarray, np.ndarray]:
    """(points (k, 2) row/col, labels (k,) 1/0) of ``obj_id`` from a Points layer.

    With ``image_shape`` a point outside the image raises :class:`PromptError`.
    """
    pts = _as_2d_coords(data, "points")
    n = len(pts)
    idx = object_indices(features, n, obj_id)
    positive = feature_column(features, "positive", n, True)
    labels = np.asarray(positive[idx], dtype=bool).astype(np.int64)
    rc = pts[idx]
    if image_shape is not None and len(rc):
        rc = _inside_or_error(rc, image_shape, f"a point of object {obj_id}")
    return rc, labels


def box_for_object(
    data: Sequence, shape_types: Sequence[str], features, obj_id: int, image_shape=None
) -> tuple[np.ndarray | None, int]:
    """(box (row0, col0, row1, col1) or None, number of ignored non-rectangles) of ``obj_id``.

    The box is the bounding box of the object's last rectangle. With
    ``image_shape`` a box entirely outside the image raises :class:`PromptError`
    and a box partly outside is clipped to the image.
    """
    n = len(data)
    if len(shape_types) != n:
        raise LayerError(f"{n} shapes but {len(shape_types)} shape types")
    box = None
    ignored = 0
    for i in object_indices(features, n, obj_id):
        if str(shape_types[i]) != "rectangle":
            ignored += 1
            continue
        corners = _as_2d_coords(data[i], "shapes")
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    if box is not None and image_shape is not None:
        h, w = image_shape
        r0, c0, r1, c1 = box
        if r1 < -0.5 or c1 < -0.5 or r0 >= h - 0.5 or c0 >= w - 0.5:
            raise PromptError(
                f"the box of object {obj_id} (rows {r0:.1f}-{r1:.1f}, cols {c0:.1f}-{c1:.1f}) "
                f"is outside the {h}x{w} image"
            )
        box = np.array(
            [
                np.clip(r0, 0, h - 1),
                np.clip(c0, 0, w - 1),
                np.clip(r1, 0, h - 1),
                np.clip(c1, 0, w - 1),
            ]
        )
    return box, ignored


def count_non_rectangles(shape_types: Sequence[str]) -> int:
    return sum(str(t) != "rectangle" for t in shape_types)


def object_prompt(
    obj_id: int,
    image_shape: tuple[int, int],
    *,
    points=None,
    point_features=None,
    shapes=None,
    shape_types=None,
    shape_features=None,
    mask=None,
) -> tuple[ObjectPrompt | None, int]:
    """The :class:`ObjectPrompt` of ``obj_id`` and the number of ignored shapes.

    Returns ``(None, ignored)`` when the object has no point, box or mask.
    """
    if points is not None and len(points):
        rc, labels = points_for_object(points, point_features, obj_id, image_shape)
    else:
        rc, labels = np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    box, ignored = None, 0
    if shapes is not None and len(shapes):
        box, ignored = box_for_object(shapes, shape_types, shape_features, obj_id, image_shape)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(image_shape):
            raise LayerError(
                f"the mask prompt has shape {mask.shape}, the image is {tuple(image_shape)}"
            )
        if not mask.any():
            mask = None
    if not len(rc) and box is None and mask is None:
        return None, ignored
    return ObjectPrompt(points=rc, point_labels=labels, box=box, mask=mask), ignored


def polarity_colors(positive) -> np.ndarray:
    """(N, 4) RGBA face colours: green for positive points, red for negative ones."""
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    return np.where(pos[:, None], POSITIVE_COLOR, NEGATIVE_COLOR)


def same_transform(a, b) -> bool:
    """True if two layer-like objects map data to world coordinates the same way."""
    try:
        if a.ndim != b.ndim:
            return False
        return bool(
            np.allclose(a.scale, b.scale)
            and np.allclose(a.translate, b.translate)
            and np.allclose(a.rotate, b.rotate)
            and np.allclose(a.shear, b.shear)
            and np.allclose(a.affine.affine_matrix, b.affine.affine_matrix)
        )
    except (AttributeError, ValueError, TypeError):
        return False


def to_image_coords(layer, image_layer, coords) -> np.ndarray:
    """(N, D) data coordinates of ``layer`` -> (N, 2) data coordinates of ``image_layer``.

    Identity when both layers share their transform (the widget's own layers do).
    """
    arr = np.asarray(coords, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2))
    if same_transform(layer, image_layer):
        return arr
    out = [
        np.asarray(image_layer.world_to_data(layer.data_to_world(c)), dtype=np.float64) for c in arr
    ]
    return np.asarray(out)[:, -2:]


# -- stacks and large images ------------------------------------------------------------------
# An image layer is (*lead, H, W) or (*lead, H, W, C) for RGB: ``lead`` are the z and/or t
# axes (none for a 2D image). A "slice" is a tuple of lead indices; () for a 2D image.


def image_geometry(shape: Sequence[int], rgb: bool, name: str = "image"):
    """(number of leading z/t axes, (H, W)) of an image layer's data shape, else LayerError."""
    shape = tuple(int(s) for s in shape)
    spatial = shape[:-1] if rgb else shape
    if len(spatial) < 2:
        raise LayerError(
            f"'{name}' is a {len(spatial)}D image of shape {shape}: SAM3 segmentation needs "
            "2D images (H, W), RGB (H, W, C) or stacks (Z/T, ..., H, W)"
        )
    if min(spatial) < 1:
        raise LayerError(f"'{name}' is empty (shape {shape})")
    return len(spatial) - 2, (spatial[-2], spatial[-1])


def format_slice(lead: tuple) -> str:
    """'slice 3' or 'slice (1, 2)' for messages; '' for a 2D image."""
    if not lead:
        return ""
    return f"slice {lead[0]}" if len(lead) == 1 else f"slice {tuple(int(v) for v in lead)}"


def to_image_coords_nd(layer, image_layer, coords, world_point=None) -> np.ndarray:
    """(N, D) data coordinates of ``layer`` -> (N, image ndim) data coordinates of the image.

    Identity when both layers share their transform. A layer with fewer dimensions than
    the image (e.g. 2D points over a z-stack) takes the missing leading world coordinates
    from ``world_point`` (the viewer's current position): its prompts are on the current
    slice.
    """
    arr = np.asarray(coords, dtype=np.float64)
    ndim = int(image_layer.ndim)
    if arr.size == 0:
        return np.zeros((0, ndim))
    arr = arr.reshape(-1, arr.shape[-1])
    if same_transform(layer, image_layer):
        return arr
    out = []
    for c in arr:
        world = np.asarray(layer.data_to_world(c), dtype=np.float64)
        if len(world) < ndim and world_point is not None:
            full = np.array(world_point, dtype=np.float64)
            full[len(full) - len(world) :] = world
            world = full
        out.append(np.asarray(image_layer.world_to_data(world), dtype=np.float64)[-ndim:])
    return np.asarray(out)


def _lead_of(coords: np.ndarray, n_lead: int) -> tuple:
    if not n_lead:
        return ()
    return tuple(int(v) for v in np.rint(np.asarray(coords, dtype=np.float64)[:n_lead]))


def prompts_by_slice(
    obj_id: int,
    plane: tuple[int, int],
    *,
    n_lead: int = 0,
    points=None,
    point_features=None,
    shapes=None,
    shape_types=None,
    shape_features=None,
    mask=None,
    only: tuple | None = None,
) -> dict[tuple, tuple[ObjectPrompt | None, int]]:
    """``{slice: (ObjectPrompt or None, ignored shapes)}`` of ``obj_id`` on each slice.

    ``points`` (N, n_lead + 2) and each of ``shapes`` (k, n_lead + 2) are image data
    coordinates; the leading coordinates (rounded) say which slice a prompt belongs to,
    so prompts drawn on one slice never reach another. ``mask`` is ``(slice, (H, W)
    bool)`` or None. With ``only`` just that slice is built (prompts on other slices are
    not even checked).
    """
    width = n_lead + 2
    groups: dict[tuple, dict] = {}

    def group(key):
        return groups.setdefault(key, {"points": [], "positive": [], "shapes": [], "types": []})

    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, width)
        n = len(pts)
        ids = _object_ids(point_features, n)
        positive = np.asarray(feature_column(point_features, "positive", n, True), dtype=bool)
        for i in np.flatnonzero(ids == int(obj_id)):
            key = _lead_of(pts[i], n_lead)
            if only is None or key == only:
                g = group(key)
                g["points"].append(pts[i, n_lead:])
                g["positive"].append(positive[i])
    if shapes is not None and len(shapes):
        if len(shape_types) != len(shapes):
            raise LayerError(f"{len(shapes)} shapes but {len(shape_types)} shape types")
        ids = _object_ids(shape_features, len(shapes))
        for i in np.flatnonzero(ids == int(obj_id)):
            verts = np.asarray(shapes[i], dtype=np.float64).reshape(-1, width)
            key = _lead_of(verts.mean(axis=0), n_lead)
            if only is None or key == only:
                g = group(key)
                g["shapes"].append(verts[:, n_lead:])
                g["types"].append(str(shape_types[i]))
    if mask is not None:
        key = tuple(int(v) for v in mask[0])
        if only is None or key == only:
            group(key)
    out = {}
    for key, g in groups.items():
        k = len(g["points"])
        prompt, ignored = object_prompt(
            obj_id,
            plane,
            points=np.asarray(g["points"]).reshape(k, 2),
            point_features={"object_id": np.full(k, obj_id), "positive": np.array(g["positive"])},
            shapes=g["shapes"],
            shape_types=g["types"],
            shape_features={"object_id": np.full(len(g["shapes"]), obj_id)},
            mask=mask[1] if mask is not None and tuple(mask[0]) == key else None,
        )
        out[key] = (prompt, ignored)
    return out


# -- concept exemplars and instance writes ----------------------------------------------------
def exemplar_boxes_by_slice(
    shapes,
    shape_types: Sequence[str],
    features,
    plane: tuple[int, int],
    n_lead: int = 0,
) -> tuple[dict[tuple, tuple[np.ndarray, np.ndarray]], int]:
    """``({slice: (boxes (k, 4), labels (k,))}, ignored)`` of an exemplars Shapes layer.

    ``shapes``: each shape's vertices as (k, n_lead + 2) image data coordinates; the
    leading coordinates (rounded, of the shape's centre) give its slice. A box is
    (row0, col0, row1, col1), the bounding box of a rectangle's corners, clipped to the
    plane; a box entirely outside it raises :class:`PromptError`. Labels are 1 for a
    positive exemplar and 0 for a negative one (feature ``positive``, default True).
    Other shape types are not exemplars: they are counted in ``ignored``.
    """
    n = len(shapes)
    if len(shape_types) != n:
        raise LayerError(f"{n} shapes but {len(shape_types)} shape types")
    positive = np.asarray(feature_column(features, "positive", n, True), dtype=bool)
    width = n_lead + 2
    h, w = plane
    groups: dict[tuple, tuple[list, list]] = {}
    ignored = 0
    for i in range(n):
        if str(shape_types[i]) != "rectangle":
            ignored += 1
            continue
        verts = np.asarray(shapes[i], dtype=np.float64).reshape(-1, width)
        if not np.isfinite(verts).all():
            raise PromptError("an exemplar box has a non-finite coordinate")
        key = _lead_of(verts.mean(axis=0), n_lead)
        r0, c0 = verts[:, n_lead:].min(axis=0)
        r1, c1 = verts[:, n_lead:].max(axis=0)
        if r1 < -0.5 or c1 < -0.5 or r0 >= h - 0.5 or c0 >= w - 0.5:
            raise PromptError(
                f"an exemplar box (rows {r0:.1f}-{r1:.1f}, cols {c0:.1f}-{c1:.1f}) is outside "
                f"the {h}x{w} image: move or delete it"
            )
        box = [
            np.clip(r0, 0, h - 1),
            np.clip(c0, 0, w - 1),
            np.clip(r1, 0, h - 1),
            np.clip(c1, 0, w - 1),
        ]
        boxes, labels = groups.setdefault(key, ([], []))
        boxes.append(box)
        labels.append(int(positive[i]))
    out = {
        key: (np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(lab, dtype=np.int64))
        for key, (b, lab) in groups.items()
    }
    return out, ignored


def exemplars_for_slices(by_slice: dict, leads: Sequence[tuple], axis: int = 0) -> list:
    """The exemplars each slice of ``leads`` uses: ``(boxes, labels)`` or None.

    A slice with exemplars of its own uses them; another uses those of the nearest
    slice along ``axis`` that has some (ties: the lower one), at the same (row, col)
    positions, provided its other leading coordinates are the same; else None. For a
    2D image (``leads == [()]``) this is just the image's exemplars.
    """
    out = []
    for lead in leads:
        lead = tuple(int(v) for v in lead)
        if lead in by_slice:
            out.append(by_slice[lead])
            continue
        candidates = [
            key
            for key in by_slice
            if len(key) == len(lead)
            and all(key[a] == lead[a] for a in range(len(lead)) if a != axis)
        ]
        if not candidates:
            out.append(None)
            continue
        best = min(candidates, key=lambda k: (abs(k[axis] - lead[axis]), k[axis]))
        out.append(by_slice[best])
    return out
