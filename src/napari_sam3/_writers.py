"""npe2 single-layer writers for labels layers (thin wrappers around :mod:`napari_sam3.io`).

napari's save dialog has already asked before replacing a file, so these overwrite.
"""

from __future__ import annotations

from typing import Any

from . import io


def _target(path: str, suffixes: tuple[str, ...]) -> str:
    """Append the default suffix when ``path`` has none of ``suffixes``."""
    return path if path.lower().endswith(suffixes) else path + suffixes[0]


def _level0(data: Any, meta: dict) -> Any:
    """Full-resolution array of a (possibly multiscale) labels layer."""
    if meta.get("multiscale") and isinstance(data, list | tuple):
        return data[0]
    return data


def write_labels_tif(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer to a compressed TIFF (see :func:`io.write_labels_tif`)."""
    out = io.write_labels_tif(_target(path, io.TIF_SUFFIXES), _level0(data, meta), overwrite=True)
    return [out]


def write_labels_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """Write a labels layer to an OME-NGFF-style Zarr (see :func:`io.write_labels_zarr`)."""
    data = _level0(data, meta)
    scale = meta.get("scale")
    if scale is not None and len(scale) != len(data.shape):
        scale = None
    out = io.write_labels_zarr(
        _target(path, io.ZARR_SUFFIXES),
        data,
        overwrite=True,
        name=meta.get("name"),
        scale=scale,
    )
    return [out]
