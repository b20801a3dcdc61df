"""IMAGE as a batch: a glob pattern or a folder of images, one output each under --out DIR.

A ``.zarr`` folder (or any folder holding a Zarr ``zarr.json``/``.zgroup``/``.zarray``, as
an OME-Zarr image does) is one image, never a batch. An image whose output exists is
done: it is skipped unless --overwrite (outputs are written by rename, so an existing
one is complete).
"""

from __future__ import annotations

import glob
from pathlib import Path

from .errors import CliError

_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
FORMATS = ("zarr", "tif")


def _is_zarr(path: Path) -> bool:
    from ..core import io

    return path.suffix.lower() in io.ZARR_SUFFIXES or any(
        (path / m).is_file() for m in _ZARR_MARKERS)


def _is_image(path: Path) -> bool:
    from ..core import io

    if path.is_dir():
        return _is_zarr(path)
    return path.is_file() and path.suffix.lower() in io.IMAGE_SUFFIXES


def batch_images(image: str) -> list[Path] | None:
    """The images of a glob pattern or a folder, sorted; None when IMAGE is one image
    (or names nothing: then reading it gives the usual error)."""
    path = Path(image)
    if path.is_dir() and not _is_zarr(path):
        found = sorted(p for p in path.iterdir() if not p.name.startswith(".") and _is_image(p))
        what = f"folder {image!r}"
    elif not path.exists() and glob.has_magic(image):
        found = sorted(Path(p) for p in glob.glob(image) if _is_image(Path(p)))
        what = f"pattern {image!r}"
    else:
        return None
    if not found:
        raise CliError(f"no images in the {what} (.tif, .tiff, .png, .jpg, .npy, .zarr)")
    return found


def stem(path: Path) -> str:
    """The output name of an image: its name without suffixes (``a.ome.zarr`` -> ``a``)."""
    name = path.name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def batch_outputs(images: list[Path], out_dir: str | None, fmt: str | None) -> list[Path]:
    """One output path per image under ``out_dir`` (created), named after the image."""
    if out_dir is None:
        raise CliError("--out DIR is required: a folder for one output per image")
    out = Path(out_dir)
    if out.suffix.lower() in (".tif", ".tiff", ".zarr") or out.is_file():
        raise CliError(f"--out {out_dir!r}: a folder or glob IMAGE needs a folder for its "
                       "outputs (choose their format with --out-format tif|zarr)")
    names = [f"{stem(p)}.{fmt or FORMATS[0]}" for p in images]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CliError(f"two images would both be written to {out / dup}: rename one")
    out.mkdir(parents=True, exist_ok=True)
    return [out / n for n in names]
