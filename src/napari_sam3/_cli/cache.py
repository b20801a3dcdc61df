"""The embedding cache from the command line: where --cache points, whether it can be
used, and the ``cache info`` / ``cache clear`` commands."""

from __future__ import annotations

from pathlib import Path

from .errors import CliError, warn

MEMORY_ONLY = "; embeddings are kept in memory only"


def cache_path(value: str | None) -> Path | None:
    """The folder --cache names: None, 'default' (the user cache folder) or a path."""
    if value is None:
        return None
    if value == "default":
        from ..core.embedding_store import default_cache_path

        return default_cache_path()
    return Path(value).expanduser()


def cache_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the cache, or None; changes nothing on disk. The store
    decides (``embedding_store.location_problem``): a folder of other files, another Zarr
    store, a store of another format version, a file, a place that cannot be written."""
    from ..core.embedding_store import location_problem

    why = location_problem(path)
    return None if why is None else f"cannot use the embedding cache at {path} ({why})"


def optional_cache(value: str | None) -> Path | None:
    """The --cache folder of ``segment``; an unusable one is a warning, then no cache."""
    cache = cache_path(value)
    if cache is not None and (problem := cache_problem(cache)):
        warn(problem + MEMORY_ONLY)
        return None
    return cache


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _open_existing_cache(args):
    """The EmbeddingStore at --cache if a napari-sam3 cache is there; None if nothing is."""
    from ..core.embedding_store import EmbeddingStore

    path = cache_path(args.cache)
    if not path.exists():
        return path, None
    try:
        return path, EmbeddingStore.existing(path)
    except ValueError as e:
        raise CliError(f"{str(path)!r} is {e}") from None


def cmd_cache_info(args) -> int:
    from ..core.embedding_store import ORPHAN_AGE_S

    path, store = _open_existing_cache(args)
    entries = len(store.disk_entries()) if store else 0
    size = store.disk_bytes() if store else 0
    orphans = len(store.orphans()) if store else 0
    print(f"cache: {path}{'' if store else ' (does not exist yet)'}")
    if store and store.format_problem:
        print(f"format: {store.format_problem}")
    print(f"entries: {entries}")
    print(f"size: {human_bytes(size)} ({size} bytes)")
    print(f"leftovers: {orphans} (unfinished writes older than {ORPHAN_AGE_S // 3600} h; "
          "'cache clear' or the next run that writes removes them)")
    return 0


def cmd_cache_clear(args) -> int:
    path, store = _open_existing_cache(args)
    if store is None:
        print(f"no cache at {path}; nothing to clear")
        return 0
    entries, size = len(store.disk_entries()), store.disk_bytes()
    leftovers = store.clear()
    also = f" and {leftovers} leftover{'s' if leftovers != 1 else ''}" if leftovers else ""
    noun = "entry" if entries == 1 else "entries"
    print(f"cleared {entries} {noun} ({human_bytes(size)}){also} from {path}")
    return 0
