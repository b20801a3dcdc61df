"""IMAGE as the commands take it: a 2D image or a stack, lazy where it was, and the
options that say how to read it (--axis, --limits, --tile/--overlap, --region)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import CliError


class _AsUint8:
    """A lazy boolean array read as uint8 (percentiles and the model need numbers)."""

    def __init__(self, arr):
        import numpy as np

        self.arr, self.shape, self.dtype = arr, tuple(arr.shape), np.dtype(np.uint8)
        self.ndim = len(self.shape)
        self.chunks = getattr(arr, "chunks", None)

    def __getitem__(self, key):
        import numpy as np

        return np.asarray(self.arr[key]).astype(np.uint8)

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


@dataclass
class Input:
    """IMAGE as read: a 2D image (``plane``) or a stack (``frames``), lazy where it was."""

    path: str
    data: Any  # the array as read (NumPy, or Zarr read lazily)
    plane_shape: tuple  # (Y, X) of one image/slice
    plane: Any = None  # 2D: the (Y, X[, C]) image
    frames: Any = None  # stack: propagation.StackFrames
    axis: int = 0
    fixed: dict | None = None

    @property
    def is_stack(self) -> bool:
        return self.frames is not None

    @property
    def depth(self) -> int:
        return len(self.frames) if self.frames is not None else 1

    @property
    def labels_shape(self) -> tuple:
        """(Y, X), or (Z, Y, X) for a stack: the shape of its label image."""
        return (self.depth, *self.plane_shape) if self.is_stack else tuple(self.plane_shape)

    def describe(self) -> str:
        h, w = self.plane_shape
        return f"{self.depth}x{h}x{w} stack" if self.is_stack else f"{h}x{w} image"


def read_image(path: str):
    """``io.read_image``; an unreadable file is one error line."""
    from ..core import io

    try:
        return io.read_image(path)
    except io.ImageReadError as e:
        raise CliError(e) from None


def read_for_workers(path: str):
    """IMAGE for dask workers: a TIFF or Zarr file as a ``FileImage`` (workers read their
    own tiles from it), anything else as ``read_image`` gives it (scattered once)."""
    from pathlib import Path

    from ..core import io

    suffix = Path(path).suffix.lower()
    if suffix not in io.TIF_SUFFIXES + io.ZARR_SUFFIXES or not Path(path).exists():
        return read_image(path)  # its errors, as without workers
    from ..core.distributed import FileImage

    try:
        return FileImage(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is one line
        raise CliError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None


def load_input(path: str, axis: int | None = None, for_workers: bool = False) -> Input:
    """Read IMAGE: 2D (Y, X) or (Y, X, C) with C <= 4, or a stack with leading axes.

    Leading axes of length 1 are dropped (fixed at index 0); one other leading axis is
    the stack axis. Zarr arrays stay lazy: nothing is read here but metadata; with
    ``for_workers`` TIFF files too (see :func:`read_for_workers`).
    """
    import numpy as np

    from ..core.propagation import StackFrames

    data = read_for_workers(path) if for_workers else read_image(path)
    shape = tuple(int(s) for s in data.shape)
    kind = getattr(getattr(data, "dtype", None), "kind", None)
    if kind not in ("b", "u", "i", "f"):
        raise CliError(f"image {path!r} has unsupported data type {getattr(data, 'dtype', '?')}")
    if 0 in shape:
        raise CliError(f"image {path!r} is empty (shape {shape})")
    if kind == "b":
        data = data.astype(np.uint8) if isinstance(data, np.ndarray) else _AsUint8(data)
    rgb = len(shape) >= 3 and shape[-1] in (2, 3, 4)
    n_lead = len(shape) - (3 if rgb else 2)
    lead = shape[:n_lead]
    plane_shape = shape[n_lead : n_lead + 2]
    long_axes = [a for a, s in enumerate(lead) if s > 1]
    if axis is None:
        if len(long_axes) > 1:
            raise CliError(
                f"image {path!r} has shape {shape}: segment takes a 2D image (Y, X) or (Y, X, C) "
                "with 2-4 channels last, or a 3D stack (Z, Y, X) or (Z, Y, X, C); this one has "
                f"{len(long_axes)} stack axes ({', '.join(map(str, long_axes))})"
            )
        if not long_axes:  # 2D, maybe with leading axes of length 1
            if not lead:
                plane = data
            elif isinstance(data, np.ndarray):
                plane = data[(0,) * n_lead]
            else:
                plane = StackFrames(data, 0, {a: 0 for a in range(1, n_lead)}, rgb=rgb)[0]
            return Input(path, data, plane_shape, plane=plane)
        axis = long_axes[0]
    else:
        if not lead:
            raise CliError(
                f"--axis {axis}: image {path!r} is a 2D image of shape {shape}, not a stack"
            )
        if not -n_lead <= axis < n_lead:
            raise CliError(
                f"--axis {axis} is not a stack axis of image {path!r} with shape {shape} "
                f"(stack axes: {', '.join(map(str, range(n_lead)))})"
            )
        axis %= n_lead
        others = [a for a in long_axes if a != axis]
        if others:
            raise CliError(
                f"image {path!r} has shape {shape}: axes {', '.join(map(str, others))} besides "
                f"--axis {axis} are longer than 1; segment takes one stack axis"
            )
    fixed = {a: 0 for a in range(n_lead) if a != axis}
    frames = StackFrames(data, axis, fixed, rgb=rgb)
    return Input(path, data, plane_shape, frames=frames, axis=axis, fixed=fixed)


def input_from_args(args, image: str | None = None) -> Input:
    """IMAGE (or ``image`` of a batch) along --axis, once --limits and --tile/--overlap
    are known to be usable; read lazily for dask workers with --scheduler."""
    inp = load_input(args.image if image is None else image, args.axis,
                     for_workers=getattr(args, "scheduler", None) is not None)
    _check_limits(args.limits)
    _check_tiling(args)
    return inp


def resolve_limits(inp: Input, limits):
    """One set of intensity limits for every tile and slice (read from a sample)."""
    from ..core.normalize import image_limits
    from ..core.propagation import stack_limits

    try:
        return stack_limits(inp.frames, limits) if inp.is_stack else image_limits(inp.plane, limits)
    except Exception as e:  # noqa: BLE001 - e.g. a corrupt Zarr chunk
        raise CliError(f"cannot read image {inp.path!r}: {type(e).__name__}: {e}") from None


def _check_limits(limits) -> None:
    if limits is not None and not limits[0] < limits[1]:
        raise CliError(f"--limits {limits[0]:g} {limits[1]:g}: LOW must be below HIGH")


def _check_tiling(args) -> None:
    if args.tile is not None and args.overlap is not None and args.overlap >= args.tile:
        raise CliError(f"--overlap {args.overlap} must be smaller than --tile {args.tile}")


def check_region(region, shape) -> tuple[int, int, int, int] | None:
    """--region R0 C0 R1 C1 inside an image of ``shape`` (Y, X), or None for all of it."""
    if region is None:
        return None
    r0, c0, r1, c1 = region
    h, w = shape
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise CliError(
            f"--region {r0} {c0} {r1} {c1} is outside the {h}x{w} image or empty: need "
            f"0 <= R0 < R1 <= {h} and 0 <= C0 < C1 <= {w}"
        )
    return r0, c0, r1, c1
