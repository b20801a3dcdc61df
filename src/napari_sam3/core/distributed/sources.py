"""What tasks on dask workers get: how to build the model (a :class:`ModelSpec`, loaded
once per worker process) and the image (a file path, or an array scattered once).

No image pixels go through the scheduler for file-backed images: a :class:`FileImage`
pickles as its path and opens the file lazily where it is read, so each worker reads
its own tiles from the TIFF, Zarr or OME-Zarr file (on a filesystem every worker sees).
A NumPy array is scattered to the workers once per run; other array-likes (Zarr, dask)
travel as themselves (a Zarr array pickles as its store and path).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..planes import PlaneView

#: Bound of each worker model's in-memory LRU (its tiles are in the shared store).
WORKER_CACHE_BYTES = 256 << 20


class FileImage:
    """An image file read lazily, tile by tile: Zarr / OME-Zarr (full resolution) or
    TIFF (memory map when uncompressed, else chunk by chunk). Picklable as its path."""

    def __init__(self, path):
        self.path = str(Path(path).resolve())
        self._arr = None
        arr = self._array()
        self.shape, self.dtype = tuple(int(s) for s in arr.shape), np.dtype(arr.dtype)
        self.ndim = len(self.shape)

    def _array(self):
        if self._arr is None:
            if Path(self.path).suffix.lower() in (".tif", ".tiff"):
                from ..lazy_pyramid import open_lazy

                self._arr = open_lazy(self.path)[0]
            else:
                from ..io import read_image

                self._arr = read_image(self.path)
        return self._arr

    def __getitem__(self, key):
        return np.asarray(self._array()[key])

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self):
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype, "ndim": self.ndim}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arr = None

    def __repr__(self) -> str:
        return f"FileImage({self.path!r}, shape={self.shape}, dtype={self.dtype})"


def split(image) -> tuple[object, tuple]:
    """(the array behind ``image``, its plane index): a plane of a stack is shipped as
    the stack (once) and its index."""
    if isinstance(image, PlaneView):
        return image.data, image.lead
    return image, ()


def ship(client, image) -> tuple[object, tuple]:
    """``(data, lead)`` to pass to tasks: a NumPy array scattered once (a future), other
    array-likes as they are."""
    data, lead = split(image)
    if isinstance(data, np.ndarray) and not isinstance(data, np.memmap):
        [data] = client.scatter([data], hash=False)
    return data, lead


def plane(data, lead: tuple):
    """The image a task works on, from what :func:`ship` gave."""
    return data if not lead else PlaneView(data, lead)


# -- the model on a worker ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """How to build the client's model on a worker (equal specs share one model)."""

    kind: str  # "tracker" (Sam3Segmenter) or "concept" (ConceptSegmenter)
    model: str  # an absolute checkpoint folder (seen by every worker) or a hub id
    device: str
    dtype: str
    cache: str | None  # the shared embedding store's folder
    cache_dtype: str
    tile_size: int
    overlap: int
    exact_dtype: bool = False


def spec_of(model, kind: str = "tracker", device: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a loaded ``Sam3Segmenter`` / ``ConceptSegmenter``."""
    from ..model import resolve_model

    store = model.store
    path = None if store is None or store.path is None else str(Path(store.path).resolve())
    return ModelSpec(kind, resolve_model(model.model_id).location, device or model.device,
                     str(model.dtype).replace("torch.", ""), path,
                     store.storage_dtype.name if store is not None else "float16",
                     int(model.tile_size), int(model.overlap), bool(model.exact_dtype))


_MODELS: dict[ModelSpec, object] = {}
_LOCK = threading.Lock()


#: Set in a worker's environment: torch threads for its tasks (else the worker's threads).
TORCH_THREADS_ENV = "NAPARI_SAM3_WORKER_TORCH_THREADS"


def worker_threads() -> int | None:
    """The torch threads for the dask worker running this task (None outside one): the
    worker's thread count, or :data:`TORCH_THREADS_ENV` where the cluster set it."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    override = os.environ.get(TORCH_THREADS_ENV, "")
    if override.isdigit() and int(override) > 0:
        return int(override)
    state = getattr(worker, "state", None)
    return int(getattr(state, "nthreads", None) or worker.nthreads)


def worker_model(spec: ModelSpec):
    """The model of ``spec`` in this process, loaded on first use; torch's threads set to
    the worker's thread count (two workers on one machine do not fight over cores)."""
    with _LOCK:
        found = _MODELS.get(spec)
        if found is not None:
            return found
        threads = worker_threads()
        from ..torch_import import prepare_torch_import

        prepare_torch_import()
        import torch

        if threads:
            torch.set_num_threads(threads)
        found = _load(spec)
        _MODELS[spec] = found
        return found


def _load(spec: ModelSpec):
    options = dict(device=spec.device, dtype=spec.dtype, cache=spec.cache,
                   cache_dtype=spec.cache_dtype, cache_bytes=WORKER_CACHE_BYTES,
                   tile_size=spec.tile_size, overlap=spec.overlap)
    if spec.kind == "concept":
        from ..concept import ConceptSegmenter

        model = ConceptSegmenter.from_pretrained(spec.model, **options)
    else:
        from ..segmenter import Sam3Segmenter

        model = Sam3Segmenter.from_pretrained(spec.model, **options)
    model.exact_dtype = spec.exact_dtype
    return model
