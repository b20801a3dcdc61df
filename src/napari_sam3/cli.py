"""Command line: ``napari-sam3 segment | precompute | cache | view``.

* ``segment``: labels from point/box prompts on a 2D image, on chosen slices of a
  3D stack, or propagated through a stack (``--propagate``), written to TIFF or
  Zarr (OME-NGFF). Zarr inputs are read lazily, tile by tile; Zarr outputs are
  written region by region, so neither has to fit in memory. With ``--text`` and/or
  ``--exemplars`` (SAM3's concept detector) or ``--everything`` (a grid of point
  prompts) instead of ``--prompts``, every instance is segmented, tile by tile and
  slice by slice, and its score written too (OUT.csv next to a TIFF, the Zarr labels
  group's ``napari_sam3`` attributes).
* ``precompute``: fill the Zarr embedding cache for an image or a stack, so later
  clicks (CLI or napari) only run the small mask decoder.
* ``cache info`` / ``cache clear``: inspect or empty an embedding cache.
* ``view``: napari with an image and the SAM3 widget.

Only the standard library, NumPy and the package's light modules are imported
here; torch/transformers are imported after the input has been validated, and
napari only by ``view``.

Exit codes: 0 success, 2 bad input (one ``napari-sam3: error: ...`` line on
stderr, nothing written), 1 an unexpected failure while segmenting or writing
(also one line; nothing written), 130 interrupted. Warnings (e.g. an unusable
cache location) are one ``napari-sam3: warning: ...`` line each; the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .model import DEFAULT_MODEL

PROG = "napari-sam3"
WIDGET_NAME = "SAM3 segmentation"
SCREENSHOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_HEADLESS_QPA = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb")
_MAX_ID = 2**31 - 1  # labels are int32
_DIRECTIONS = ("forward", "backward", "both")  # as propagation.DIRECTIONS (not imported: light)
_MEMORY_ONLY = "; embeddings are kept in memory only"
_DEFAULT_THRESHOLD = 0.5  # concept.DEFAULT_THRESHOLD (not imported: light)
_CONCEPT_ONLY = ("threshold", "concept_model")
_EVERYTHING_ONLY = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
)


class CliError(Exception):
    """Reported as one line on stderr; ``status`` 2 for bad input, 1 for a failed run."""

    status = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``napari-sam3: error:`` line too."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _warn(message) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr, flush=True)


def _failed(message: str) -> CliError:
    err = CliError(message)
    err.status = 1
    return err


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of pixels, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _tile_size(text: str) -> int:
    value = _non_negative_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"a tile must be at least 16 pixels, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------- parser


def _add_model_options(p) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="M",
        help="Hugging Face model id or local checkpoint folder (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="D",
        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)",
    )


def _add_image_options(p, cache_required: bool) -> None:
    """Options that change the embeddings: cache, tiling, normalisation, stack axis."""
    if cache_required:
        p.add_argument(
            "--cache",
            required=True,
            metavar="PATH",
            help="Zarr embedding cache folder to fill; 'default' for the user cache folder",
        )
    else:
        p.add_argument(
            "--cache",
            default=None,
            metavar="PATH",
            help="Zarr embedding cache folder, reused across runs and with napari; 'default' "
            "for the user cache folder (default: none, embeddings kept in memory only)",
        )
    p.add_argument(
        "--cache-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="storage type of cached embeddings: float16 (half the disk) or float32 "
        "(exact) (default: %(default)s)",
    )
    p.add_argument(
        "--tile",
        type=_tile_size,
        metavar="N",
        default=None,
        help="tile size for large images in pixels (default: the model input, 1008 for SAM3)",
    )
    p.add_argument(
        "--overlap",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help="overlap of neighbouring tiles in pixels (default: a quarter of the tile)",
    )
    p.add_argument(
        "--limits",
        type=_finite_float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="intensity limits mapped to 0..255 for the model (default: the 0.5th and "
        "99.5th percentiles; a stack uses one pair for all slices; ignored for 8-bit RGB)",
    )
    p.add_argument(
        "--axis",
        type=_whole,
        metavar="A",
        default=None,
        help="stack axis of a 3D+ IMAGE (default: its only leading axis longer than 1, usually 0)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .embedding_store import default_cache_path
    from .everything import SETTINGS as EVERYTHING
    from .postprocess import DEFAULTS

    parser = _Parser(
        prog=PROG,
        description="SAM3 promptable segmentation of (microscopy) images and stacks.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    seg = sub.add_parser(
        "segment",
        help="segment objects (prompts, a text/exemplar concept, or everything) into labels",
        description=(
            "Write int32-compatible labels (0 background) to a .tif/.tiff or .zarr (OME-NGFF) "
            "file, in one of three modes. --prompts: one object per prompt entry; on a 3D "
            "stack each object is segmented on its 'slice', or tracked through the stack "
            "with --propagate. --text and/or --exemplars: every instance of a concept (SAM3's "
            "detector). --everything: every object, from a grid of point prompts. The last "
            "two run tile by tile on large images and slice by slice on stacks (ids unique "
            "across slices) and also write each instance's score: in the labels group's "
            "attributes (napari_sam3.instances) for .zarr, in OUT.csv next to a .tif."
        ),
        epilog=(
            "PROMPTS.json is a list with one entry per object, e.g. "
            '[{"points": [[40, 25]], "labels": [1]}, {"box": [10, 50, 30, 80]}]. '
            "Coordinates are (row, col) pixels, as in napari; labels are 1 (inside) or "
            "0 (outside) and default to 1; a box is [row0, col0, row1, col1]. Entry i gets "
            'label id i+1 unless it has an "id" (a whole number from 1). On a stack each '
            'entry needs a "slice" (0-based index along the stack axis); entries with the '
            "same id on several slices prompt one object on each of those slices. "
            "EXEMPLARS.json is a list of example boxes [row0, col0, row1, col1], or of "
            '{"box": [...], "positive": false} for counter-examples; on a stack they apply '
            "to every slice."
        ),
    )
    seg.add_argument(
        "image",
        metavar="IMAGE",
        help="2D grayscale or RGB(A) image, or a 3D stack (.tif, .tiff, .png, .jpg, .npy, "
        ".zarr; Zarr and OME-Zarr are read lazily)",
    )
    seg.add_argument(
        "--prompts",
        default=None,
        metavar="PROMPTS.json",
        help="JSON list of per-object prompts (see below)",
    )
    seg.add_argument(
        "--out",
        default=None,
        metavar="OUT",
        help="output labels: OUT.tif, OUT.tiff or OUT.zarr (required)",
    )
    _add_model_options(seg)
    _add_image_options(seg, cache_required=False)
    seg.add_argument(
        "--max-hole-area",
        type=_non_negative_int,
        metavar="N",
        default=DEFAULTS.max_hole_area,
        help="fill holes of up to N pixels in each mask; 0 = off (default: %(default)s)",
    )
    seg.add_argument(
        "--max-sprinkle-area",
        type=_non_negative_int,
        metavar="N",
        default=DEFAULTS.max_sprinkle_area,
        help="remove islands of up to N pixels; 0 = off (default: %(default)s)",
    )
    concept = seg.add_argument_group("concept segmentation (with --text and/or --exemplars)")
    concept.add_argument(
        "--text",
        default=None,
        metavar="PHRASE",
        help='segment every instance of a noun phrase, e.g. "nucleus"',
    )
    concept.add_argument(
        "--exemplars",
        default=None,
        metavar="EXEMPLARS.json",
        help="JSON list of example boxes of the objects to find (see below)",
    )
    concept.add_argument(
        "--threshold",
        type=_unit_float,
        metavar="X",
        default=None,
        help=f"keep instances scoring above X, 0 to 1 (default: {_DEFAULT_THRESHOLD})",
    )
    concept.add_argument(
        "--concept-model",
        default=None,
        metavar="M",
        help="checkpoint of SAM3's concept detector, a hub id or a local Sam3Model folder "
        "(default: --model; facebook/sam3 holds both)",
    )
    auto = seg.add_argument_group("segment everything (with --everything)")
    auto.add_argument(
        "--everything",
        action="store_true",
        help="segment every object, from a grid of point prompts on each tile",
    )
    auto.add_argument(
        "--points-per-side",
        type=_positive_int,
        metavar="N",
        default=None,
        help=f"N x N point prompts per tile (default: {EVERYTHING.points_per_side})",
    )
    auto.add_argument(
        "--points-per-batch",
        type=_positive_int,
        metavar="N",
        default=None,
        help=f"points decoded at once; more is faster, uses more memory "
        f"(default: {EVERYTHING.points_per_batch})",
    )
    auto.add_argument(
        "--pred-iou-thresh",
        type=_unit_float,
        metavar="X",
        default=None,
        help=f"keep masks with predicted IoU above X, 0 to 1 "
        f"(default: {EVERYTHING.pred_iou_thresh})",
    )
    auto.add_argument(
        "--stability-score-thresh",
        type=_unit_float,
        metavar="X",
        default=None,
        help=f"keep masks with stability score above X, 0 to 1 "
        f"(default: {EVERYTHING.stability_score_thresh})",
    )
    seg.add_argument(
        "--min-area",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help=f"drop instances of fewer than N pixels, with --everything (default: "
        f"{EVERYTHING.min_area}) or --text/--exemplars (default: 0)",
    )
    prop = seg.add_argument_group("propagation through a stack (with --propagate)")
    prop.add_argument(
        "--propagate",
        choices=_DIRECTIONS,
        default=None,
        help="track the prompted objects from their slices through the stack",
    )
    prop.add_argument(
        "--start",
        type=_whole,
        metavar="K",
        default=None,
        help="first slice to propagate through (default: 0)",
    )
    prop.add_argument(
        "--stop",
        type=_whole,
        metavar="K",
        default=None,
        help="propagate up to slice K, exclusive (default: the end of the stack)",
    )
    prop.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="N",
        default=None,
        help="stop following an object after N slices in a row with an object score below "
        "--score-threshold (default: 3)",
    )
    prop.add_argument(
        "--score-threshold",
        type=_finite_float,
        metavar="X",
        default=None,
        help="object score (logit) below which an object counts as absent on a slice (default: 0)",
    )
    seg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    seg.set_defaults(func=_cmd_segment)

    pre = sub.add_parser(
        "precompute",
        help="encode an image or stack into the embedding cache ahead of time",
        description=(
            "Encode every tile of IMAGE (every slice of a stack), or those meeting --region, "
            "into the Zarr embedding cache. Later 'segment' runs and the napari widget with "
            "the same model, cache, --cache-dtype, --tile, --overlap and --limits then skip "
            "the image encoder."
        ),
    )
    pre.add_argument("image", metavar="IMAGE", help="2D image or 3D stack (as for segment)")
    _add_model_options(pre)
    _add_image_options(pre, cache_required=True)
    pre.add_argument(
        "--region",
        type=_whole,
        nargs=4,
        metavar=("R0", "C0", "R1", "C1"),
        default=None,
        help="only the tiles meeting rows R0:R1 and columns C0:C1 (default: the whole image)",
    )
    pre.set_defaults(func=_cmd_precompute)

    cache = sub.add_parser(
        "cache",
        help="show or clear the embedding cache",
        description="Show the size of an embedding cache, or delete its entries.",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    for name, func, text in (
        ("info", _cmd_cache_info, "print the cache location, entries and size on disk"),
        ("clear", _cmd_cache_clear, "delete every cached embedding"),
    ):
        c = cache_sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument(
            "--cache",
            default="default",
            metavar="PATH",
            help=f"cache folder (default: {default_cache_path()})",
        )
        c.set_defaults(func=func)
    cache.set_defaults(func=lambda args: _usage(cache))

    view = sub.add_parser(
        "view",
        help="open napari with an image and the SAM3 widget",
        description="Open napari with IMAGE (or the synthetic cell sample) and the SAM3 widget.",
    )
    view.add_argument(
        "image", nargs="?", metavar="IMAGE", help="image to open (default: the synthetic sample)"
    )
    view.add_argument(
        "--sample", action="store_true", help="open the synthetic fluorescent-cells sample image"
    )
    view.add_argument(
        "--model",
        metavar="M",
        default=None,
        help="model id or local folder to preset in the widget",
    )
    view.add_argument(
        "--screenshot",
        metavar="PATH",
        default=None,
        help="save a screenshot of the window to PATH (.png) and exit (headless checks)",
    )
    view.set_defaults(func=_cmd_view)
    return parser


def _usage(parser) -> int:
    parser.print_help()
    return 2


def main(argv=None) -> int:
    """Entry point of the ``napari-sam3`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CliError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- images


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
class _Input:
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

    def describe(self) -> str:
        h, w = self.plane_shape
        return f"{self.depth}x{h}x{w} stack" if self.is_stack else f"{h}x{w} image"


def _load_input(path: str, axis: int | None = None) -> _Input:
    """Read IMAGE: 2D (Y, X) or (Y, X, C) with C <= 4, or a stack with leading axes.

    Leading axes of length 1 are dropped (fixed at index 0); one other leading axis is
    the stack axis. Zarr arrays stay lazy: nothing is read here but metadata.
    """
    import numpy as np

    from . import io
    from .propagation import StackFrames

    try:
        data = io.read_image(path)
    except io.ImageReadError as e:
        raise CliError(e) from None
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
            return _Input(path, data, plane_shape, plane=plane)
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
    return _Input(path, data, plane_shape, frames=frames, axis=axis, fixed=fixed)


def _resolve_limits(inp: _Input, limits):
    """One set of intensity limits for every tile and slice (read from a sample)."""
    from .normalize import image_limits
    from .propagation import stack_limits

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


# -------------------------------------------------------------------------- prompts


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


@dataclass
class _Object:
    """One entry of PROMPTS.json."""

    id: int
    slice: int | None
    prompt: Any  # ObjectPrompt


def _json_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: str, what: str):
    """The JSON value in ``path`` (NaN/Infinity refused); ``what`` names it in errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"cannot read {what} {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {what} {path!r}: {e}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise CliError(
            f"{what} {path!r} are not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except ValueError as e:
        raise CliError(f"{what} {path!r} are not valid JSON: {e}") from None


def _load_exemplars(path: str, inp: _Input) -> tuple[list[list[float]], list[int]]:
    """EXEMPLARS.json: boxes (row0, col0, row1, col1) meeting the image, and 1/0 labels."""
    data = _read_json(path, "exemplars")
    if not isinstance(data, list):
        raise CliError(
            f"exemplars {path!r} must be a JSON list of boxes [row0, col0, row1, col1], "
            f"got a JSON {_json_type(data)}"
        )
    if not data:
        raise CliError(f"exemplars {path!r} hold no boxes (an empty list)")
    h, w = inp.plane_shape
    boxes, labels = [], []
    for i, entry in enumerate(data, start=1):
        where = f"exemplars {path!r}, box {i}"
        positive = True
        if isinstance(entry, dict):
            unknown = set(entry) - {"box", "positive"}
            if unknown:
                raise CliError(
                    f"{where}: unknown key(s) {', '.join(sorted(unknown))} (use 'box' and "
                    "'positive')"
                )
            if "box" not in entry:
                raise CliError(f"{where}: an exemplar object needs a 'box'")
            positive = entry.get("positive", True)
            if not isinstance(positive, bool):
                raise CliError(
                    f"{where}: 'positive' must be true or false, got {json.dumps(positive)}"
                )
            entry = entry["box"]
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in entry)
        ):
            raise CliError(
                f"{where}: a box is 4 numbers [row0, col0, row1, col1], got {json.dumps(entry)}"
            )
        r0, c0, r1, c1 = (float(v) for v in entry)
        r0, r1, c0, c1 = min(r0, r1), max(r0, r1), min(c0, c1), max(c0, c1)
        if r1 < 0 or c1 < 0 or r0 >= h or c0 >= w:
            raise CliError(
                f"{where}: box (rows {r0:g}-{r1:g}, cols {c0:g}-{c1:g}) is outside the "
                f"{h}x{w} image"
            )
        boxes.append([r0, c0, r1, c1])
        labels.append(int(positive))
    return boxes, labels


def _load_prompts(path: str, inp: _Input) -> list[_Object]:
    """Parse PROMPTS.json into objects, each inside its image or slice."""
    import numpy as np

    from .prompts import ObjectPrompt, PromptError

    data = _read_json(path, "prompts")
    if not isinstance(data, list):
        raise CliError(
            f"prompts {path!r} must be a JSON list with one entry per object, "
            f"got a JSON {_json_type(data)}"
        )
    if not data:
        raise CliError(f"prompts {path!r} hold no objects (an empty list)")
    h, w = inp.plane_shape
    objects: list[_Object] = []
    seen: dict[tuple, int] = {}
    for i, entry in enumerate(data, start=1):
        where = f"prompts {path!r}, object {i}"
        if isinstance(entry, dict):
            entry = dict(entry)
            obj_id = entry.pop("id", i)
            if not _json_int(obj_id) or not 1 <= obj_id <= _MAX_ID:
                raise CliError(
                    f"{where}: 'id' must be a whole number from 1 to {_MAX_ID}, "
                    f"got {json.dumps(obj_id)}"
                )
            k = entry.get("slice")
            if k is not None and not _json_int(k):
                raise CliError(
                    f"{where}: 'slice' must be a whole number (a 0-based slice index), "
                    f"got {json.dumps(k)}"
                )
            if inp.is_stack:
                if k is None:
                    raise CliError(
                        f"{where}: image {inp.path!r} is a {inp.describe()}; give each "
                        f"object a 'slice' from 0 to {inp.depth - 1}, or segment a 2D image"
                    )
                if not 0 <= k < inp.depth:
                    raise CliError(
                        f"{where}: slice {k} is outside the stack of {inp.depth} slices "
                        f"(0 to {inp.depth - 1})"
                    )
            elif k not in (None, 0):
                raise CliError(
                    f"{where}: 'slice' {k} is for 3D stacks, but image {inp.path!r} is a 2D "
                    f"{h}x{w} image"
                )
        else:
            obj_id, k = i, None
        try:
            prompt = ObjectPrompt.from_dict(entry)
            coords = list(prompt.points.ravel()) + ([] if prompt.box is None else list(prompt.box))
            if not np.isfinite(coords).all():
                raise PromptError("coordinates must be finite numbers")
            prompt.check_inside((h, w))
        except PromptError as e:
            raise CliError(f"{where}: {e}") from None
        key = (k if inp.is_stack else None, obj_id)
        if key in seen:
            on = f" on slice {k}" if inp.is_stack else ""
            raise CliError(
                f"{where}: id {obj_id} is already used by object {seen[key]}{on}; "
                "give one entry per object and slice"
            )
        seen[key] = i
        objects.append(_Object(obj_id, k if inp.is_stack else None, prompt))
    return objects


def _json_type(value) -> str:
    return {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _by_slice(objects: list[_Object]) -> dict[int, dict[int, Any]]:
    """``{slice: {id: ObjectPrompt}}`` in the order of PROMPTS.json."""
    out: dict[int, dict[int, Any]] = {}
    for o in objects:
        out.setdefault(o.slice, {})[o.id] = o.prompt
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- output


def _check_output(out: str, image_path: str, overwrite: bool) -> Path:
    from . import io

    p = Path(out)
    if p.suffix.lower() not in io.LABEL_SUFFIXES:
        raise CliError(
            f"cannot write labels to {out!r}: unsupported suffix {p.suffix or '(none)'!r}, "
            f"use one of {', '.join(io.LABEL_SUFFIXES)}"
        )
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise CliError(f"{out!r} already exists (pass --overwrite to replace it)")
        if p.resolve() == Path(image_path).resolve():
            raise CliError(f"refusing to overwrite the input image {image_path!r}")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise CliError(f"cannot write {out!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {out!r}: folder {str(parent)!r} is not writable")
    return p


@contextlib.contextmanager
def _staging(out: Path):
    """A path named like OUT in a hidden sibling folder, removed on the way out."""
    tmpdir = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.absolute().parent)
    )
    try:
        yield tmpdir / out.name  # same name, so e.g. the Zarr group is named after OUT
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _commit(staged: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``staged`` output into place: never a partial OUT."""
    if out.exists() or out.is_symlink():
        if not overwrite:  # appeared while we were segmenting
            raise CliError(f"{str(out)!r} already exists (pass --overwrite to replace it)")
        if staged.is_file() and not out.is_dir():
            os.replace(staged, out)  # atomic
            return
        old = staged.parent / (out.name + ".old")  # directories cannot be replaced in one step
        os.replace(out, old)
        try:
            os.replace(staged, out)
        except BaseException:
            os.replace(old, out)
            raise
    else:
        os.replace(staged, out)


def _write_atomic(out: Path, labels, overwrite: bool) -> None:
    """Write in-memory labels next to OUT, then rename into place."""
    from . import io

    with _staging(out) as staged:
        io.write_labels(staged, labels)
        _commit(staged, out, overwrite)


class _Plane:
    """Plane ``k`` of a 3D array-like (e.g. Zarr): reads and writes go to ``arr[k, ...]``."""

    def __init__(self, arr, k: int):
        self.arr, self.k = arr, k
        self.shape, self.dtype = tuple(arr.shape[1:]), arr.dtype

    def __getitem__(self, key):
        return self.arr[(self.k,) + (key if isinstance(key, tuple) else (key,))]

    def __setitem__(self, key, value):
        self.arr[(self.k,) + (key if isinstance(key, tuple) else (key,))] = value


def _create_labels_zarr(path: Path, shape: tuple, name: str):
    """An empty int32 NGFF labels group (``io.create_labels_zarr``), filled region by region."""
    from . import io

    return io.create_labels_zarr(path, shape, name=name, overwrite=True)


def _blocks(shape, chunks):
    """(slices) covering a 2D ``shape`` in blocks of ``chunks``."""
    for r in range(0, shape[0], chunks[0]):
        for c in range(0, shape[1], chunks[1]):
            yield slice(r, min(r + chunks[0], shape[0])), slice(c, min(c + chunks[1], shape[1]))


def _count_labels(labels) -> tuple[dict[int, int], int]:
    """Pixels per id and the number of labelled slices, read one chunk at a time."""
    import numpy as np

    counts: dict[int, int] = {}
    planes = (
        [labels]
        if len(labels.shape) == 2
        else [
            labels[k] if isinstance(labels, np.ndarray) else _Plane(labels, k)
            for k in range(labels.shape[0])
        ]
    )
    labelled = 0
    for plane in planes:
        if isinstance(plane, np.ndarray):
            blocks = [np.asarray(plane)]
        else:
            step = tuple(labels.chunks[-2:])
            blocks = (np.asarray(plane[b]) for b in _blocks(plane.shape, step))
        any_label = False
        for block in blocks:
            ids, n = np.unique(block, return_counts=True)
            for i, c in zip(ids.tolist(), n.tolist(), strict=True):
                if i != 0:
                    counts[i] = counts.get(i, 0) + c
                    any_label = True
        labelled += any_label
    return counts, labelled


# ---------------------------------------------------------------------------- cache


def _cache_path(value: str | None) -> Path | None:
    if value is None:
        return None
    if value == "default":
        from .embedding_store import default_cache_path

        return default_cache_path()
    return Path(value).expanduser()


def _is_cache(path: Path) -> bool:
    """True if ``path`` holds a napari-sam3 embedding cache (read-only check)."""
    from .embedding_store import STORE_KIND

    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        return meta.get("attributes", {}).get("napari_sam3", {}).get("kind") == STORE_KIND
    except (OSError, ValueError, AttributeError):
        return False


def _cache_problem(path: Path, strict: bool = False) -> str | None:
    """Why ``path`` cannot be the cache, or None; changes nothing on disk.

    Always refused: a folder of other data (the cache would be written into it). With
    ``strict`` (precompute, before loading the model), also what the store itself would
    refuse later: a file, a Zarr store of another kind, a place that cannot be written.
    """
    why = None
    if path.is_dir() and not (path / "zarr.json").is_file() and any(path.iterdir()):
        why = "a folder that is not a napari-sam3 embedding cache; choose an empty or new folder"
    elif strict:
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not existing.is_dir():
            why = "not a folder" if existing == path else f"{existing} is not a folder"
        elif existing == path and (path / "zarr.json").is_file() and not _is_cache(path):
            why = "a Zarr store that is not a napari-sam3 embedding cache"
        elif not os.access(existing, os.W_OK | os.X_OK):
            why = f"{existing} is not writable"
    return None if why is None else f"cannot use the embedding cache at {path} ({why})"


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


@contextlib.contextmanager
def _quiet_local_load(model: str):
    """No "Loading weights" bar for a local folder; hub downloads keep their progress bars."""
    if not Path(model).expanduser().exists():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_segmenter(args, cache: Path | None, on_cache_warning, video: bool = False):
    """Sam3Segmenter.from_pretrained with the CLI's options; errors are one line, exit 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .segmenter import Sam3Segmenter

    try:
        with _quiet_local_load(args.model):
            segmenter = Sam3Segmenter.from_pretrained(
                args.model,
                device=args.device,
                cache=cache,
                cache_dtype=args.cache_dtype,
                tile_size=args.tile,
                overlap=args.overlap,
                on_cache_warning=on_cache_warning,
            )
            if video:
                segmenter.video_tracker()  # fails here, before anything is written
    except Exception as e:  # noqa: BLE001 - a broken checkpoint must not print a traceback
        raise _load_error(e, args.model) from None
    return segmenter


def _load_error(e: Exception, model: str) -> CliError:
    from .model import ModelLoadError

    if isinstance(e, ModelLoadError):
        return CliError(e)
    if isinstance(e, ValueError) and ("overlap" in str(e) or "tile size" in str(e)):
        return CliError(f"--tile/--overlap: {e}")  # TileGrid's checks
    return CliError(f"cannot load model {model!r}: {type(e).__name__}: {e}")


def _load_concept(args, cache: Path | None, on_cache_warning):
    """ConceptSegmenter.from_pretrained (--concept-model, else --model); errors exit 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .concept import ConceptSegmenter

    model = args.concept_model or args.model
    try:
        with _quiet_local_load(model):
            return ConceptSegmenter.from_pretrained(
                model,
                device=args.device,
                cache=cache,
                cache_dtype=args.cache_dtype,
                tile_size=args.tile,
                overlap=args.overlap,
                on_cache_warning=on_cache_warning,
            )
    except Exception as e:  # noqa: BLE001 - e.g. a tracker-only checkpoint: one line, exit 2
        raise _load_error(e, model) from None


# -------------------------------------------------------------------------- segment


def _segment_mode(args) -> str:
    """'prompts', 'concept' or 'everything', with the options that belong to it only."""
    concept = args.text is not None or args.exemplars is not None
    given = [
        name
        for name, on in (
            ("--prompts", args.prompts is not None),
            ("--text/--exemplars", concept),
            ("--everything", args.everything),
        )
        if on
    ]
    if not given:
        raise CliError(
            "give --prompts PROMPTS.json, --text PHRASE and/or --exemplars EXEMPLARS.json, "
            "or --everything"
        )
    if len(given) > 1:
        raise CliError(
            f"{' and '.join(given)} cannot be combined: use one of --prompts, "
            "--text/--exemplars and --everything"
        )
    mode = "concept" if concept else "everything" if args.everything else "prompts"

    def stray(names):
        return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]

    if mode != "concept" and (opts := stray(_CONCEPT_ONLY)):
        raise CliError(f"{', '.join(opts)} only apply with --text or --exemplars")
    if mode != "everything" and (opts := stray(_EVERYTHING_ONLY)):
        raise CliError(f"{', '.join(opts)} only apply with --everything")
    if mode == "prompts" and args.min_area is not None:
        raise CliError("--min-area only applies with --everything, --text or --exemplars")
    if mode != "prompts" and args.propagate:
        raise CliError(
            "--propagate only applies with --prompts (--text, --exemplars and --everything "
            "segment a stack slice by slice)"
        )
    if args.text is not None and not args.text.strip():
        raise CliError("--text is empty: give a noun phrase, e.g. --text nucleus")
    return mode


def _cmd_segment(args) -> int:
    import numpy as np

    mode = _segment_mode(args)  # first: "segment IMAGE" alone names the three modes
    if args.out is None:
        raise CliError("--out OUT is required (OUT.tif, OUT.tiff or OUT.zarr)")
    if mode != "prompts":
        return _segment_instances(args, mode)
    inp = _load_input(args.image, args.axis)
    _check_limits(args.limits)
    _check_tiling(args)
    if args.propagate and not inp.is_stack:
        h, w = inp.plane_shape
        raise CliError(
            f"--propagate needs a 3D stack (Z, Y, X); image {args.image!r} is a 2D {h}x{w} image"
        )
    range_opts = [
        name
        for name, value in (
            ("--start", args.start),
            ("--stop", args.stop),
            ("--stop-after", args.stop_after),
            ("--score-threshold", args.score_threshold),
        )
        if value is not None
    ]
    if range_opts and not args.propagate:
        raise CliError(f"{', '.join(range_opts)} only apply with --propagate")
    objects = _load_prompts(args.prompts, inp)
    prompts_by_slice = _by_slice(objects)
    if args.propagate:
        start = 0 if args.start is None else args.start
        stop = inp.depth if args.stop is None else args.stop
        if not 0 <= start < stop <= inp.depth:
            raise CliError(
                f"--start {start} --stop {stop}: need 0 <= start < stop <= {inp.depth} "
                f"(the stack has {inp.depth} slices)"
            )
        if not any(start <= k < stop for k in prompts_by_slice):
            raise CliError(
                f"no prompted slice between --start {start} and --stop {stop} (exclusive); "
                f"prompted slices: {', '.join(map(str, prompts_by_slice))}"
            )
        if inp.frames.rgb and inp.frames.shape[-1] == 2:
            raise CliError("--propagate does not take 2-channel stacks; use 1, 3 or 4 channels")
    out = _check_output(args.out, args.image, args.overwrite)
    cache = _cache_path(args.cache)
    if cache is not None and (problem := _cache_problem(cache)):
        _warn(problem + _MEMORY_ONLY)
        cache = None
    limits = _resolve_limits(inp, args.limits)

    segmenter = _load_segmenter(args, cache, _warn, video=bool(args.propagate))
    shape = (inp.depth, *inp.plane_shape) if inp.is_stack else tuple(inp.plane_shape)
    post = dict(max_hole_area=args.max_hole_area, max_sprinkle_area=args.max_sprinkle_area)
    to_zarr = out.suffix.lower() == ".zarr"
    try:
        with _staging(out) as staged:
            if to_zarr:  # filled region by region: the label image is never all in memory
                labels = _create_labels_zarr(staged, shape, out.stem)
            else:
                labels = np.zeros(shape, dtype=np.int32)
            if args.propagate:
                _propagate(segmenter, inp, prompts_by_slice, labels, limits, args, post)
            elif inp.is_stack:
                for k, objs in prompts_by_slice.items():
                    target = labels[k] if isinstance(labels, np.ndarray) else _Plane(labels, k)
                    _segment_into(segmenter, inp.frames[k], objs, target, limits, post)
            else:
                _segment_into(segmenter, inp.plane, prompts_by_slice[None], labels, limits, post)
            counts, labelled = _count_labels(labels)
            if not to_zarr:
                from . import io

                io.write_labels(staged, labels)
            _commit(staged, out, args.overwrite)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, status 1, nothing written
        raise _failed(f"segmentation failed: {type(e).__name__}: {e}") from None

    ids = sorted({o.id for o in objects})
    per_id = ", ".join(f"{i}: {counts.get(i, 0)}" for i in ids)
    n = len(ids)
    what = f"{n} object{'s' if n != 1 else ''}"
    if args.propagate:
        done = f"propagated {what} ({args.propagate}) through a {inp.describe()}"
        done += f", {labelled} of {inp.depth} slices labelled"
    elif inp.is_stack:
        m = len(prompts_by_slice)
        done = f"segmented {what} on {m} slice{'s' if m != 1 else ''} of a {inp.describe()}"
    else:
        done = f"segmented {what} in {inp.describe()}"
    print(f"{done}; pixels per id {{{per_id}}}; wrote {out}")
    return 0


def _segment_into(segmenter, image, objs: dict, out, limits, post) -> None:
    """Segment ``{id: prompt}`` on one image into ``out`` (object -> its id)."""
    segmenter.segment(image, list(objs.values()), ids=list(objs), limits=limits, out=out, **post)


def _propagate(segmenter, inp: _Input, prompts_by_slice, labels, limits, args, post) -> None:
    """``Sam3Segmenter.propagate`` into ``labels``, with a progress line per slice."""
    from .segmenter import write_slice

    results = segmenter.iter_propagate(
        inp.data,
        prompts_by_slice,
        inp.axis,
        args.propagate,
        args.start,
        args.stop,
        fixed=inp.fixed,
        limits=limits,
        score_threshold=0.0 if args.score_threshold is None else args.score_threshold,
        stop_after=3 if args.stop_after is None else args.stop_after,
    )
    for result in results:
        write_slice(labels, result, **post)
        ids = ", ".join(map(str, result.ids)) or "none"
        print(f"slice {result.index} tracked (ids {ids})", flush=True)


# --------------------------------------------------- segment: concept and everything


def _scores_path(out: Path, image_path: str, overwrite: bool) -> Path | None:
    """OUT.csv next to a TIFF output (None for Zarr: scores go into its attributes)."""
    if out.suffix.lower() == ".zarr":
        return None
    csv_path = out.with_suffix(".csv")
    if csv_path.exists() or csv_path.is_symlink():
        if not overwrite:
            raise CliError(
                f"{str(csv_path)!r} (the scores of {str(out)!r}) already exists "
                "(pass --overwrite to replace it)"
            )
        if csv_path.resolve() == Path(image_path).resolve():
            raise CliError(f"refusing to overwrite the input image {image_path!r}")
    return csv_path


def _segment_instances(args, mode: str) -> int:
    """``segment --text/--exemplars`` (concept) or ``--everything``: every instance, with
    its score, tile by tile and slice by slice (ids unique across slices)."""
    import numpy as np

    inp = _load_input(args.image, args.axis)
    _check_limits(args.limits)
    _check_tiling(args)
    range_opts = [
        f"--{n.replace('_', '-')}"
        for n in ("start", "stop", "stop_after", "score_threshold")
        if getattr(args, n) is not None
    ]
    if range_opts:
        raise CliError(f"{', '.join(range_opts)} only apply with --propagate")
    boxes, box_labels = None, None
    if args.exemplars is not None:
        boxes, box_labels = _load_exemplars(args.exemplars, inp)
    out = _check_output(args.out, args.image, args.overwrite)
    csv_path = _scores_path(out, args.image, args.overwrite)
    cache = _cache_path(args.cache)
    if cache is not None and (problem := _cache_problem(cache)):
        _warn(problem + _MEMORY_ONLY)
        cache = None
    limits = _resolve_limits(inp, args.limits)
    post = dict(max_hole_area=args.max_hole_area, max_sprinkle_area=args.max_sprinkle_area)

    if mode == "concept":
        threshold = _DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        model = _load_concept(args, cache, _warn)
        options = dict(threshold=threshold, min_area=args.min_area or 0, **post)
        settings = {
            "text": args.text,
            "exemplars": boxes,
            "exemplar_labels": box_labels,
            "threshold": threshold,
            "min_area": options["min_area"],
            **post,
        }
        n_steps = None

        def run(image, progress):
            return model.detect(
                image,
                args.text,
                boxes,
                exemplar_labels=box_labels,
                limits=limits,
                progress=progress,
                **options,
            )

        def paint(result, target, start_id):
            result.relabel(out=target, start_id=start_id)
    else:
        from .everything import SETTINGS, generate_everything

        model = _load_segmenter(args, cache, _warn)
        chosen = {
            name: getattr(args, name)
            for name in (*_EVERYTHING_ONLY, "min_area")
            if getattr(args, name) is not None
        }
        everything = replace(SETTINGS, **chosen, **post)
        settings = dict(everything.__dict__)
        n_steps = -(-(everything.points_per_side**2) // everything.points_per_batch)

        def run(image, progress):
            return generate_everything(
                model, image, settings=everything, limits=limits, progress=progress
            )

        def paint(result, target, start_id):
            result.labels(target, start_id=start_id)

    shape = (inp.depth, *inp.plane_shape) if inp.is_stack else tuple(inp.plane_shape)
    to_zarr = csv_path is None
    n_tiles = len(model.tiles(inp.frames[0] if inp.is_stack else inp.plane))
    rows: list[dict] = []
    labelled = 0
    try:
        with _staging(out) as staged:
            if to_zarr:  # filled region by region: the label image is never all in memory
                labels = _create_labels_zarr(staged, shape, out.stem)
            else:
                labels = np.zeros(shape, dtype=np.int32)
            next_id = 1
            for k in range(inp.depth):
                where = f"slice {k} ({k + 1}/{inp.depth}) " if inp.is_stack else ""
                image = inp.frames[k] if inp.is_stack else inp.plane
                result = run(image, _tile_progress(where, n_tiles, n_steps))
                if not inp.is_stack:
                    target = labels
                elif isinstance(labels, np.ndarray):
                    target = labels[k]
                else:
                    target = _Plane(labels, k)
                paint(result, target, next_id)  # ids continue from the slices before
                found = _instance_rows(result.features, k if inp.is_stack else None)
                rows += found
                labelled += bool(found)
                if found:
                    next_id = found[-1]["id"] + 1
                if inp.is_stack:
                    print(f"slice {k} segmented: {_count(len(found), 'instance')}", flush=True)
            if to_zarr:
                _write_scores_attrs(staged, mode, settings, rows)
            else:
                from . import io

                io.write_labels(staged, labels)
                staged_csv = staged.parent / csv_path.name
                _write_scores_csv(staged_csv, rows)
                if not args.overwrite and (out.exists() or out.is_symlink()):
                    raise CliError(f"{str(out)!r} already exists (pass --overwrite to replace it)")
                _commit(staged_csv, csv_path, args.overwrite)  # then OUT: both or neither
            _commit(staged, out, args.overwrite)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, status 1, nothing written
        raise _failed(f"segmentation failed: {type(e).__name__}: {e}") from None

    if mode == "concept":
        what = [repr(args.text)] if args.text is not None else []
        if boxes:
            what.append(_count(len(boxes), "exemplar box", "exemplar boxes"))
        found = f"{_count(len(rows), 'instance')} of {' + '.join(what)}"
        found += f" (score > {threshold:g})"
    else:
        found = _count(len(rows), "object")
    on = f", on {labelled} of {inp.depth} slices" if inp.is_stack else ""
    scores = csv_path if csv_path is not None else f"{out} attributes (napari_sam3.instances)"
    print(f"found {found} in a {inp.describe()}{on}; wrote {out}; scores in {scores}")
    return 0


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _tile_progress(where: str, n_tiles: int, n_steps: int | None):
    """A progress callback printing "tile i/n done" on images of several tiles."""
    if n_tiles <= 1:
        return None

    def report(done: int, total: int) -> None:
        per_tile = n_steps or 1  # everything reports per batch of points, concept per tile
        if done % per_tile == 0:
            print(f"{where}tile {done // per_tile}/{total // per_tile} done", flush=True)

    return report


def _instance_rows(features: dict, k: int | None) -> list[dict]:
    """One dict per painted instance: id, (slice,) score, area and the mode's extras."""
    import numpy as np

    extra = [key for key in features if key not in ("index", "score", "area")]
    rows = []
    for i in range(len(features["index"])):
        row: dict[str, Any] = {"id": int(features["index"][i])}
        if k is not None:
            row["slice"] = k
        row["score"] = float(features["score"][i])
        row["area"] = int(features["area"][i])
        for key in extra:
            value = float(features[key][i])
            row[key] = value if np.isfinite(value) else None
        rows.append(row)
    return rows


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _write_scores_attrs(path: Path, mode: str, settings: dict, rows: list[dict]) -> None:
    """The instance table in the labels group's attributes, under ``napari_sam3``."""
    import zarr

    group = zarr.open_group(path, mode="r+")
    group.attrs["napari_sam3"] = {
        "mode": mode,
        "settings": _jsonable(settings),
        "instances": rows,
    }


def _write_scores_csv(path: Path, rows: list[dict]) -> None:
    import csv

    columns = list(rows[0]) if rows else ["id", "score", "area"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------- precompute


def _check_region(region, shape) -> tuple[int, int, int, int] | None:
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


def _cmd_precompute(args) -> int:
    inp = _load_input(args.image, args.axis)
    _check_limits(args.limits)
    _check_tiling(args)
    region = _check_region(args.region, inp.plane_shape)
    cache = _cache_path(args.cache)
    if problem := _cache_problem(cache, strict=True):
        raise CliError(f"precompute needs a usable cache: {problem}")
    limits = _resolve_limits(inp, args.limits)

    problems: list[str] = []
    segmenter = _load_segmenter(args, cache, problems.append)  # creates the cache
    if problems:
        raise CliError(f"precompute needs a usable cache: {problems[0].removesuffix(_MEMORY_ONLY)}")
    images = [inp.frames[k] for k in range(inp.depth)] if inp.is_stack else [inp.plane]
    encoded = cached = 0
    t0 = time.perf_counter()
    try:
        for k, image in enumerate(images, 1):
            where = f"slice {k - 1} ({k}/{len(images)}) " if inp.is_stack else ""
            for done, total, was_encoded in segmenter.precompute(image, limits, region):
                if problems:  # the cache became unusable, e.g. the disk is full
                    raise _failed("precompute stopped: " + problems[0].removesuffix(_MEMORY_ONLY))
                encoded += was_encoded
                cached += not was_encoded
                state = "encoded" if was_encoded else "cached"
                print(f"{where}tile {done}/{total} {state}", flush=True)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, status 1
        raise _failed(f"precompute failed: {type(e).__name__}: {e}") from None
    seconds = time.perf_counter() - t0
    store = segmenter.store
    n = encoded + cached
    on = f" on {inp.depth} slices" if inp.is_stack else ""
    print(
        f"precomputed {n} tile{'s' if n != 1 else ''}{on} of a {inp.describe()}: "
        f"{encoded} encoded, {cached} cached, in {seconds:.1f} s; cache {store.path}: "
        f"{len(store.disk_entries())} entries, {_human_bytes(store.disk_bytes())} on disk"
    )
    return 0


# ---------------------------------------------------------------------------- cache


def _open_existing_cache(args):
    """The EmbeddingStore at --cache if a napari-sam3 cache is there; None if nothing is."""
    from .embedding_store import EmbeddingStore

    path = _cache_path(args.cache)
    if not path.exists():
        return path, None
    if not _is_cache(path):
        raise CliError(f"{str(path)!r} is not a napari-sam3 embedding cache")
    problems: list[str] = []
    store = EmbeddingStore(path, on_warning=problems.append)
    if problems:
        raise CliError(problems[0].removesuffix(_MEMORY_ONLY))
    return path, store


def _cmd_cache_info(args) -> int:
    path, store = _open_existing_cache(args)
    entries = len(store.disk_entries()) if store else 0
    size = store.disk_bytes() if store else 0
    print(f"cache: {path}{'' if store else ' (does not exist yet)'}")
    print(f"entries: {entries}")
    print(f"size: {_human_bytes(size)} ({size} bytes)")
    return 0


def _cmd_cache_clear(args) -> int:
    path, store = _open_existing_cache(args)
    if store is None:
        print(f"no cache at {path}; nothing to clear")
        return 0
    entries, size = len(store.disk_entries()), store.disk_bytes()
    store.clear()
    print(f"cleared {entries} entries ({_human_bytes(size)}) from {path}")
    return 0


# ----------------------------------------------------------------------------- view


def _check_display() -> None:
    """Qt aborts the process without a display; say so in one line instead."""
    if not sys.platform.startswith("linux"):
        return
    qpa = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0]
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or qpa in _HEADLESS_QPA:
        return
    raise CliError(
        "no display found: run under xvfb-run (e.g. 'xvfb-run -a napari-sam3 view "
        "--screenshot shot.png') or set QT_QPA_PLATFORM=offscreen"
    )


def _set_widget_model(widget, model: str) -> bool:
    """Preset the model id/folder in the widget; True if the widget has a place for it."""
    setter = getattr(widget, "set_model_name", None)
    if callable(setter):
        setter(model)
        return True
    for name in ("model_edit", "model_field", "model_name", "model"):
        field = getattr(widget, name, None)
        if field is None:
            continue
        if hasattr(field, "setText"):  # a QLineEdit
            field.setText(model)
            return True
        if hasattr(field, "value") and not callable(field.value):  # a magicgui widget
            field.value = model
            return True
    return False


def _cmd_view(args) -> int:
    if args.image and args.sample:
        raise CliError("give an IMAGE or --sample, not both")
    image = None
    if args.image:
        from . import io

        try:
            image = io.read_image(args.image)
        except io.ImageReadError as e:
            raise CliError(e) from None
    shot = None
    if args.screenshot:
        shot = Path(args.screenshot)
        if shot.suffix.lower() not in SCREENSHOT_SUFFIXES:
            raise CliError(
                f"screenshot {args.screenshot!r}: use a .png file "
                f"(or one of {', '.join(SCREENSHOT_SUFFIXES)})"
            )
        if not shot.absolute().parent.is_dir():
            raise CliError(f"screenshot {args.screenshot!r}: folder does not exist")
    _check_display()

    import napari

    viewer = napari.Viewer(title="napari-sam3")
    if image is not None:
        viewer.add_image(image, name=Path(args.image).stem.removesuffix(".ome"))
    else:
        from ._sample_data import sample_cells

        for data, kwargs, _layer_type in sample_cells():
            viewer.add_image(data, **kwargs)
    try:
        _dock, widget = viewer.window.add_plugin_dock_widget(PROG, WIDGET_NAME)
    except Exception as e:  # noqa: BLE001 - say what failed in one line, then close napari
        viewer.close()
        err = CliError(f"cannot open the {WIDGET_NAME} widget: {type(e).__name__}: {e}")
        err.status = 1
        raise err from None
    if args.model and not _set_widget_model(widget, args.model):
        print(f"{PROG}: warning: the widget has no model field; --model ignored", file=sys.stderr)

    if shot is None:
        napari.run()
        return 0
    from qtpy.QtWidgets import QApplication

    try:
        viewer.window.resize(1400, 900)  # a fixed, roomy size for comparable screenshots
        for _ in range(5):
            QApplication.processEvents()
        viewer.reset_view()  # the dock narrowed the canvas
        QApplication.processEvents()
        viewer.screenshot(str(shot), canvas_only=False, flash=False)
    finally:
        viewer.close()
    print(f"saved screenshot {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
