"""``replay LABELS --out OUT``: re-run what LABELS' provenance records, on the image it
names (or ``--image``), with the recorded model, device, tiling and settings, into OUT.

Before anything is loaded or written the record is compared with what the replay would
use: another model (weights, config, hub revision), other processor settings, device,
dtype or tiling, or other image pixels are reported in one line (exit 2); ``--force``
replays anyway (one warning line). External operations (brush edits, imported labels)
are written back from their stored result."""

from __future__ import annotations

import argparse

from .errors import CliError, reported_as_failed, warn
from .inputs import load_input
from .models import load_concept, load_segmenter
from .output import (
    check_output,
    commit,
    finished,
    new_labels,
    read_record,
    sidecar_path,
    staging,
)
from .segment_prompts import start_record

TRACKER_KINDS = ("prompts", "propagation", "everything")


def add_parser(sub) -> None:
    """The ``replay`` subcommand on the ``segment``-style subparsers ``sub``."""
    p = sub.add_parser(
        "replay",
        help="re-run what a labels output's provenance records, into new labels",
        description=(
            "Read the provenance stored with LABELS (a labels .zarr, IMAGE.zarr/labels/NAME "
            "or a .tif with its LABELS.tif.json) and run every recorded operation again on "
            "the recorded image (or --image) with the recorded model, device, tiling and "
            "settings; on the same machine the labels come out identical. A model, image or "
            "setting that differs from the record is reported (exit 2) unless --force."
        ),
    )
    p.add_argument("labels", metavar="LABELS", help="labels written by napari-sam3")
    p.add_argument("--image", default=None, metavar="IMAGE",
                   help="the image to replay on (default: the recorded path)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output labels: OUT.tif, OUT.zarr or IMAGE.zarr/labels/NAME")
    p.add_argument("--model", default=None, metavar="M",
                   help="model to replay with (default: the recorded one)")
    p.add_argument("--device", default=None, metavar="D",
                   help="device (default: the recorded one)")
    p.add_argument("--force", action="store_true",
                   help="replay even if the model, image or settings differ from the record")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_replay)


def _model_args(record, args, model: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        model=model or args.model or record.model.get("source"), concept_model=None,
        device=args.device or record.device or "auto", cache_dtype="float16",
        tile=record.tiling.get("tile_size"), overlap=record.tiling.get("overlap"),
        exact_dtype=False)


def cmd_replay(args) -> int:
    record = read_record(args.labels)
    image_path = args.image or (record.image or {}).get("path")
    if not image_path:
        raise CliError(f"labels {args.labels!r} do not name their image: give --image IMAGE")
    inp = load_input(image_path, (record.image or {}).get("axis"))
    shape = tuple(record.labels.get("shape") or inp.labels_shape)
    if tuple(inp.labels_shape) != shape:
        raise CliError(f"image {image_path!r} gives labels of shape {inp.labels_shape}, the "
                       f"record {shape}")
    out = check_output(args.out, image_path, args.overwrite, shape)
    sidecar_path(out, image_path, args.overwrite)
    kinds = {op["kind"] for op in record.operations}
    from ..core.provenance import jsonable
    from ..core.replay import replay

    segmenter = concept = None
    if kinds & set(TRACKER_KINDS):
        segmenter = load_segmenter(_model_args(record, args), None, warn,
                                   video="propagation" in kinds)
    concept_ops = [op for op in record.operations if op["kind"] == "concept"]
    if concept_ops:
        source = args.model or concept_ops[0]["model"]["source"]
        concept = load_concept(_model_args(record, args, source), None, warn)
    header = segmenter if segmenter is not None else concept
    problems = record.mismatches(header, inp.data) if header is not None else []
    if header is not concept and any(op["model"]["fingerprint"] != jsonable(concept.fingerprint)
                                     for op in concept_ops):
        problems.append("concept model differs")
    if problems:
        problems = list(dict.fromkeys(problems))
        text = f"{args.labels}: differs from its record: {'; '.join(problems)}"
        if not args.force:
            raise CliError(f"{text} (pass --force to replay anyway)")
        warn(f"{text}; replaying anyway (--force)")
    with reported_as_failed("replay"), staging(out) as staged:
        labels = new_labels(staged, shape)
        image = inp.data if inp.is_stack else inp.plane
        replay(record, image, segmenter, labels, concept=concept)
        new = start_record(header, inp) if header is not None else record
        new.operations = record.operations
        for done, final in finished(staged, out, labels, new, args.overwrite):
            commit(done, final, args.overwrite)
    n = len(record.operations)
    print(f"replayed {n} operation{'s' if n != 1 else ''} on {inp.describe()} "
          f"{image_path}; wrote {out}")
    return 0


__all__ = ["add_parser", "cmd_replay"]
