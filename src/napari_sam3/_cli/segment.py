"""``segment``: which of its three modes was asked for, the checks every mode shares,
then ``segment_prompts`` or ``segment_instances``."""

from __future__ import annotations

from .batch import batch_images, batch_outputs
from .cluster import check_cluster_args, client_from_args, skip_rule
from .errors import CliError
from .inputs import input_from_args
from .segment_instances import CONCEPT_OPTIONS, EVERYTHING_OPTIONS, segment_instances
from .segment_prompts import PROPAGATE_OPTIONS, segment_prompts


def _given(args, names) -> list[str]:
    """The options among ``names`` (argparse dests) that were given, as flags."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]


def segment_mode(args) -> str:
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
    if mode != "concept" and (opts := _given(args, CONCEPT_OPTIONS)):
        raise CliError(f"{', '.join(opts)} only apply with --text or --exemplars")
    if mode != "everything" and (opts := _given(args, EVERYTHING_OPTIONS)):
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


def cmd_segment(args) -> int:
    mode = segment_mode(args)  # first: "segment IMAGE" alone names the three modes
    check_cluster_args(args)
    if mode == "prompts" and (opts := _given(args, ("scheduler", "skip_empty", "skip_mask"))):
        raise CliError(f"{', '.join(opts)} only apply with --text/--exemplars or --everything "
                       "(and to precompute)")
    images = batch_images(args.image)
    if images is not None:
        if mode == "prompts":
            raise CliError("a folder or glob IMAGE works with --text/--exemplars and "
                           "--everything; --prompts takes one image")
        return segment_batch(args, mode, images)
    if args.out_format is not None:
        raise CliError("--out-format applies to a folder or glob IMAGE (one output per image)")
    if args.out is None:
        raise CliError("--out OUT is required (OUT.tif, OUT.tiff or OUT.zarr)")
    inp = input_from_args(args)
    if args.propagate and not inp.is_stack:
        h, w = inp.plane_shape
        raise CliError(
            f"--propagate needs a 3D stack (Z, Y, X); image {args.image!r} is a 2D {h}x{w} image"
        )
    if (opts := _given(args, PROPAGATE_OPTIONS)) and not args.propagate:
        raise CliError(f"{', '.join(opts)} only apply with --propagate")
    if mode == "prompts":
        return segment_prompts(args, inp)
    skip = skip_rule(args)
    with client_from_args(args) as client:
        return segment_instances(args, mode, inp, client=client, skip=skip)


def segment_batch(args, mode: str, images) -> int:
    """One output per image under --out DIR; images whose output exists are skipped
    (unless --overwrite); the tiles of each image go to the workers with --scheduler."""
    outs = batch_outputs(images, args.out, args.out_format)
    todo = [(img, out) for img, out in zip(images, outs, strict=True)
            if args.overwrite or not (out.exists() or out.is_symlink())]
    for img, out in zip(images, outs, strict=True):
        if (img, out) not in todo:
            print(f"skipped {img}: {out} exists (--overwrite to redo it)", flush=True)
    skip = skip_rule(args)
    loaded: dict = {}
    with client_from_args(args) as client:
        for n, (img, out) in enumerate(todo, 1):
            # one image in memory at a time; a bad one stops the batch with its line
            # (those before it are done, and a rerun skips them)
            inp = input_from_args(args, str(img))
            print(f"image {n}/{len(todo)}: {inp.path}", flush=True)
            segment_instances(args, mode, inp, out_path=str(out), client=client,
                              loaded=loaded, skip=skip)
    print(f"{len(todo)} of {len(images)} images segmented into {args.out}"
          f"{'' if len(todo) == len(images) else ' (the others were done)'}")
    return 0
