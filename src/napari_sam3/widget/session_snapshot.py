"""What a session keeps of the widget, taken on the GUI thread: the settings in the
sections' fields, the image reference, the points and boxes; and putting them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layer_data, prompt_layers
from .errors import UserError
from .image_source import level0, unwrap


class WidgetSettings:
    """The settings a session keeps (model, device, cache folder, tiling,
    post-processing; propagation direction and stop; concept text, model and threshold;
    segment-everything grid and filters), read from and written into the sections'
    fields. A key missing from a session (an older one) leaves its field as it is."""

    def __init__(self, model_section, cache_section, post_section, propagate_section=None,
                 instances_section=None):
        self.model, self.cache, self.post = model_section, cache_section, post_section
        self.propagate, self.instances = propagate_section, instances_section

    def _fields(self) -> dict:
        """``{group: {key: (widget, type)}}`` of the propagation and instance settings."""
        groups = {}
        if self.propagate is not None:
            p = self.propagate
            groups["propagation"] = {"direction": (p.direction_combo, str),
                                     "stop_after": (p.stop_after_spin, int)}
        if self.instances is not None:
            i = self.instances
            groups["concept"] = {"text": (i.concept_text_edit, str),
                                 "model": (i.concept_model_edit, str)}
            groups["everything"] = {"points_per_side": (i.points_per_side_spin, int),
                                    "pred_iou_thresh": (i.pred_iou_spin, float),
                                    "stability_score_thresh": (i.stability_spin, float),
                                    "min_area": (i.min_area_spin, int)}
        return groups

    def read(self, session) -> dict:
        post = session.post
        out = {"model": self.model.model_edit.text().strip(),
               "device": self.model.device_combo.currentText(),
               "cache": session.cache_path,
               "tiling": None if session.tiling is None else list(session.tiling),
               "postprocess": {"max_hole_area": int(post.max_hole_area),
                               "max_sprinkle_area": int(post.max_sprinkle_area),
                               "overwrite": bool(post.overwrite)}}
        for group, fields in self._fields().items():
            out[group] = {key: kind(_value(widget)) for key, (widget, kind) in fields.items()}
        if self.instances is not None:
            out["concept"]["threshold"] = float(self.instances.threshold_spin.value())
        return out

    def apply(self, settings: dict) -> None:
        """Set the fields (the sections pass them on to the session as the user's edits)."""
        if settings.get("model"):
            self.model.model_edit.setText(str(settings["model"]))
        device = settings.get("device")
        if device and self.model.device_combo.findText(device) >= 0:
            self.model.device_combo.setCurrentText(device)
        if "cache" in settings:
            self.cache.cache_edit.setText(settings.get("cache") or "")
        if settings.get("tiling"):
            tile, overlap = (int(v) for v in settings["tiling"])
            self.cache.tile_spin.setValue(tile)
            self.cache.overlap_spin.setValue(overlap)
        post = settings.get("postprocess") or {}
        if "max_hole_area" in post:
            self.post.max_hole_area.setValue(int(post["max_hole_area"]))
        if "max_sprinkle_area" in post:
            self.post.max_sprinkle_area.setValue(int(post["max_sprinkle_area"]))
        if "overwrite" in post:
            self.post.overwrite_checkbox.setChecked(bool(post["overwrite"]))
        for group, fields in self._fields().items():
            values = settings.get(group) or {}
            for key, (widget, kind) in fields.items():
                if key in values and values[key] is not None:
                    _set_value(widget, kind(values[key]))
        threshold = (settings.get("concept") or {}).get("threshold")
        if self.instances is not None and threshold is not None:
            # the slider follows, the last concept result (another run) is not re-filtered
            i = self.instances
            for widget, value in ((i.threshold_spin, float(threshold)),
                                  (i.threshold_slider, round(float(threshold) * 1000))):
                widget.blockSignals(True)
                try:
                    widget.setValue(value)
                finally:
                    widget.blockSignals(False)


def _value(widget):
    """A settings field's value: a combo box's or line edit's text, a spin box's value."""
    from qtpy.QtWidgets import QComboBox, QLineEdit

    if isinstance(widget, QComboBox):
        return widget.currentText()
    if isinstance(widget, QLineEdit):
        return widget.text()
    return widget.value()


def _set_value(widget, value) -> None:
    from qtpy.QtWidgets import QComboBox, QLineEdit

    if isinstance(widget, QComboBox):
        if widget.findText(value) >= 0:  # (a direction this version does not know: kept)
            widget.setCurrentText(value)
    elif isinstance(widget, QLineEdit):
        widget.setText(value)
    else:
        widget.setValue(value)


def source_path(layer) -> str | None:
    """The file an image layer was read from (napari's ``source.path``), if any."""
    path = getattr(getattr(unwrap(layer), "source", None), "path", None)
    return None if not path else str(path)


def image_ref(layer) -> dict:
    """Path, name, shape, dtype and RGB of an image layer (no fingerprint: a worker's)."""
    raw = unwrap(layer)
    data = level0(raw)
    limits = None if raw.rgb else [float(v) for v in raw.contrast_limits]
    return {"path": source_path(raw), "name": raw.name,
            "shape": [int(s) for s in data.shape], "dtype": str(np.dtype(data.dtype)),
            "rgb": bool(raw.rgb), "contrast_limits": limits}


def restore_contrast(layer, ref: dict) -> None:
    """Give the image layer the contrast limits the session was made with: the widget
    normalises with them, so the same tiles (and cache entries) are found again."""
    limits = ref.get("contrast_limits")
    raw = unwrap(layer)
    if limits and not raw.rgb and [float(v) for v in raw.contrast_limits] != list(limits):
        lo, hi = (float(v) for v in limits)
        low, high = (float(v) for v in raw.contrast_limits_range)
        if lo < low or hi > high:  # napari keeps limits inside the range
            raw.contrast_limits_range = (min(lo, low), max(hi, high))
        raw.contrast_limits = (lo, hi)


def points_record(layer) -> dict | None:
    if layer is None:
        return None
    n = len(layer.data)
    data = np.asarray(layer.data, float).reshape(n, layer.ndim)
    return {"name": layer.name, "data": data.tolist(),
            "object_id": layer_data.feature_column(layer.features, "object_id", n, 0)
            .astype(int).tolist(),
            "positive": layer_data.feature_column(layer.features, "positive", n, True)
            .astype(bool).tolist()}


def boxes_record(layer) -> dict | None:
    if layer is None:
        return None
    n = len(layer.data)
    return {"name": layer.name, "data": [np.asarray(d, float).tolist() for d in layer.data],
            "shape_type": [str(t) for t in layer.shape_type],
            "object_id": layer_data.feature_column(layer.features, "object_id", n, 0)
            .astype(int).tolist()}


def paint_regions(event, ndim: int) -> list[tuple]:
    """The bounding boxes (tuples of slices) of a napari Labels paint event's edits, per
    slice (NumPy-index atoms of napari 0.5 and masked atoms of napari 0.9 alike)."""
    from .provenance_log import changed_boxes

    atoms = getattr(event, "value", None) or []
    return [tuple(slice(v, v + 1) for v in lead) + (slice(b[0], b[2]), slice(b[1], b[3]))
            for lead, b in changed_boxes(atoms, ndim).items()]


def restore_prompts(points, boxes, record: dict) -> None:
    """Fill the (empty) points and boxes layers with a session record's prompts."""
    import pandas as pd

    rec = record.get("points") or {}
    if points is not None and rec.get("data"):
        points.data = np.asarray(rec["data"], float)
        points.features = pd.DataFrame({"object_id": np.asarray(rec["object_id"], int),
                                        "positive": np.asarray(rec["positive"], bool)})
        prompt_layers.recolor(points, "face_color")
    rec = record.get("boxes") or {}
    if boxes is not None and rec.get("data"):
        boxes.add([np.asarray(d, float) for d in rec["data"]],
                  shape_type=list(rec["shape_type"]))
        boxes.features = pd.DataFrame({"object_id": np.asarray(rec["object_id"], int)})


def find_image(viewer, current, ref: dict):
    """The session's image (``ref``): a layer of ``viewer`` with its path (or name), else
    opened from its path, else ``current`` (the chosen image) when no path was recorded
    and its shape is the same; else :class:`~.errors.UserError`."""
    from napari.layers import Image

    from ..core.session_folder import same_image_ref

    images = [ly for ly in viewer.layers if isinstance(unwrap(ly), Image)]
    for layer in images:
        if same_image_ref(ref, image_ref(layer)):
            return layer
    path = ref.get("path")
    if path and Path(path).exists():
        opened = viewer.open(path)
        found = [ly for ly in opened if isinstance(unwrap(ly), Image)]
        if found:
            return found[0]
    if current is not None and not path and image_ref(current)["shape"] == list(
            ref.get("shape", [])):
        return current
    where = f" ({path})" if path else ""
    raise UserError(f"the session's image '{ref.get('name')}'{where} is not open and "
                    "cannot be found: open it, then open the session again")


def find_channels(viewer, image, record: dict, report) -> list:
    """``(layer, ref)`` of the session's extra channel layers (``settings["channels"]``),
    found like its image (by path or name, else opened from their path); one that cannot
    be found, or has another shape than ``image``, is left out with a warning."""
    found = []
    for ref in (record.get("settings") or {}).get("channels") or []:
        try:
            layer = find_image(viewer, None, ref)
        except UserError as exc:
            report(f"SAM3: {exc} (the session opens without that channel)", "warning")
            continue
        if image_ref(layer)["shape"] != image_ref(image)["shape"]:
            report(f"SAM3: channel '{ref.get('name')}' has another shape than the image: "
                   "the session opens without it", "warning")
            continue
        found.append((layer, ref))
    return found


def restore_channels(binder, image, channels: list) -> None:
    """Make ``image`` with the ``(layer, ref)`` channels still open the model's input, each
    channel with its recorded contrast limits."""
    channels = [(ly, ref) for ly, ref in channels if binder.alive(ly)]
    if channels:
        for layer, ref in channels:
            restore_contrast(layer, ref)
        binder.channels = [image, *(ly for ly, _ in channels)]
        binder.role_changed.emit("channels")


def distinct_regions(regions: list) -> list:
    """``regions`` (tuples of slices: unhashable) without repeats, in order."""
    out = []
    for r in regions:
        if r not in out:
            out.append(r)
    return out
