"""The client side: tiles submitted as dask tasks, results gathered as they come.

Every run submits one task per tile (``batch`` tiles per task for precompute), so the
scheduler balances them over the workers and redoes the tiles of a worker that dies;
the client merges (segment-everything and concepts: the existing seam merge) or only
counts (precompute: the entries are in the shared store). Leaving early (Ctrl-C, an
error, a closed generator) cancels the futures still pending; the store stays valid
because every entry is written by rename.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
import weakref
from dataclasses import dataclass, field

from .empty import tile_box
from .sources import ship, spec_of, split
from .tasks import concept_tile, everything_tile, precompute_tiles

RETRIES = 2  # a task that raises is tried again this often (a dead worker's are redone anyway)


@dataclass
class PrecomputeReport:
    """What a precompute did: tiles encoded, found cached, skipped as empty (boxes)."""

    encoded: int = 0
    cached: int = 0
    skipped: list = field(default_factory=list)
    keys: dict = field(default_factory=dict)  # tile box -> cache key

    def add(self, box, key, state: str) -> None:
        if state == "skipped":
            self.skipped.append(box)
            return
        self.keys[box] = key
        if state == "encoded":
            self.encoded += 1
        else:
            self.cached += 1


def _tasks_key(what: str) -> str:
    return f"napari-sam3-{what}-{uuid.uuid4().hex[:12]}"


def gather(client, futures, on_result):
    """``on_result(value)`` for each future as it completes; the rest are cancelled when
    this is left early (Ctrl-C, an error, a generator closed)."""
    from distributed import as_completed

    pending = set(futures)
    try:
        for fut in as_completed(futures):
            pending.discard(fut)
            yield on_result(fut.result())
    finally:
        if pending:
            client.cancel(list(pending))


# -- intensity limits that travel with the cache ------------------------------------------------
_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def source_id(image) -> str:
    """:func:`embedding_store.image_id` of the array behind ``image`` (a stack for one of
    its planes), remembered while that array lives."""
    from ..embedding_store import image_id

    data, _ = split(image)
    try:
        found = _IDS.get(data)
    except TypeError:  # not weak-referenceable
        return image_id(data)
    if found is None:
        found = image_id(data)
        _IDS[data] = found
    return found


def record_limits(model, image, limits) -> None:
    """Write the limits a precompute used for ``image`` into the store's image records."""
    store = model.store
    if store is None or store.path is None:
        return
    lim = None if limits is None else [float(v) for v in _flat(limits)]
    shape = None if limits is None else list(_shape(limits))
    store.put_record(source_id(image), {"limits": lim, "limits_shape": shape,
                                        "tile_size": model.tile_size, "overlap": model.overlap})


def recorded_limits(store, data):
    """The limits recorded for the image ``data`` in ``store`` (a pair or one pair per
    channel), or None when it has no record (or was recorded without limits)."""
    if store is None or store.path is None or not store.has_records():
        return None  # (no pixels read: the widget asks on every image choice)
    rec = store.get_record(source_id(data))
    if not rec or rec.get("limits") is None:
        return None
    import numpy as np

    lim = np.asarray(rec["limits"], dtype=np.float64).reshape(rec.get("limits_shape") or (-1,))
    return tuple(lim.tolist()) if lim.ndim == 1 else [tuple(p) for p in lim.tolist()]


def _flat(limits):
    import numpy as np

    return np.asarray(limits, dtype=np.float64).ravel()


def _shape(limits):
    import numpy as np

    return np.asarray(limits, dtype=np.float64).shape


# -- precompute ------------------------------------------------------------------------------
def iter_precompute(model, image, limits=None, region=None, *, client=None, skip=None,
                    report: PrecomputeReport | None = None, batch: int = 1,
                    batch_size: int | None = None):
    """``Sam3Segmenter.precompute``: yields ``(done, total, encoded)`` after each tile.

    With ``client`` the tiles are encoded on its workers (``batch`` tiles per task) into
    the segmenter's store, which every worker must reach. ``skip``: an
    :class:`~.empty.EmptyTiles` rule. ``report`` collects keys and skipped tiles.
    ``batch_size``: tiles per encoder forward, here or on each worker (None: the
    device's default, :func:`~..batch_encode.default_batch_size`).
    """
    from ..batch_encode import check_batch_size, precompute_batched

    batch_size = check_batch_size(batch_size, model.device)
    report = PrecomputeReport() if report is None else report
    limits = model.resolve_limits(image, limits)
    grid = model.tiles(image)
    todo = [k for k, t in enumerate(grid.tiles) if region is None or t.intersects(region)]
    record_limits(model, image, limits)
    total = len(todo)
    if client is None and batch_size > 1:
        yield from precompute_batched(model, image, grid, todo, limits, skip, report, batch_size)
        return
    if client is None:
        for i, k in enumerate(todo, 1):
            tile = grid.tiles[k]
            if skip is not None and skip.empty(image, grid, tile, limits):
                report.add(tile_box(tile), None, "skipped")
                yield i, total, False
                continue
            before = model.encoder_calls
            model.encode_tile(image, grid, tile, limits)
            new = model.encoder_calls > before
            report.add(tile_box(tile), None, "encoded" if new else "cached")
            yield i, total, new
        return
    yield from submit_precompute(model, image, limits, region, client=client, skip=skip,
                                 batch=batch, resolved=True, batch_size=batch_size
                                 ).results(report)


@dataclass
class SubmittedPrecompute:
    """The precompute tasks of one image, already on the cluster: :meth:`results` counts
    them as they finish (leaving it early cancels those still pending)."""

    client: object
    grid: object
    futures: list
    total: int

    def results(self, report: PrecomputeReport | None = None):
        """Yields ``(done, total, encoded)`` after each tile, as :func:`iter_precompute`."""
        report = PrecomputeReport() if report is None else report
        done = 0
        for part in gather(self.client, self.futures, lambda value: value):
            for k, key, state in part:
                done += 1
                report.add(tile_box(self.grid.tiles[k]), key, state)
                yield done, self.total, state == "encoded"

    def cancel(self) -> None:
        self.client.cancel(self.futures)


def submit_precompute(model, image, limits=None, region=None, *, client, skip=None,
                      batch: int = 1, resolved: bool = False,
                      batch_size: int | None = None) -> SubmittedPrecompute:
    """Submit the precompute tasks of ``image`` to ``client``'s workers now and return
    at once, so the tasks of the next image of a batch are queued while this one's
    finish (no worker waits between images). ``resolved``: ``limits`` are final.
    ``batch_size``: tiles per encoder forward on a worker (a task holds at least as
    many tiles; None: the default of the client's device)."""
    from ..batch_encode import check_batch_size

    batch_size = check_batch_size(batch_size, model.device)
    if model.store is None or model.store.path is None:
        raise ValueError("precompute on a dask cluster needs an embedding cache folder that "
                         "every worker can reach")
    if not resolved:
        limits = model.resolve_limits(image, limits)
        record_limits(model, image, limits)
    grid = model.tiles(image)
    todo = [k for k, t in enumerate(grid.tiles) if region is None or t.intersects(region)]
    spec = spec_of(model)
    data, lead = ship(client, image)
    name = _tasks_key("precompute")
    batch = max(1, int(batch), batch_size)
    futures = [client.submit(precompute_tiles, spec, data, lead, todo[i:i + batch], limits,
                             skip, batch_size, key=f"{name}-{i}", retries=RETRIES)
               for i in range(0, len(todo), batch)]
    return SubmittedPrecompute(client, grid, futures, len(todo))


# -- segment everything and concepts ---------------------------------------------------------
def everything_instances(client, model, image, grid, limits, settings, progress, skip):
    """Segment-everything's per-tile instances from the workers, in tile order (what the
    serial loop gives ``merge_tiles``), and the boxes of the tiles skipped as empty."""
    spec = spec_of(model)
    data, lead = ship(client, image)
    n_batches = -(-settings.points_per_side ** 2 // settings.points_per_batch)
    name = _tasks_key("everything")
    futures = [client.submit(everything_tile, spec, data, lead, k, limits, settings, skip,
                             key=f"{name}-{k}", retries=RETRIES) for k in range(len(grid))]
    return _by_tile(client, futures, grid, progress, n_batches)


def concept_candidates(client, model, image, grid, prompt, limits, floor, progress, skip):
    """The concept detector's per-tile candidates from the workers, in tile order."""
    spec = spec_of(model, "concept")
    data, lead = ship(client, image)
    name = _tasks_key("concept")
    futures = [client.submit(concept_tile, spec, data, lead, k, limits, prompt, floor, skip,
                             key=f"{name}-{k}", retries=RETRIES) for k in range(len(grid))]
    return _by_tile(client, futures, grid, progress, 1)


def _by_tile(client, futures, grid, progress, steps: int):
    found: dict[int, list | None] = {}
    total = len(futures)

    def keep(value):
        k, items = value
        found[k] = items
        if progress is not None:
            progress(len(found) * steps, total * steps)

    for _ in gather(client, futures, keep):
        pass
    items, skipped = [], []
    for k in range(total):
        if found[k] is None:
            skipped.append(tile_box(grid.tiles[k]))
        else:
            items += found[k]
    return items, skipped


# -- progress on the client ------------------------------------------------------------------
class TileProgress:
    """``tiles done/total``, rate and ETA: a bar redrawn in place on a terminal, plain
    lines (every ``every`` tiles, and the last) in a log."""

    def __init__(self, total: int, label: str = "", stream=None, every: int = 1):
        self.total, self.label = int(total), label
        self.stream = sys.stdout if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, int(every))
        self.t0 = time.perf_counter()

    def line(self, done: int, note: str = "") -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = "?" if eta == float("inf") else _duration(eta)
        return (f"{self.label}tile {done}/{self.total}{note} ({rate:.2f} tiles/s, "
                f"ETA {eta_text})")

    def update(self, done: int, note: str = "") -> None:
        if self.tty:
            width = 24
            bar = "#" * int(width * done / max(self.total, 1))
            end = "\n" if done >= self.total else ""
            self.stream.write(f"\r[{bar:<{width}}] {self.line(done, note)}\033[K{end}")
            self.stream.flush()
        elif done % self.every == 0 or done >= self.total:
            print(self.line(done, note), file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# -- the widget's precompute -----------------------------------------------------------------
def precompute_planes(model, lock, jobs, address: str | None):
    """The widget's *Precompute*: encode the tiles of each ``(plane, limits, region)``,
    yielding ``(done, total, encoded)``; with ``address`` (a running scheduler) on its
    workers. Each step holds ``lock`` (the model's) only while it runs, never across a
    yield; closing the generator (Cancel) cancels the pending tiles and the client."""
    with lock:
        total = sum(len(model.tiles(img).tiles_in(region)) for img, _, region in jobs)
    done = encoded = 0
    yield done, total, encoded
    client = None
    try:
        if address:
            from distributed import Client

            client = Client(address, timeout="20s")
        for img, limits, region in jobs:
            steps = model.precompute(img, limits, region, client=client)
            # on a scheduler the workers encode: clicks keep the model meanwhile
            hold = lock if client is None else contextlib.nullcontext()
            try:
                while True:
                    with hold:
                        try:
                            _, _, new = next(steps)
                        except StopIteration:
                            break
                    done += 1
                    encoded += bool(new)
                    yield done, total, encoded
            finally:
                steps.close()
    finally:
        if client is not None:
            client.close()
