"""Labels of large images, kept in a temporary Zarr folder while napari shows them.

A labels layer for an image of more than ``LARGE_PIXELS`` voxels is a Zarr array in a
folder ``napari-sam3-labels-*`` of the system's temporary folder, so it is never all in
memory. Such a folder is ours only if it has our marker file and nothing but the
marker and ``labels.zarr``; only then is it ever deleted:

- when its layer is removed from the viewer: at once if it holds no labels; else it is
  kept and a notification says where, with a *Delete* button;
- when the process ends: if it holds no labels; otherwise it is kept and one line on
  stderr says where the unsaved labels are.

"Holds labels" is read from the folder itself: Zarr writes no chunk that is all
background, so any chunk file means some pixel is labelled.

A plane of more than ``PYRAMID_PIXELS`` pixels, or a multiscale image whose labels go
to disk, gets a labels pyramid there instead (``labels.zarr`` is then a Zarr group of
levels, :class:`napari_sam3.core.pyramid.Pyramid`), shown as multiscale labels.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

LARGE_PIXELS = 1 << 24  # above this many voxels the labels live on disk (64 MiB of int32)
PYRAMID_PIXELS = 1 << 24  # above this many pixels a plane's labels are a pyramid
PREFIX = "napari-sam3-labels-"
MARKER = "napari-sam3-scratch.json"
ARRAY = "labels.zarr"
_KIND = "napari-sam3 scratch labels"


def wants_pyramid(shape: tuple, n_lead: int, image_levels=None,
                  large_pixels: int = LARGE_PIXELS, pyramid_pixels: int | None = None) -> bool:
    """True when new labels of ``shape`` should be a pyramid: a plane of more than
    ``pyramid_pixels`` pixels, or labels on disk for a multiscale image."""
    pyramid_pixels = PYRAMID_PIXELS if pyramid_pixels is None else pyramid_pixels
    plane = int(shape[-2]) * int(shape[-1])
    voxels = int(np.prod(shape, dtype=np.int64))
    return plane > pyramid_pixels or (image_levels is not None and voxels > large_pixels)


def new_labels_data(shape: tuple, n_lead: int, large_pixels: int = LARGE_PIXELS, *,
                    image_levels=None, pyramid_pixels: int | None = None):
    """Zeros for a new labels layer: NumPy up to ``large_pixels`` voxels, else a Zarr
    array (one chunk per 1024 x 1024 tile of a slice) in a new scratch folder, or a
    :class:`~napari_sam3.core.pyramid.Pyramid` there (see :func:`wants_pyramid`;
    ``image_levels``: the level shapes of a multiscale image, else None).
    Returns ``(array or Pyramid, folder or None)``; nothing of the plane's size is
    allocated for an array on disk."""
    pyramid = wants_pyramid(shape, n_lead, image_levels, large_pixels, pyramid_pixels)
    if not pyramid and int(np.prod(shape, dtype=np.int64)) <= large_pixels:
        return np.zeros(shape, np.int32), None
    import zarr

    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    (folder / MARKER).write_text(json.dumps({"kind": _KIND, "array": ARRAY}), encoding="utf-8")
    atexit.register(_at_exit, folder)
    if pyramid:
        from ..core.pyramid import QueuedPyramid

        return QueuedPyramid.create(folder / ARRAY, shape, n_lead, image_levels), folder
    chunks = (1,) * n_lead + (min(1024, shape[-2]), min(1024, shape[-1]))
    data = zarr.create_array(folder / ARRAY, shape=shape, chunks=chunks, dtype="int32",
                             fill_value=0)
    return data, folder


def is_ours(folder: Path) -> bool:
    """True for a scratch folder we made (name, marker, and nothing else in it)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        names = {p.name for p in folder.iterdir()}
    except (OSError, ValueError):
        return False
    return (folder.name.startswith(PREFIX) and isinstance(marker, dict)
            and marker.get("kind") == _KIND and names <= {MARKER, ARRAY})


def holds_labels(folder: Path) -> bool:
    """True if any pixel of the folder's labels (an array or a pyramid) is not
    background: any file but Zarr's metadata is a chunk."""
    array = Path(folder) / ARRAY
    return array.is_dir() and any(p.is_file() and p.name != "zarr.json"
                                  for p in array.rglob("*"))


def remove(folder: Path) -> bool:
    """Delete a scratch folder of ours; anything else is left alone (returns False)."""
    if not is_ours(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not Path(folder).exists()


def _at_exit(folder: Path) -> None:
    if not Path(folder).exists():
        return
    if holds_labels(folder):
        print(f"napari-sam3: unsaved labels are kept in {Path(folder) / ARRAY} "
              "(open it in napari to save them, or delete the folder)", file=sys.stderr)
    else:
        remove(folder)


class ScratchFolders:
    """The scratch folders of one viewer's labels layers; each goes with its layer.

    A removed layer's folder without labels is deleted at once. One that holds labels
    is kept, and ``offer_delete(text, delete)`` tells the user where it is and offers
    ``delete()`` (a notification with a button: it never blocks, so closing napari or
    clearing its layers does not stop on a question).
    """

    def __init__(self, layers, offer_delete):
        self._folders: dict[int, Path] = {}
        self.offer_delete = offer_delete
        layers.events.removed.connect(self._on_removed)
        self._layers = layers

    def add(self, layer, folder: Path) -> None:
        self._folders[id(getattr(layer, "__wrapped__", layer))] = Path(folder)

    def folder_of(self, layer) -> Path | None:
        return self._folders.get(id(getattr(layer, "__wrapped__", layer)))

    def disconnect(self) -> None:
        try:
            self._layers.events.removed.disconnect(self._on_removed)
        except (TypeError, ValueError, RuntimeError):
            pass

    def _on_removed(self, event) -> None:
        layer = getattr(event, "value", None)
        folder = self._folders.pop(id(getattr(layer, "__wrapped__", layer)), None)
        if folder is None or not folder.exists():
            return
        from ..core.pyramid import wait_for_writes

        wait_for_writes()  # a write still landing would make the folder hold labels
        if not holds_labels(folder):
            remove(folder)
            return
        name = getattr(layer, "name", "labels")
        self.offer_delete(
            f"SAM3: the labels of the removed layer '{name}' were kept in {folder / ARRAY} "
            "(open it in napari to save them)",
            lambda: remove(folder),
        )
