"""``segment --text/--exemplars`` (SAM3's concept detector) and ``segment --everything``
(a grid of point prompts): every instance, with its score, tile by tile and slice by
slice (ids unique across slices)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.defaults import DEFAULT_THRESHOLD
from .cache import optional_cache
from .errors import CliError, reported_as_failed, warn
from .inputs import Input, resolve_limits
from .models import load_concept, load_segmenter
from .output import (
    check_output,
    commit,
    finished,
    instance_rows,
    new_labels,
    plane,
    scores_path,
    sidecar_path,
    staging,
    write_scores_attrs,
    write_scores_csv,
)
from .prompt_files import load_exemplars
from .segment_prompts import start_record

CONCEPT_OPTIONS = ("threshold", "concept_model")
EVERYTHING_OPTIONS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
)


def segment_instances(args, mode: str, inp: Input, *, out_path: str | None = None,
                      client=None, loaded: dict | None = None, skip=None) -> int:
    """``mode`` 'concept' or 'everything': labels and scores of every instance of
    ``inp`` written to ``out_path`` (default --out). ``client``: dask workers run the
    tiles; ``loaded``: models kept over the images of a batch; ``skip``: EmptyTiles."""
    loaded = {} if loaded is None else loaded
    boxes, box_labels = None, None
    if args.exemplars is not None:
        boxes, box_labels = load_exemplars(args.exemplars, inp)
    out = check_output(args.out if out_path is None else out_path, inp.path, args.overwrite,
                       inp.labels_shape)
    csv_path = scores_path(out, inp.path, args.overwrite)
    sidecar_path(out, inp.path, args.overwrite)
    cache = optional_cache(args.cache)
    limits = resolve_limits(inp, args.limits)
    post = dict(max_hole_area=args.max_hole_area, max_sprinkle_area=args.max_sprinkle_area)

    if mode == "concept":
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        model = loaded.get(mode) or loaded.setdefault(mode, load_concept(args, cache, warn))
        options = dict(threshold=threshold, min_area=args.min_area or 0, client=client,
                       skip=skip, **post)
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
    else:
        from ..core.everything import SETTINGS, generate_everything

        chosen = {
            name: getattr(args, name)
            for name in (*EVERYTHING_OPTIONS, "min_area")
            if getattr(args, name) is not None
        }
        try:  # bad settings (e.g. --points-per-side above its maximum) before the model loads
            everything = replace(SETTINGS, **chosen, **post)
        except ValueError as e:
            raise CliError(f"--everything: {e}") from None
        model = loaded.get(mode) or loaded.setdefault(mode, load_segmenter(args, cache, warn))
        settings = dict(everything.__dict__)
        n_steps = -(-(everything.points_per_side**2) // everything.points_per_batch)

        def run(image, progress):
            return generate_everything(
                model, image, settings=everything, limits=limits, progress=progress,
                client=client, skip=skip,
            )

    from ..core.instances import paint_in_sequence

    n_tiles = len(model.tiles(inp.frames[0] if inp.is_stack else inp.plane))
    rows: list[dict] = []
    skipped: list[list[int]] = []
    labelled = 0
    with reported_as_failed("segmentation"), staging(out) as staged:
        labels = new_labels(staged, inp.labels_shape)
        next_id = 1
        for k in range(inp.depth):
            where = f"slice {k} ({k + 1}/{inp.depth}) " if inp.is_stack else ""
            image = inp.frames[k] if inp.is_stack else inp.plane
            result = run(image, _tile_progress(where, n_tiles, n_steps))
            target = plane(labels, k) if inp.is_stack else labels
            next_id = paint_in_sequence([(result, target)], start_id=next_id)  # ids continue
            skipped += [([k] if inp.is_stack else []) + list(b) for b in result.skipped]
            found = instance_rows(result.features, k if inp.is_stack else None)
            rows += found
            labelled += bool(found)
            if inp.is_stack:
                print(f"slice {k} segmented: {_count(len(found), 'instance')}", flush=True)
        if skip is not None:
            settings["skipped_tiles"] = skipped  # [slice,] r0, c0, r1, c1 of each
        record = start_record(model, inp)
        record.append(_operation(mode, model, args, settings, limits, inp, rows, skip))
        extra = ()
        if csv_path is None:
            write_scores_attrs(staged, mode, settings, rows)
        else:
            staged_csv = staged.parent / csv_path.name
            write_scores_csv(staged_csv, rows)
            extra = ((staged_csv, csv_path),)  # then OUT: all or nothing
        for done, final in finished(staged, out, labels, record, args.overwrite, extra):
            commit(done, final, args.overwrite)

    if mode == "concept":
        what = [repr(args.text)] if args.text is not None else []
        if boxes:
            what.append(_count(len(boxes), "exemplar box", "exemplar boxes"))
        found = f"{_count(len(rows), 'instance')} of {' + '.join(what)}"
        found += f" (score > {threshold:g})"
    else:
        found = _count(len(rows), "object")
    on = f", on {labelled} of {inp.depth} slices" if inp.is_stack else ""
    scores = csv_path if csv_path is not None else f"{out} attributes (napari_sam3.core.instances)"
    empty = f"; {_count(len(skipped), 'tile')} skipped as empty" if skip is not None else ""
    print(f"found {found} in a {inp.describe()}{on}; wrote {out}; scores in {scores}{empty}")
    return 0


def _operation(mode: str, model, args, settings: dict, limits, inp: Input, rows, skip) -> dict:
    """The provenance operation of this run (ids painted from 1, slice after slice)."""
    from ..core.replay import concept_op, everything_op

    slices = list(range(inp.depth)) if inp.is_stack else None
    if mode == "concept":
        op = concept_op(model, settings["text"], settings["exemplars"],
                        settings["exemplar_labels"], threshold=settings["threshold"],
                        min_area=settings["min_area"], limits=limits,
                        max_hole_area=settings["max_hole_area"],
                        max_sprinkle_area=settings["max_sprinkle_area"], slices=slices,
                        start_id=1, instances=rows)
    else:
        from ..core.everything import EverythingSettings

        fields = EverythingSettings.__dataclass_fields__
        op = everything_op(EverythingSettings(**{k: v for k, v in settings.items()
                                                 if k in fields}),
                           limits=limits, slices=slices, start_id=1, instances=rows)
    if skip is not None:  # replayed with the same rule
        mask = None if args.skip_mask is None else str(Path(args.skip_mask).absolute())
        op["skip"] = {"skip_empty": args.skip_empty, "skip_mask": mask}
    return op


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
