"""npe2 single-layer writers for labels layers (thin wrappers around :mod:`napari_sam3.core.io`).

napari's save dialog has already asked before replacing a file, so these overwrite.
Labels of any dimensionality napari holds (2 to 5 axes, OME-NGFF's t, c, z, y, x) are
written, axes named from the layer's ``axis_labels`` when those are NGFF names.

A writer that cannot write raises :class:`LabelsWriteError` (an ``OSError``), which
napari shows to the user: npe2 takes a ``ValueError`` from a writer for "no writer
found", and napari then only says that no plugin could write the layer.
"""

from __future__ import annotations

from typing import Any

from .core import io


class LabelsWriteError(OSError):
    """The labels cannot be written; the message says why."""


def _target(path: str, suffixes: tuple[str, ...]) -> str:
    """Append the default suffix when ``path`` has none of ``suffixes``."""
    return path if path.lower().endswith(suffixes) else path + suffixes[0]


def _level0(data: Any, meta: dict) -> Any:
    """Full-resolution array of a (possibly multiscale) labels layer."""
    if meta.get("multiscale") and isinstance(data, list | tuple):
        return data[0]
    return data


def _write(func, path: str, data: Any, meta: dict, suffixes, **kwargs) -> list[str]:
    from .core.pyramid import wait_for_writes

    wait_for_writes()  # a commit's pyramid writes may still be landing
    data = _level0(data, meta)
    try:
        axes = io.label_axes(len(data.shape), meta.get("axis_labels"))
        return [func(_target(path, suffixes), data, overwrite=True, axes=axes, **kwargs)]
    except ValueError as e:
        raise LabelsWriteError(f"SAM3: cannot save '{meta.get('name', 'labels')}' to "
                               f"{path}: {e}") from None


#: Key of a layer's ``metadata`` holding its provenance (a ``Provenance`` or its dict),
#: written with the labels: OUT.tif.json beside a TIFF, the Zarr group's attributes.
PROVENANCE_KEY = "napari_sam3_provenance"


def _provenance(meta: dict) -> dict | None:
    record = (meta.get("metadata") or {}).get(PROVENANCE_KEY)
    return record.to_dict() if hasattr(record, "to_dict") else record


def write_labels_tif(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer to a compressed TIFF (see :func:`io.write_labels_tif`), with
    its provenance in OUT.tif.json; a sidecar of ours left from earlier labels, which no
    longer describes the file, is removed. A file of that name that is not ours is never
    touched (the provenance is then not written; a warning says so)."""
    import json
    import warnings
    from pathlib import Path

    from .core.provenance import SCHEMA

    written = _write(io.write_labels_tif, path, data, meta, io.TIF_SUFFIXES)
    side = Path(written[0] + ".json")
    ours = not (side.exists() or side.is_symlink())
    if side.is_file():
        try:
            ours = json.loads(side.read_text(encoding="utf-8")).get("schema") == SCHEMA
        except (OSError, ValueError, AttributeError):
            ours = False
    record = _provenance(meta)
    if not ours:
        if record is not None:
            warnings.warn(f"SAM3: {side} exists and is not a provenance record of ours: it "
                          "was kept, and the labels' provenance was not written", stacklevel=2)
        return written
    if record is not None:
        side.write_text(json.dumps(record, indent=1), encoding="utf-8")
    elif side.is_file():
        side.unlink()
    return written


def _label_colors(data, meta: dict) -> dict | None:
    """``{value: rgba}`` of every label value in ``data`` (read plane by plane), in the
    layer's colormap; None without one."""
    import numpy as np

    cmap = meta.get("colormap")
    if cmap is None or not hasattr(cmap, "map"):
        return None
    values: set[int] = set()
    planes = np.ndindex(*data.shape[:-2]) if len(data.shape) > 2 else [()]
    for lead in planes:
        values.update(int(v) for v in np.unique(np.asarray(data[lead])) if v != 0)
    if not values:
        return {}
    order = sorted(values)
    rgba = np.asarray(cmap.map(np.asarray(order, dtype=np.int64)), dtype=float).reshape(-1, 4)
    return {v: tuple(float(c) for c in rgba[i]) for i, v in enumerate(order)}


def write_ngff_labels_layer(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer as the NGFF label image ``IMAGE.zarr/labels/NAME`` (see
    :func:`core.ngff.write_ngff_labels`): the image's levels, its provenance and the
    layer's colours. Replaces NAME only when it is a label image of ours."""
    from .core import ngff
    from .core.pyramid import wait_for_writes

    wait_for_writes()
    from .core.provenance import Provenance

    image, name = ngff.labels_target(path)
    level0 = _level0(data, meta)
    record = _provenance(meta)
    if record is not None:  # (a Provenance gives the NGFF properties of each label)
        record = Provenance.from_dict(record)
    try:
        return [ngff.write_ngff_labels(image, name, level0, record, overwrite=True,
                                       colors=_label_colors(level0, meta))]
    except (ValueError, FileExistsError) as e:
        raise LabelsWriteError(f"SAM3: cannot save '{meta.get('name', 'labels')}' to "
                               f"{path}: {e}") from None


def write_labels_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer to an OME-NGFF-style Zarr (see :func:`io.write_labels_zarr`),
    its provenance in the group's ``napari_sam3`` attributes; into an OME-Zarr image's
    ``labels/NAME`` as its NGFF label image (:func:`write_ngff_labels_layer`)."""
    from .core.ngff import labels_target

    if labels_target(path) is not None:
        return write_ngff_labels_layer(path, data, meta)
    scale = meta.get("scale")
    if scale is not None and len(scale) != len(_level0(data, meta).shape):
        scale = None
    written = _write(io.write_labels_zarr, path, data, meta, io.ZARR_SUFFIXES,
                     name=meta.get("name"), scale=scale)
    if (record := _provenance(meta)) is not None:
        import zarr

        group = zarr.open_group(written[0], mode="r+")
        group.attrs["napari_sam3"] = {**group.attrs.get("napari_sam3", {}),
                                      "provenance": record}
    return written


def save_labels_layer(layer, path: str) -> list[str]:
    """Save a napari Labels layer with our writers (by ``path``'s suffix; ``IMAGE.zarr/
    labels/NAME`` of an OME-Zarr image: its NGFF label image): what the widget's *Save
    labels* does, whatever napari's File > Save would pick."""
    from .core.ngff import labels_target

    data, meta, _ = layer.as_layer_data_tuple()
    lower = str(path).lower()
    if labels_target(path) is not None:
        return write_ngff_labels_layer(str(path), data, meta)
    if lower.endswith(io.ZARR_SUFFIXES):
        return write_labels_zarr(str(path), data, meta)
    if lower.endswith(io.TIF_SUFFIXES):
        return write_labels_tif(str(path), data, meta)
    raise LabelsWriteError(f"SAM3: save labels as .tif or .zarr, not {path}")
