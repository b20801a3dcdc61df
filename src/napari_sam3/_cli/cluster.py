"""--scheduler/--workers and the empty-tile options as the commands use them."""

from __future__ import annotations

import contextlib
import sys

from .errors import PROG, CliError


@contextlib.contextmanager
def client_from_args(args):
    """The ``distributed.Client`` of --scheduler/--workers (None without them), closed
    with what it started; a scheduler that cannot be used is one error line (exit 2)."""
    from ..core.distributed.cluster import SchedulerError, dashboard_link, open_client

    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(open_client(args.scheduler, args.workers))
        except SchedulerError as e:
            raise CliError(e) from None
        if client is not None:
            n = len(client.scheduler_info().get("workers", {}))
            link = dashboard_link(client)
            extra = f", dashboard {link}" if link else ""
            print(f"{PROG}: dask scheduler {client.scheduler.address}: {n} workers now{extra}",
                  file=sys.stderr, flush=True)
        yield client


def check_cluster_args(args) -> None:
    from ..core.distributed.cluster import SchedulerError, check_scheduler

    try:
        check_scheduler(args.scheduler, args.workers)
    except SchedulerError as e:
        raise CliError(e) from None


def skip_rule(args):
    """The EmptyTiles of --skip-empty / --skip-mask, or None."""
    if args.skip_empty is None and args.skip_mask is None:
        return None
    from ..core.distributed.empty import EmptyTiles

    mask = None
    if args.skip_mask is not None:
        import numpy as np

        from .inputs import read_image

        mask = np.asarray(read_image(args.skip_mask))
        if mask.ndim != 2:
            raise CliError(f"--skip-mask {args.skip_mask!r}: a mask is 2D (Y, X), got shape "
                           f"{mask.shape}")
    return EmptyTiles(args.skip_empty, mask)


def skipped_note(skipped: list) -> str:
    return f", {len(skipped)} skipped as empty" if skipped else ""
