"""Reading images and writing label images (TIFF and Zarr/OME-NGFF).

Core module: no napari, Qt or torch imports, so it is cheap to import and usable
from scripts and the command line.

Label dtypes: the plugin's labels are ``int32``. ``read_labels`` returns ``int32``
whenever the stored ids fit in it (they always do for files written from int32
labels), otherwise the wider stored dtype.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ImageReadError",
    "LABEL_SUFFIXES",
    "LABELS_KIND",
    "IMAGE_SUFFIXES",
    "read_image",
    "is_labels_zarr",
    "read_labels",
    "write_labels",
    "write_labels_tif",
    "write_labels_zarr",
]

TIF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)
LABEL_SUFFIXES = TIF_SUFFIXES + ZARR_SUFFIXES
IMAGE_SUFFIXES = TIF_SUFFIXES + ZARR_SUFFIXES + (".png", ".jpg", ".jpeg", ".npy")

#: Marker of the labels Zarrs we write: group attribute ``napari_sam3.kind``.
LABELS_KIND = "napari-sam3 labels"

#: Default chunk edge along y and x for Zarr output; z is chunked one plane at a time.
DEFAULT_CHUNK_YX = 1024

_UINT16_MAX = np.iinfo(np.uint16).max
_AXES = {2: "yx", 3: "zyx", 4: "tzyx", 5: "tczyx"}  # default axis names by dimension
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_IMAGEJ_ORDER = "tzcyx"  # ImageJ hyperstacks: TZCYX(S)


class ImageReadError(ValueError):
    """An image file is missing, unsupported or unreadable."""


# --------------------------------------------------------------------- helpers


def _suffix(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower()


def _check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing path unless ``overwrite``, and even then anything but
    a labels output of the same kind: a TIFF file, or a labels Zarr we wrote. Never a
    folder holding other data (an image Zarr, a project). Returns it as a Path."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{p} already exists; pass overwrite=True to replace it")
        tif_file = p.is_file() and _suffix(p) in TIF_SUFFIXES
        if not (tif_file or (_suffix(p) in ZARR_SUFFIXES and is_labels_zarr(p))):
            raise FileExistsError(
                f"{p} exists and is not a labels output of napari-sam3: it is never replaced "
                "(choose another name)"
            )
    return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def label_axes(ndim: int, names: Sequence[str] | None = None) -> str:
    """The NGFF axis names of labels with ``ndim`` dimensions: ``names`` (e.g. a napari
    layer's ``axis_labels``) when they are distinct names out of t, c, z, y, x ending in
    y, x, in that order; otherwise yx, zyx, tzyx or tczyx."""
    if ndim not in _AXES:
        raise ValueError(
            f"labels must have 2 to 5 dimensions (OME-NGFF's t, c, z, y, x), got {ndim}"
        )
    if names is not None:
        given = "".join(str(n).lower() for n in names)
        order = "tczyx"
        if (len(given) == ndim == len(names) and given.endswith("yx") and len(set(given)) == ndim
                and all(ch in order for ch in given)
                and list(given) == sorted(given, key=order.index)):
            return given
    return _AXES[ndim]


def _check_labels(labels: Any) -> np.dtype:
    """Validate shape/dtype of a label array-like and return its (integer) dtype."""
    label_axes(len(labels.shape))
    dtype = np.dtype(labels.dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind not in "iu":
        raise ValueError(f"labels must have an integer dtype, got {dtype}")
    return dtype


def _int32_if_fits(arr: np.ndarray) -> np.ndarray:
    """Cast label ids to int32 when that is lossless, else return them unchanged."""
    if arr.dtype == np.int32:
        return arr
    if np.can_cast(arr.dtype, np.int32):
        return arr.astype(np.int32)
    if arr.size and arr.min() >= np.iinfo(np.int32).min and arr.max() <= np.iinfo(np.int32).max:
        return arr.astype(np.int32)
    return arr


# ---------------------------------------------------------------------- writers


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
) -> str:
    """Write a 2D to 5D label image, choosing the format from the suffix.

    ``.tif``/``.tiff`` -> :func:`write_labels_tif`, ``.zarr`` -> :func:`write_labels_zarr`
    (``chunks`` only applies to Zarr). Returns the written path as a string.
    """
    suffix = _suffix(path)
    if suffix in TIF_SUFFIXES:
        return write_labels_tif(path, labels, overwrite=overwrite)
    if suffix in ZARR_SUFFIXES:
        return write_labels_zarr(path, labels, chunks=chunks, overwrite=overwrite)
    raise ValueError(
        f"cannot write labels to {os.fspath(path)!r}: unsupported suffix {suffix or '(none)'!r}, "
        f"use one of {', '.join(LABEL_SUFFIXES)}"
    )


def write_labels_tif(path: str | os.PathLike, labels: Any, overwrite: bool = False, *,
                     axes: Sequence[str] | None = None) -> str:
    """Write labels to a zlib-compressed TIFF, preserving every id exactly.

    Dtype choice: if all ids are in ``0..65535`` the file is ``uint16`` written with
    ``imagej=True`` so Fiji/ImageJ opens it (ImageJ only supports uint8/uint16/float32;
    float32 would lose ids above 2**24). Otherwise (ids > 65535 or negative) it is
    ``int32`` (or the input's wider integer dtype if ids do not fit int32) as a plain
    TIFF with ``axes`` metadata, which ImageJ cannot open as a stack but tifffile,
    napari and most tools read exactly. Axes (see :func:`label_axes`) are stored in
    ImageJ's T, Z, C order for uint16, as given otherwise. The whole array is loaded
    into memory. Returns the path as a string.
    """
    import tifffile

    p = _check_target(path, overwrite)
    _check_labels(labels)
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    names = label_axes(arr.ndim, axes)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo >= 0 and hi <= _UINT16_MAX:
        order = sorted(names, key=_IMAGEJ_ORDER.index)
        data = np.transpose(arr, [names.index(a) for a in order]).astype(np.uint16, copy=False)
        kwargs: dict[str, Any] = {"imagej": True, "metadata": {"axes": "".join(order).upper()}}
    else:
        data = _int32_if_fits(arr)
        kwargs = {"metadata": {"axes": names.upper()}}
    if p.exists():
        _remove(p)
    tifffile.imwrite(p, data, compression="zlib", **kwargs)
    return os.fspath(p)


def _normalize_chunks(chunks: int | Sequence[int] | None, shape: tuple[int, ...]) -> tuple:
    ndim = len(shape)
    if chunks is None:
        requested = (1,) * (ndim - 2) + (DEFAULT_CHUNK_YX,) * 2
    elif isinstance(chunks, int | np.integer):
        requested = (int(chunks),) * ndim
    else:
        requested = tuple(int(c) for c in chunks)
        if len(requested) != ndim:
            raise ValueError(f"chunks {tuple(chunks)} do not match labels with {ndim} dimensions")
    if any(c < 1 for c in requested):
        raise ValueError(f"chunk sizes must be positive, got {requested}")
    return tuple(max(1, min(c, s)) for c, s in zip(requested, shape, strict=True))


def create_labels_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype=np.int32,
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
    *,
    name: str | None = None,
    scale: Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
):
    """An empty (all 0) labels image as a Zarr v3 OME-NGFF-style group; returns array "0".

    Group attributes carry ``multiscales`` (OME-NGFF 0.4 layout: 2 to 5 axes named by
    :func:`label_axes`, e.g. ``y, x``, ``z, y, x`` or ``t, z, y, x``, one dataset ``"0"``
    with a ``scale`` transform) plus ``image-label``;
    the same multiscales also sit under ``ome`` (0.5 layout, the one for Zarr v3), and
    ``napari_sam3.kind`` marks it as ours (:func:`is_labels_zarr`).
    Blosc/zstd compressed, chunked ``(1, 1024, 1024)``/``(1024, 1024)`` by default
    (clipped to the shape). Chunks never written stay 0 and take no disk, so the array
    can be filled region by region, far larger than memory.
    """
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    p = _check_target(path, overwrite)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    axes_names = label_axes(ndim, axes)
    chunk_shape = _normalize_chunks(chunks, shape)
    scale = [1.0] * ndim if scale is None else [float(s) for s in scale]
    if len(scale) != ndim:
        raise ValueError(f"scale {scale} does not match labels with {ndim} dimensions")
    multiscale = {
        "axes": [{"name": a, "type": _AXIS_TYPES[a]} for a in axes_names],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        ],
        "name": name or p.stem,
    }
    attrs = {
        "multiscales": [{"version": "0.4", **multiscale}],
        "image-label": {"version": "0.4"},
        "ome": {"version": "0.5", "multiscales": [multiscale], "image-label": {}},
        "napari_sam3": {"kind": LABELS_KIND},
    }
    if p.exists():
        _remove(p)
    group = zarr.open_group(p, mode="w", zarr_format=3, attributes=attrs)
    return group.create_array(
        "0",
        shape=shape,
        dtype=np.dtype(dtype),
        chunks=chunk_shape,
        compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle),
        fill_value=0,
        dimension_names=list(axes_names),
    )


def write_labels_zarr(
    path: str | os.PathLike,
    labels: Any,
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
    *,
    name: str | None = None,
    scale: Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
) -> str:
    """Write labels as a Zarr v3 OME-NGFF-style image (see :func:`create_labels_zarr`).

    The array is ``int32`` (or the input's wider integer dtype if it cannot be cast
    losslessly). Non-numpy inputs (dask, zarr, memmaps) are written one chunk at a
    time, so they never need to fit in memory. Returns the path.
    """
    src_dtype = _check_labels(labels)
    out_dtype = np.dtype(np.int32) if np.can_cast(src_dtype, np.int32) else src_dtype
    arr = create_labels_zarr(path, labels.shape, out_dtype, chunks, overwrite,
                             name=name, scale=scale, axes=axes)
    if type(labels) is np.ndarray:  # in memory already: one write
        arr[...] = labels.astype(out_dtype, copy=False)
    else:
        for region in _chunk_regions(arr.shape, arr.chunks):
            arr[region] = np.asarray(labels[region]).astype(out_dtype, copy=False)
    return os.fspath(path)


def is_labels_zarr(path: str | os.PathLike) -> bool:
    """True if ``path`` is a labels Zarr we wrote (:func:`create_labels_zarr`'s marker) that
    holds nothing else: its ``zarr.json`` and array ``0`` (metadata and chunks ``c/``)."""
    p = Path(path)
    try:
        meta = json.loads((p / "zarr.json").read_text(encoding="utf-8"))
        ours = meta.get("attributes", {}).get("napari_sam3", {}).get("kind") == LABELS_KIND
        return (
            ours
            and meta.get("node_type") == "group"
            and {c.name for c in p.iterdir()} <= {"zarr.json", "0"}
            and {c.name for c in (p / "0").iterdir()} <= {"zarr.json", "c"}
        )
    except (OSError, ValueError, AttributeError):
        return False


def _chunk_regions(shape: tuple[int, ...], chunks: tuple[int, ...]):
    """Yield tuples of slices covering ``shape`` one chunk at a time."""
    ranges = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    for starts in itertools.product(*ranges):
        yield tuple(
            slice(st, min(st + c, s)) for st, c, s in zip(starts, chunks, shape, strict=True)
        )


# ---------------------------------------------------------------------- readers


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read labels written by :func:`write_labels` (TIFF or Zarr) into memory.

    Returns ``int32`` when the ids fit (see module docstring), else the stored dtype.
    """
    suffix = _suffix(path)
    if suffix not in LABEL_SUFFIXES:
        raise ValueError(
            f"cannot read labels from {os.fspath(path)!r}: unsupported suffix "
            f"{suffix or '(none)'!r}, use one of {', '.join(LABEL_SUFFIXES)}"
        )
    return _int32_if_fits(np.asarray(read_image(path)))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _open_zarr(p: Path):
    import zarr

    node = zarr.open(p, mode="r")
    if isinstance(node, zarr.Array):
        return node
    attrs = dict(node.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if ms:
        key = ms[0]["datasets"][0]["path"]
    elif "0" in node:
        key = "0"
    else:
        raise ValueError("Zarr group has no 'multiscales' metadata and no array '0'")
    arr = node[key]
    if not isinstance(arr, zarr.Array):
        raise ValueError(f"Zarr group entry {key!r} is not an array")
    return arr


def read_image(path: str | os.PathLike) -> Any:
    """Read an image as an array-like.

    ``.tif/.tiff`` (tifffile), ``.png/.jpg/.jpeg`` (imageio) and ``.npy``
    (``allow_pickle=False``) load into numpy; ``.zarr`` returns the lazy ``zarr.Array``
    (for an OME-NGFF group, its full-resolution dataset). Raises :class:`ImageReadError`
    with a one-line reason if the file is missing, unsupported or unreadable.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.exists():
        raise ImageReadError(f"cannot read image {os.fspath(p)!r}: no such file or directory")
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(
            f"cannot read image {os.fspath(p)!r}: unsupported suffix {suffix or '(none)'!r}, "
            f"use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    try:
        if suffix in TIF_SUFFIXES:
            import tifffile

            data = tifffile.imread(p)
        elif suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif suffix in ZARR_SUFFIXES:
            data = _open_zarr(p)
        else:
            import imageio.v3 as iio

            data = iio.imread(p)
    except Exception as exc:  # any reader failure becomes one clear error
        raise ImageReadError(f"cannot read image {os.fspath(p)!r}: {_one_line(exc)}") from exc
    if len(getattr(data, "shape", ())) < 2:
        raise ImageReadError(
            f"cannot read image {os.fspath(p)!r}: expected at least 2 dimensions, "
            f"got shape {tuple(getattr(data, 'shape', ()))}"
        )
    return data
