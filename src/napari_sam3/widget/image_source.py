"""The chosen image as the core sees it, and where the viewer stands in it.

napari layers and the viewer's dims / camera in, plain geometry out: the image's
leading (z/t) axes and plane, the slice shown now, the axis to propagate along and
the part of the plane on screen. Pixels are never read here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import planes
from . import layer_data, scratch_labels
from .errors import UserError


def unwrap(obj):
    """The napari object behind a PublicOnlyProxy (plugins get proxies)."""
    return getattr(obj, "__wrapped__", obj)


def same(a, b) -> bool:
    """Identity of layers, seen through napari's PublicOnlyProxy."""
    if a is None or b is None:
        return a is b
    return unwrap(a) is unwrap(b)


@dataclass
class ImageSource:
    """The chosen image layer (or the channels composed from several) for the core."""

    layer: object  # the layer (as napari handed it to us); geometry comes from it
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
        return self.plane[0] * self.plane[1] > scratch_labels.LARGE_PIXELS

    def plane_at(self, lead: tuple):
        return planes.plane_of(self.data, lead)


def level0(layer):
    """Full-resolution data of an image layer (level 0 of a multiscale one)."""
    raw = unwrap(layer)
    return raw.data[0] if raw.multiscale else raw.data


def layer_limits(layer) -> tuple[float, float] | None:
    """The layer's contrast limits as the model's intensity window (None for RGB uint8)."""
    raw = unwrap(layer)
    if raw.rgb and np.dtype(level0(raw).dtype) == np.uint8:
        return None
    return tuple(float(v) for v in raw.contrast_limits)


def automatic_contrast(layer) -> bool:
    """Whether the layer still has the contrast limits napari gave it (its range)."""
    raw = unwrap(layer)
    return [float(v) for v in raw.contrast_limits] == [
        float(v) for v in raw.contrast_limits_range]


def wants_recorded_contrast(layer) -> bool:
    """Whether ``layer`` still has the contrast limits napari gave it (recorded limits
    may then be offered)."""
    raw = unwrap(layer)
    return layer_limits(raw) is not None and automatic_contrast(raw)


def recorded_contrast(layer, lookup) -> tuple[float, float] | None:
    """The one rule for intensity limits that travel with the cache: the widget normalises
    with the layer's contrast limits; when ``lookup(level-0 data)`` finds the limits that
    image's last precompute recorded in the cache (a single pair) and the layer still has
    the contrast limits napari gave it, they are returned (for the user to adopt: the
    layer is not changed here; napari cannot tell limits it computed from limits passed
    when the layer was made)."""
    raw = unwrap(layer)
    if not wants_recorded_contrast(raw):
        return None
    found = lookup(level0(raw))
    if found is None or np.ndim(found) != 1:
        return None
    found = (float(found[0]), float(found[1]))
    if found == tuple(float(v) for v in raw.contrast_limits):
        return None
    return found


def image_source(layer) -> ImageSource:
    """An image layer as the core sees it; LayerError for one that cannot be used."""
    raw = unwrap(layer)
    data = level0(raw)
    n_lead, plane = layer_data.image_geometry(data.shape, raw.rgb, raw.name)
    return ImageSource(layer, data, bool(raw.rgb), n_lead, plane, layer_limits(raw))


def channels_source(layers) -> ImageSource:
    """Up to three single-channel image layers as the model's R, G and B inputs, each
    normalised with its own contrast limits (read lazily, tile by tile)."""
    from ..core.channels import composite_from

    first = unwrap(layers[0])
    arrays, limits = [], []
    for layer in layers:
        raw = unwrap(layer)
        if raw.rgb:
            raise layer_data.LayerError(f"'{raw.name}' is RGB: choose single-channel layers")
        arrays.append(level0(raw))
        limits.append(tuple(float(v) for v in raw.contrast_limits))
    names = [unwrap(ly).name for ly in layers]
    try:
        data = composite_from(arrays, limits, names=names)
    except ValueError as exc:  # shapes or limits that do not fit: one line for the user
        raise layer_data.LayerError(str(exc)) from None
    n_lead, plane = layer_data.image_geometry(data.shape, True, first.name)
    return ImageSource(layers[0], data, True, n_lead, plane, None)


def current_slice(viewer, src: ImageSource) -> tuple[int, ...]:
    """Indices of the image's leading (z/t) axes at the viewer's current position; ()
    for a 2D image."""
    if not src.n_lead:
        return ()
    point = np.asarray(viewer.dims.point, dtype=np.float64)
    pos = np.asarray(src.layer.world_to_data(point), dtype=np.float64)
    shape = src.data.shape
    return tuple(int(np.clip(np.rint(pos[a]), 0, int(shape[a]) - 1)) for a in range(src.n_lead))


def propagation_axis(viewer, src: ImageSource) -> tuple[int, dict[int, int]]:
    """(axis, fixed): the leading axis the user steps through (``dims.last_used``, else
    the first one), the other leading axes fixed at their current index."""
    if not src.n_lead:
        raise UserError(
            f"'{src.layer.name}' is a 2D image: propagation needs a z-stack or time series"
        )
    dims = viewer.dims
    offset = int(dims.ndim) - src.ndim
    axis = int(dims.last_used) - offset
    if not 0 <= axis < src.n_lead:
        hidden = set(dims.not_displayed)
        axis = next((a for a in range(src.n_lead) if a + offset in hidden), 0)
    lead = current_slice(viewer, src)
    return axis, {a: lead[a] for a in range(src.n_lead) if a != axis}


def field_of_view(viewer, src: ImageSource) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the current plane visible on the canvas (data pixels
    of level 0, end exclusive), from the camera and the canvas size."""
    scene, canvas = getattr(viewer, "scene", None), getattr(viewer, "canvas", None)
    camera = viewer.camera if scene is None else scene.camera  # napari < 0.9: viewer.camera
    size = viewer._canvas_size if canvas is None else canvas.size
    height, width = (float(v) for v in size)
    center = np.asarray(camera.center, dtype=np.float64)[-2:]
    half = np.array([height, width]) / (2.0 * float(camera.zoom))
    point = np.asarray(viewer.dims.point, dtype=np.float64)
    rows, cols = list(viewer.dims.displayed)[-2:]
    corners = []
    for dr in (-1, 1):
        for dc in (-1, 1):
            p = point.copy()
            p[rows], p[cols] = center + half * (dr, dc)
            corners.append(np.asarray(src.layer.world_to_data(p), dtype=np.float64)[-2:])
    region = planes.region_of(corners, src.plane)
    if region is None:
        raise UserError("the image is not in view: nothing to precompute")
    return region
