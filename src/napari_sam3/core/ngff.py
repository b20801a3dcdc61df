"""OME-NGFF labels beside their image: ``IMAGE.zarr/labels/NAME``.

:func:`write_ngff_labels` writes a label image into an OME-Zarr image's ``labels/``
group, as the NGFF spec lays it out and ome-zarr-py and napari-ome-zarr read it:

* one level per image level, the same axes (the image's ``c`` axis left out: one value
  per pixel), units and coordinate transformations; lower levels by nearest-neighbour
  sampling of level 0 at the levels' scale ratios;
* ``image-label`` with ``version``, ``source`` (``{"image": "../../"}``), ``colors`` and
  ``properties`` per label value; the ``labels`` group lists NAME;
* the image's NGFF version: 0.4 on Zarr v2, 0.5 on Zarr v3;
* our marker and the provenance record in the label image's ``napari_sam3`` attributes.

ome-zarr-py (``write_multiscale_labels``) writes the arrays and the NGFF metadata into a
staging group; the finished label image is then renamed into place, so NAME is never
partial. The image's own arrays and metadata are never written. An existing NAME is
refused unless ``overwrite``, and even then only a label image we wrote is replaced.

NumPy, Zarr, dask and ome-zarr-py only: no napari (colours are the caller's).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .io import LABELS_KIND

CHUNK = 1024  # chunk edge of y and x at every level; leading axes one plane a chunk


class NgffError(ValueError):
    """The image or the label name cannot take these labels; the message says why."""


def _open_group(path, mode: str = "r"):
    import zarr

    return zarr.open_group(Path(path), mode=mode)


def _meta(group) -> dict:
    from ome_zarr.writer import get_metadata

    return get_metadata(group)


def image_info(image_zarr) -> dict:
    """The image's multiscale layout: ``version``, ``zarr_format``, ``axes`` (dicts),
    ``datasets`` (path, coordinateTransformations) and level ``shapes``."""
    try:
        group = _open_group(image_zarr)
    except Exception as e:  # noqa: BLE001 - any reader failure: not an image
        raise NgffError(f"{os.fspath(image_zarr)!r} is not a Zarr group: {e}") from None
    meta = _meta(group)
    ms = meta.get("multiscales")
    if not ms:
        raise NgffError(f"{os.fspath(image_zarr)!r} is not an OME-NGFF image (no multiscales)")
    ms = ms[0]
    version = str(ms.get("version") or meta.get("version") or "0.4")
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    shapes = [tuple(int(s) for s in group[d["path"]].shape) for d in ms["datasets"]]
    if not axes:
        axes = [{"name": n} for n in "tczyx"[-len(shapes[0]):]]
    return {"version": version, "zarr_format": group.info._zarr_format, "axes": axes,
            "datasets": ms["datasets"], "shapes": shapes}


def labels_target(path) -> tuple[Path, str] | None:
    """``(image, NAME)`` when ``path`` is ``IMAGE/labels/NAME`` of an OME-NGFF image."""
    p = Path(path)
    if p.parent.name != "labels" or not p.name or p.name.startswith("."):
        return None
    image = p.parent.parent
    if not any((image / f).is_file() for f in (".zattrs", "zarr.json")):
        return None
    try:
        image_info(image)
    except NgffError:
        return None
    return image, p.name


def _keep(axes) -> list[int]:
    """The image axes a label image has: all but channels."""
    return [i for i, a in enumerate(axes) if a.get("type") != "channel" and a["name"] != "c"]


def labels_shape(image_zarr) -> tuple[int, ...]:
    """The shape of level 0 of a label image of ``image_zarr`` (its ``c`` axis left out)."""
    info = image_info(image_zarr)
    return tuple(info["shapes"][0][i] for i in _keep(info["axes"]))


def labels_shape_fits(image_zarr, shape) -> None:
    """Raise :class:`NgffError` unless labels of ``shape`` fit the image (up to axes of 1)."""
    want = labels_shape(image_zarr)
    if [s for s in shape if s != 1] != [s for s in want if s != 1]:
        raise NgffError(f"labels of shape {tuple(shape)} do not fit the image "
                        f"{os.fspath(image_zarr)!r}, whose label images are {want}")


def is_ours(label_image) -> bool:
    """True if ``label_image`` (``IMAGE/labels/NAME``) was written by napari-sam3: our
    marker and a provenance record in its attributes."""
    try:
        attrs = dict(_open_group(label_image).attrs)
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    ours = attrs.get("napari_sam3", {})
    return ours.get("kind") == LABELS_KIND and isinstance(ours.get("provenance"), dict)


def check_target(image_zarr, name: str, overwrite: bool = False) -> Path:
    """``IMAGE/labels/NAME`` if it may be written: absent, or ours with ``overwrite``."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name == "labels":
        raise NgffError(f"label name {name!r}: give a plain name, e.g. labels/cells")
    image_info(image_zarr)
    target = Path(image_zarr) / "labels" / name
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{target} already exists (pass --overwrite to replace it)")
        if not is_ours(target):
            raise FileExistsError(f"refusing to overwrite {target}: it is not a label image "
                                  "napari-sam3 wrote (no napari_sam3 provenance)")
    return target


def _scales(dataset) -> list[float] | None:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return [float(v) for v in t["scale"]]
    return None


def _sample_index(n0: int, n: int, ratio: float | None) -> np.ndarray:
    """Level-0 indices of the ``n`` pixels of a level at ``ratio`` (its pixel size over
    level 0's): the nearest-neighbour (floor) rule, clipped to the array."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        ratio = n0 / n
    return np.minimum(np.floor(np.arange(n) * ratio + 1e-9).astype(np.int64), n0 - 1)


def _levels(level0, info: dict, keep: list[int]) -> list:
    """Dask arrays of every label level, sampled from ``level0`` (dask)."""
    base = _scales(info["datasets"][0])
    out = []
    for dataset, shape in zip(info["datasets"], info["shapes"], strict=True):
        want = tuple(shape[i] for i in keep)
        level = level0
        scale = _scales(dataset)
        for axis, (n0, n) in enumerate(zip(level0.shape, want, strict=True)):
            if n0 == n:
                continue
            i = keep[axis]
            ratio = None if base is None or scale is None else scale[i] / base[i]
            key = (slice(None),) * axis + (_sample_index(n0, n, ratio),)
            level = level[key]
        out.append(level.rechunk(_chunks(want)))
    return out


def _chunks(shape) -> tuple[int, ...]:
    return (1,) * (len(shape) - 2) + tuple(min(CHUNK, int(s)) for s in shape[-2:])


def _as_dask(labels, shape: tuple[int, ...]):
    """Level 0 as an int32 dask array of ``shape`` (singleton axes added if needed)."""
    import dask.array as da

    arr = labels if isinstance(labels, da.Array) else da.from_array(
        labels, chunks=_chunks(tuple(labels.shape)), asarray=True)
    if tuple(arr.shape) != shape:
        if [s for s in arr.shape if s != 1] != [s for s in shape if s != 1]:
            raise NgffError(f"labels of shape {tuple(arr.shape)} do not fit the image, whose "
                            f"label images are {shape}")
        arr = arr.reshape(shape)  # only axes of length 1 differ
    if arr.dtype != np.int32:
        if not np.can_cast(arr.dtype, np.int32):
            raise NgffError(f"labels of dtype {arr.dtype} do not fit int32")
        arr = arr.astype(np.int32)
    return arr


def ngff_colors(colors) -> list[dict] | None:
    """``{value: (r, g, b, a)}`` (0-1 floats) as NGFF ``colors`` (0-255 integers)."""
    if colors is None:
        return None
    if isinstance(colors, list):
        return colors
    return [{"label-value": int(v),
             "rgba": [int(round(float(c) * 255)) for c in rgba]}
            for v, rgba in sorted(colors.items()) if int(v) != 0]


def write_ngff_labels(image_zarr, name: str, labels, provenance=None, overwrite: bool = False,
                      *, colors=None, properties=None) -> str:
    """Write ``labels`` (level 0: NumPy, Zarr or dask, the image's shape without ``c``;
    or a list of levels, used as given when their shapes are the image levels') as
    ``IMAGE/labels/NAME`` with one level per image level; returns its path.

    ``provenance``: a ``Provenance`` (or its dict), stored with the labels and what
    marks them ours; ``colors``: ``{value: (r, g, b, a)}`` in 0-1 or NGFF ``colors``;
    ``properties``: NGFF ``properties`` (default: from the provenance, areas left out).
    Raises :class:`NgffError` or ``FileExistsError`` before writing anything.
    """
    from ome_zarr.format import format_from_version
    from ome_zarr.writer import add_metadata, write_multiscale_labels

    image_zarr = Path(image_zarr)
    target = check_target(image_zarr, name, overwrite)
    info = image_info(image_zarr)
    keep = _keep(info["axes"])
    given = list(labels) if isinstance(labels, list | tuple) else [labels]
    level0 = _as_dask(given[0], tuple(info["shapes"][0][i] for i in keep))
    fmt = format_from_version(info["version"])
    if fmt.zarr_format != info["zarr_format"]:
        raise NgffError(f"{image_zarr} is Zarr v{info['zarr_format']} but says NGFF "
                        f"{info['version']}")
    record = provenance.to_dict() if hasattr(provenance, "to_dict") else provenance
    if properties is None and provenance is not None and hasattr(provenance, "label_properties"):
        properties = provenance.label_properties()
    label_meta = {"source": {"image": "../../"}}
    if (c := ngff_colors(colors)) is not None:
        label_meta["colors"] = c
    if properties is not None:
        label_meta["properties"] = properties
    axes = [info["axes"][i] for i in keep]
    units = {a["name"]: a["unit"] for a in axes if a.get("unit")}
    # units go separately (ome-zarr-py drops them from axis dicts); dicts give v3 arrays
    # their dimension names
    axes = [{k: v for k, v in a.items() if k != "unit"} for a in axes]
    transforms = [[{**t, t["type"]: [t[t["type"]][i] for i in keep]}
                   if t.get("type") in ("scale", "translation") else t
                   for t in d.get("coordinateTransformations", [])] for d in info["datasets"]]
    pyramid = _levels(level0, info, keep)
    if len(given) == len(pyramid) and all(tuple(g.shape) == tuple(lv.shape)
                                          for g, lv in zip(given, pyramid, strict=True)):
        pyramid = [_as_dask(g, tuple(lv.shape)).rechunk(lv.chunksize)  # levels as given
                   for g, lv in zip(given, pyramid, strict=True)]
    labels_dir = image_zarr / "labels"
    _open_group(image_zarr, "r+").require_group("labels")
    tmp = Path(tempfile.mkdtemp(prefix=f".{image_zarr.name}.{name}.napari-sam3-",
                                suffix=".partial", dir=image_zarr.absolute().parent))
    kept = False
    try:
        import zarr

        root = zarr.open_group(tmp / "root", mode="w", zarr_format=fmt.zarr_format)
        with warnings.catch_warnings():  # coordinate_transformations: to copy the image's
            warnings.simplefilter("ignore", DeprecationWarning)
            write_multiscale_labels(pyramid, root, name, fmt=fmt, axes=axes,
                                    axes_units=units or None,
                                    coordinate_transformations=transforms,
                                    storage_options=[{"chunks": lv.chunksize}
                                                     for lv in pyramid],
                                    label_metadata=label_meta)
        staged = root["labels"][name]
        staged.attrs["napari_sam3"] = {"kind": LABELS_KIND, "provenance": record or {}}
        listed = _meta(root["labels"]).get("labels", [])
        old = tmp / "old"
        if target.exists() or target.is_symlink():
            check_target(image_zarr, name, overwrite)  # may have changed meanwhile
            os.replace(target, old)
        try:
            os.replace(tmp / "root" / "labels" / name, target)
        except BaseException:
            if old.exists():
                try:
                    os.replace(old, target)
                except OSError:  # keep it: the staging folder is then not removed
                    kept = True
                    raise NgffError(f"cannot replace the label image {target}; the previous "
                                    f"one is kept at {old}") from None
            raise
        group = _open_group(labels_dir, "r+")
        names = list(_meta(group).get("labels", []))
        names += [n for n in listed if n not in names]
        extra = {} if fmt.zarr_format == 2 else {"version": fmt.version}  # 0.5 requires it
        add_metadata(group, {"labels": names, **extra}, fmt=fmt)
    finally:
        if not kept:  # never delete a previous label image that could not be put back
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return os.fspath(target)


def read_provenance(label_image) -> dict | None:
    """The provenance dict stored with a label image we wrote (NGFF or labels Zarr)."""
    try:
        attrs = dict(_open_group(label_image).attrs)
    except Exception:  # noqa: BLE001 - unreadable: none
        return None
    return attrs.get("napari_sam3", {}).get("provenance")


__all__ = ["NgffError", "write_ngff_labels", "labels_target", "labels_shape",
           "labels_shape_fits", "image_info",
           "is_ours", "check_target", "read_provenance", "ngff_colors"]
