"""Command line: ``napari-sam3 segment | precompute | cache | view | replay``.

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
* ``replay``: re-run what a labels output's provenance records (see
  :mod:`napari_sam3.core.provenance`), into new labels.

This module holds the parser and the dispatch; the commands live in
:mod:`napari_sam3._cli`. Only the standard library, NumPy and the package's light
modules are imported here; torch/transformers are imported after the input has been
validated, and napari only by ``view``.

Exit codes: 0 success, 2 bad input (one ``napari-sam3: error: ...`` line on
stderr, nothing written), 1 an unexpected failure while segmenting or writing
(also one line; nothing written), 130 interrupted. Warnings (e.g. an unusable
cache location) are one ``napari-sam3: warning: ...`` line each; the run goes on.
"""

from __future__ import annotations

import argparse
import math
import sys

from ._cli.cache import cmd_cache_clear, cmd_cache_info
from ._cli.cache import human_bytes as _human_bytes  # noqa: F401 - read by the tests
from ._cli.errors import PROG, CliError, one_line
from ._cli.precompute import cmd_precompute
from ._cli.replay import add_parser as add_replay_parser
from ._cli.segment import cmd_segment
from ._cli.view import cmd_view
from .core.defaults import (
    DEFAULT_MODEL,
    DEFAULT_STOP_AFTER,
    DEFAULT_THRESHOLD,
    DEFAULT_TILE,
    DIRECTIONS,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``napari-sam3: error:`` line too."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {one_line(message)} (see '{self.prog} --help')\n")


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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
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
        help=f"tile size for large images in pixels (default: the model input, {DEFAULT_TILE} "
        "for SAM3)",
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
        "--exact-dtype",
        action="store_true",
        help="use only cached embeddings computed in this run's compute dtype (default: any; "
        "e.g. bfloat16 entries from a GPU serve a float32 CPU run)",
    )
    p.add_argument(
        "--axis",
        type=_whole,
        metavar="A",
        default=None,
        help="stack axis of a 3D+ IMAGE (default: its only leading axis longer than 1, usually 0)",
    )


def _skip_range(text: str) -> int:
    value = _non_negative_int(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"must be 0 to 255 levels, got {value}")
    return value


def _add_cluster_options(p) -> None:
    """--scheduler/--workers (dask.distributed) and empty-tile skipping."""
    from .core.distributed.cluster import DEFAULT_LOCAL_WORKERS
    from .core.distributed.empty import DEFAULT_MAX_RANGE

    group = p.add_argument_group("dask.distributed (tiles and images spread over workers)")
    group.add_argument(
        "--scheduler",
        default=None,
        metavar="S",
        help="run tiles on dask workers: 'local' (a LocalCluster for this run), slurm, pbs, "
        "lsf or sge (dask-jobqueue, configured in ~/.config/dask/jobqueue.yaml), or the "
        "address of a running scheduler (tcp://HOST:PORT); default: in this process",
    )
    group.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"worker processes (local, one thread each; default {DEFAULT_LOCAL_WORKERS}) or "
        "jobs (slurm, pbs, lsf, sge; default 1)",
    )
    group.add_argument(
        "--skip-empty",
        type=_skip_range,
        nargs="?",
        const=DEFAULT_MAX_RANGE,
        default=None,
        metavar="X",
        help="skip tiles whose pixels, as the model sees them (0-255), span at most X "
        f"levels (default X: {DEFAULT_MAX_RANGE}); skipped tiles are reported",
    )
    group.add_argument(
        "--skip-mask",
        default=None,
        metavar="MASK",
        help="skip tiles with no nonzero pixel of MASK (an image of the plane, or a smaller "
        "one scaled to it, e.g. a tissue mask on a thumbnail)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .core.embedding_store import default_cache_path
    from .core.everything import SETTINGS as EVERYTHING
    from .core.postprocess import DEFAULTS

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
            "attributes (napari_sam3.core.instances) for .zarr, in OUT.csv next to a .tif."
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
        ".zarr; Zarr and OME-Zarr are read lazily); with --text/--exemplars or --everything "
        "also a folder or a glob pattern of images (one output each under --out DIR)",
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
        help="output labels: OUT.tif, OUT.tiff, OUT.zarr or IMAGE.zarr/labels/NAME (NGFF "
        "labels inside an OME-Zarr image) (required); with the provenance (OUT.tif.json "
        "next to a TIFF); for a folder or glob IMAGE, a folder DIR receiving one NAME.tif or "
        "NAME.zarr per image",
    )
    seg.add_argument(
        "--out-format",
        choices=("tif", "zarr"),
        default=None,
        help="format of each output of a folder or glob IMAGE (default: zarr); images "
        "whose output exists are skipped unless --overwrite",
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
        help=f"keep instances scoring above X, 0 to 1 (default: {DEFAULT_THRESHOLD})",
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
        choices=DIRECTIONS,
        default=None,
        help="track the prompted objects from their slices through the stack",
    )
    prop.add_argument(
        "--first",
        type=_whole,
        metavar="K",
        default=None,
        help="first slice to propagate through, 0-based (default: 0)",
    )
    prop.add_argument(
        "--last",
        type=_whole,
        metavar="K",
        default=None,
        help="last slice to propagate through, included (default: the last of the stack)",
    )
    prop.add_argument(
        "--start",
        type=_whole,
        metavar="K",
        default=None,
        help="the same as --first (kept for compatibility)",
    )
    prop.add_argument(
        "--stop",
        type=_whole,
        metavar="K",
        default=None,
        help="propagate up to slice K, excluded: the same as --last K-1 (kept for "
        "compatibility)",
    )
    prop.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="N",
        default=None,
        help="stop following an object after N slices in a row with an object score below "
        f"--score-threshold (default: {DEFAULT_STOP_AFTER})",
    )
    prop.add_argument(
        "--score-threshold",
        type=_finite_float,
        metavar="X",
        default=None,
        help="object score (logit) below which an object counts as absent on a slice (default: 0)",
    )
    seg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_cluster_options(seg)
    seg.set_defaults(func=cmd_segment)

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
    pre.add_argument(
        "image",
        metavar="IMAGE",
        help="2D image or 3D stack (as for segment), or a folder or glob pattern of them",
    )
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
    pre.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tiles per encoder forward, here or on each worker (default 1; try 4-8 on a GPU)",
    )
    _add_cluster_options(pre)
    pre.set_defaults(func=cmd_precompute)

    cache = sub.add_parser(
        "cache",
        help="show or clear the embedding cache",
        description="Show the size of an embedding cache, or delete its entries.",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    for name, func, text in (
        ("info", cmd_cache_info, "print the cache location, entries and size on disk"),
        ("clear", cmd_cache_clear, "delete every cached embedding"),
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
    view.add_argument(
        "--click",
        metavar="ROW,COL",
        default=None,
        help="press Load model, click one point at image pixel ROW,COL and wait for its "
        "preview (with --screenshot: a check of the whole job; exit 1 if no mask appears)",
    )
    view.set_defaults(func=cmd_view)
    add_replay_parser(sub)
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
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
