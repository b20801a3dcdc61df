"""``segment --prompts``: one object per PROMPTS.json entry, on a 2D image, on chosen
slices of a stack, or tracked through the stack (``--propagate``)."""

from __future__ import annotations

from ..core.defaults import DEFAULT_STOP_AFTER
from .cache import optional_cache
from .errors import CliError, reported_as_failed, warn
from .inputs import Input, resolve_limits
from .models import load_segmenter
from .output import (
    check_output,
    commit,
    count_labels,
    finished,
    new_labels,
    plane,
    sidecar_path,
    staging,
)
from .prompt_files import by_slice, load_prompts

PROPAGATE_OPTIONS = ("first", "last", "start", "stop", "stop_after", "score_threshold")


def slice_range(args, depth: int) -> tuple[int, int]:
    """``(start, stop)``, stop excluded as in the API, from --first/--last (both included;
    --start and --stop, stop excluded, are kept for compatibility)."""
    if args.first is not None and args.start is not None:
        raise CliError("--start is the old name of --first: give one of them")
    if args.last is not None and args.stop is not None:
        raise CliError(
            "--last K (included) and --stop K (excluded) both end the range: give one of them"
        )
    given = "--first" if args.start is None else "--start"
    first = args.first if args.start is None else args.start
    first = 0 if first is None else first
    if args.stop is not None:
        if not 0 <= first < args.stop <= depth:
            raise CliError(
                f"{given} {first} --stop {args.stop}: need 0 <= start < stop <= {depth} "
                f"(--stop is excluded; the stack has {depth} slices, 0 to {depth - 1})"
            )
        return first, args.stop
    last = depth - 1 if args.last is None else args.last
    if not 0 <= first <= last <= depth - 1:
        raise CliError(
            f"{given} {first} --last {last}: need 0 <= first <= last <= {depth - 1} "
            f"(both included; the stack has {depth} slices, 0 to {depth - 1})"
        )
    return first, last + 1


def segment_prompts(args, inp: Input) -> int:
    objects = load_prompts(args.prompts, inp)
    prompts_by_slice = by_slice(objects)
    start = stop = None
    if args.propagate:
        start, stop = slice_range(args, inp.depth)
        if not any(start <= k < stop for k in prompts_by_slice):
            raise CliError(
                f"no prompted slice between slices {start} and {stop - 1} (both included); "
                f"prompted slices: {', '.join(map(str, prompts_by_slice))}"
            )
        if inp.frames.rgb and inp.frames.shape[-1] == 2:
            raise CliError("--propagate does not take 2-channel stacks; use 1, 3 or 4 channels")
    out = check_output(args.out, args.image, args.overwrite, inp.labels_shape)
    sidecar_path(out, args.image, args.overwrite)
    cache = optional_cache(args.cache)
    limits = resolve_limits(inp, args.limits)

    segmenter = load_segmenter(args, cache, warn, video=bool(args.propagate))
    post = dict(max_hole_area=args.max_hole_area, max_sprinkle_area=args.max_sprinkle_area)
    with reported_as_failed("segmentation"), staging(out) as staged:
        from ..core import replay

        record = start_record(segmenter, inp)
        labels = new_labels(staged, inp.labels_shape)
        if args.propagate:
            record.append(_propagate(segmenter, inp, prompts_by_slice, labels, limits, args,
                                     post, (start, stop)))
        else:
            for k, objs in prompts_by_slice.items():  # k is None on a 2D image
                image = inp.frames[k] if inp.is_stack else inp.plane
                target = plane(labels, k) if inp.is_stack else labels
                prompts, ids = list(objs.values()), list(objs)
                replay.segment(record, segmenter, image, prompts, ids=ids, limits=limits,
                               out=target, slice_index=k, **post)
        counts, labelled = count_labels(labels)
        for done, final in finished(staged, out, labels, record, args.overwrite):
            commit(done, final, args.overwrite)

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


def start_record(model, inp: Input):
    """A new provenance record of a run of ``model`` on ``inp``."""
    from pathlib import Path

    from ..core.provenance import Provenance

    stack = inp.is_stack
    return Provenance.start(model, inp.data, path=str(Path(inp.path).absolute()),
                            axis=inp.axis if stack else None, fixed=inp.fixed if stack else None,
                            rgb=inp.frames.rgb if stack else None, labels_shape=inp.labels_shape)


def _propagate(segmenter, inp: Input, prompts_by_slice, labels, limits, args, post,
               slices: tuple[int, int]) -> dict:
    """``Sam3Segmenter.iter_propagate`` over ``slices`` (start, stop excluded) into
    ``labels``, with a progress line per slice; returns its provenance operation."""
    from ..core.propagation import write_slice
    from ..core.replay import propagation_op

    score_threshold = 0.0 if args.score_threshold is None else args.score_threshold
    stop_after = DEFAULT_STOP_AFTER if args.stop_after is None else args.stop_after
    results = segmenter.iter_propagate(
        inp.data,
        prompts_by_slice,
        inp.axis,
        args.propagate,
        *slices,
        fixed=inp.fixed,
        limits=limits,
        score_threshold=score_threshold,
        stop_after=stop_after,
    )
    done = []
    for result in results:
        write_slice(labels, result, **post)
        result.logits = []  # the record keeps ids and scores only
        done.append(result)
        ids = ", ".join(map(str, result.ids)) or "none"
        print(f"slice {result.index} tracked (ids {ids})", flush=True)
    return propagation_op(prompts_by_slice, args.propagate, *slices, limits=limits,
                          score_threshold=score_threshold, stop_after=stop_after,
                          results=done, **post)
