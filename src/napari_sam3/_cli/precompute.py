"""``precompute``: encode every tile of an image or stack (or of --region) into the
embedding cache, so later clicks only run the small mask decoder. IMAGE may be a folder
or a glob of images; with --scheduler the tiles are encoded on dask workers."""

from __future__ import annotations

import time

from .batch import batch_images
from .cache import MEMORY_ONLY, cache_path, cache_problem, human_bytes
from .cluster import check_cluster_args, client_from_args, skip_rule, skipped_note
from .errors import CliError, failed, reported_as_failed
from .inputs import check_region, input_from_args, resolve_limits
from .models import load_segmenter

SHOWN_SKIPPED = 20  # skipped tiles listed one per line, then counted


def cmd_precompute(args) -> int:
    check_cluster_args(args)
    images = batch_images(args.image)
    paths = [str(p) for p in images] if images is not None else [args.image]
    if images is not None and args.region is not None:
        raise CliError("--region applies to one image, not to a folder or glob of images")
    first = input_from_args(args, paths[0])
    region = check_region(args.region, first.plane_shape)
    cache = cache_path(args.cache)
    if problem := cache_problem(cache):
        raise CliError(f"precompute needs a usable cache: {problem}")
    skip = skip_rule(args)
    problems: list[str] = []
    segmenter = load_segmenter(args, cache, problems.append)  # creates the cache
    if problems:
        raise CliError(f"precompute needs a usable cache: {problems[0].removesuffix(MEMORY_ONLY)}")
    with client_from_args(args) as client:
        if client is None:
            for n, path in enumerate(paths, 1):
                # one image in memory at a time (a bad one stops the batch with its line)
                inp = first if n == 1 else input_from_args(args, path)
                first = None
                _announce(images, n, inp)
                _precompute_one(segmenter, inp, args, region, None, skip, problems)
            return 0
        # on workers: the next image's tiles are queued before this one's are counted,
        # so no worker waits between images (two images read at a time at most)
        ahead = (first, _submit(segmenter, first, args, region, client, skip))
        for n in range(1, len(paths) + 1):
            inp, submitted = ahead
            bad = None
            if n < len(paths):
                try:  # a bad next image stops the batch after this one, with its line
                    nxt = input_from_args(args, paths[n])
                    ahead = (nxt, _submit(segmenter, nxt, args, region, client, skip))
                except CliError as exc:
                    bad = exc
            _announce(images, n, inp)
            _precompute_one(segmenter, inp, args, region, client, skip, problems, submitted)
            if bad is not None:
                raise bad
    return 0


def _announce(images, n: int, inp) -> None:
    if images is not None:
        print(f"image {n}/{len(images)}: {inp.path}", flush=True)


def _planes(inp) -> list:
    return [inp.frames[k] for k in range(inp.depth)] if inp.is_stack else [inp.plane]


def _submit(segmenter, inp, args, region, client, skip) -> list:
    """The precompute tasks of every plane of ``inp``, submitted to the workers now."""
    from ..core.distributed.run import submit_precompute

    limits = resolve_limits(inp, args.limits)
    with reported_as_failed("precompute"):
        return [submit_precompute(segmenter, image, limits, region, client=client, skip=skip,
                                  batch_size=args.batch_size) for image in _planes(inp)]


def _precompute_one(segmenter, inp, args, region, client, skip, problems,
                    submitted=None) -> None:
    from ..core.distributed import PrecomputeReport, TileProgress

    limits = resolve_limits(inp, args.limits) if submitted is None else None
    planes = _planes(inp)
    report = PrecomputeReport()
    t0 = time.perf_counter()
    with reported_as_failed("precompute"):
        for k, image in enumerate(planes, 1):
            where = f"slice {k - 1} ({k}/{len(planes)}) " if inp.is_stack else ""
            bar, n_skipped = None, 0
            steps = (segmenter.precompute(image, limits, region, skip=skip, report=report,
                                          batch_size=args.batch_size)
                     if submitted is None else submitted[k - 1].results(report))
            for done, total, was_encoded in steps:
                if problems:  # the cache became unusable, e.g. the disk is full
                    raise failed("precompute stopped: " + problems[0].removesuffix(MEMORY_ONLY))
                state = "encoded" if was_encoded else "cached"
                if len(report.skipped) > n_skipped:
                    state, n_skipped = "skipped (empty)", len(report.skipped)
                if client is None:
                    print(f"{where}tile {done}/{total} {state}", flush=True)
                else:
                    bar = bar or TileProgress(total, where)
                    bar.update(done, f" {state}")
    seconds = time.perf_counter() - t0
    store = segmenter.store
    n = report.encoded + report.cached + len(report.skipped)
    on = f" on {inp.depth} slices" if inp.is_stack else ""
    print(
        f"precomputed {n} tile{'s' if n != 1 else ''}{on} of a {inp.describe()}: "
        f"{report.encoded} encoded, {report.cached} cached{skipped_note(report.skipped)}, "
        f"in {seconds:.1f} s; cache {store.path}: "
        f"{len(store.disk_entries())} entries, {human_bytes(store.disk_bytes())} on disk"
    )
    for box in report.skipped[:SHOWN_SKIPPED]:
        print(f"skipped empty tile rows {box[0]}:{box[2]}, cols {box[1]}:{box[3]}")
    if len(report.skipped) > SHOWN_SKIPPED:
        print(f"... and {len(report.skipped) - SHOWN_SKIPPED} more empty tiles skipped")
