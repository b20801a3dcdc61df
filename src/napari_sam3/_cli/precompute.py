"""``precompute``: encode every tile of an image or stack (or of --region) into the
embedding cache, so later clicks only run the small mask decoder."""

from __future__ import annotations

import time

from .cache import MEMORY_ONLY, cache_path, cache_problem, human_bytes
from .errors import CliError, failed, reported_as_failed
from .inputs import check_region, input_from_args, resolve_limits
from .models import load_segmenter


def cmd_precompute(args) -> int:
    inp = input_from_args(args)
    region = check_region(args.region, inp.plane_shape)
    cache = cache_path(args.cache)
    if problem := cache_problem(cache):
        raise CliError(f"precompute needs a usable cache: {problem}")
    limits = resolve_limits(inp, args.limits)

    problems: list[str] = []
    segmenter = load_segmenter(args, cache, problems.append)  # creates the cache
    if problems:
        raise CliError(f"precompute needs a usable cache: {problems[0].removesuffix(MEMORY_ONLY)}")
    images = [inp.frames[k] for k in range(inp.depth)] if inp.is_stack else [inp.plane]
    encoded = cached = 0
    t0 = time.perf_counter()
    with reported_as_failed("precompute"):
        for k, image in enumerate(images, 1):
            where = f"slice {k - 1} ({k}/{len(images)}) " if inp.is_stack else ""
            for done, total, was_encoded in segmenter.precompute(image, limits, region):
                if problems:  # the cache became unusable, e.g. the disk is full
                    raise failed("precompute stopped: " + problems[0].removesuffix(MEMORY_ONLY))
                encoded += was_encoded
                cached += not was_encoded
                state = "encoded" if was_encoded else "cached"
                print(f"{where}tile {done}/{total} {state}", flush=True)
    seconds = time.perf_counter() - t0
    store = segmenter.store
    n = encoded + cached
    on = f" on {inp.depth} slices" if inp.is_stack else ""
    print(
        f"precomputed {n} tile{'s' if n != 1 else ''}{on} of a {inp.describe()}: "
        f"{encoded} encoded, {cached} cached, in {seconds:.1f} s; cache {store.path}: "
        f"{len(store.disk_entries())} entries, {human_bytes(store.disk_bytes())} on disk"
    )
    return 0
