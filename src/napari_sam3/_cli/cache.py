"""The embedding cache from the command line: where --cache points, whether it can be
used, and the ``cache info`` / ``cache clear`` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CliError, warn

MEMORY_ONLY = "; embeddings are kept in memory only"


def cache_path(value: str | None) -> Path | None:
    """The folder --cache names: None, 'default' (the user cache folder) or a path."""
    if value is None:
        return None
    if value == "default":
        from ..embedding_store import default_cache_path

        return default_cache_path()
    return Path(value).expanduser()


def _is_cache(path: Path) -> bool:
    """True if ``path`` holds a napari-sam3 embedding cache (read-only check)."""
    from ..embedding_store import STORE_KIND

    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        return meta.get("attributes", {}).get("napari_sam3", {}).get("kind") == STORE_KIND
    except (OSError, ValueError, AttributeError):
        return False


def cache_problem(path: Path, strict: bool = False) -> str | None:
    """Why ``path`` cannot be the cache, or None; changes nothing on disk.

    Always refused: a folder of other data (the cache would be written into it). With
    ``strict`` (precompute, before loading the model), also what the store itself would
    refuse later: a file, a Zarr store of another kind, a place that cannot be written.
    """
    why = None
    if path.is_dir() and not (path / "zarr.json").is_file() and any(path.iterdir()):
        why = "a folder that is not a napari-sam3 embedding cache; choose an empty or new folder"
    elif strict:
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not existing.is_dir():
            why = "not a folder" if existing == path else f"{existing} is not a folder"
        elif existing == path and (path / "zarr.json").is_file() and not _is_cache(path):
            why = "a Zarr store that is not a napari-sam3 embedding cache"
        elif not os.access(existing, os.W_OK | os.X_OK):
            why = f"{existing} is not writable"
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
    from ..embedding_store import EmbeddingStore

    path = cache_path(args.cache)
    if not path.exists():
        return path, None
    if not _is_cache(path):
        raise CliError(f"{str(path)!r} is not a napari-sam3 embedding cache")
    problems: list[str] = []
    store = EmbeddingStore(path, on_warning=problems.append)
    if problems:
        raise CliError(problems[0].removesuffix(MEMORY_ONLY))
    return path, store


def cmd_cache_info(args) -> int:
    path, store = _open_existing_cache(args)
    entries = len(store.disk_entries()) if store else 0
    size = store.disk_bytes() if store else 0
    print(f"cache: {path}{'' if store else ' (does not exist yet)'}")
    print(f"entries: {entries}")
    print(f"size: {human_bytes(size)} ({size} bytes)")
    return 0


def cmd_cache_clear(args) -> int:
    path, store = _open_existing_cache(args)
    if store is None:
        print(f"no cache at {path}; nothing to clear")
        return 0
    entries, size = len(store.disk_entries()), store.disk_bytes()
    store.clear()
    print(f"cleared {entries} entries ({human_bytes(size)}) from {path}")
    return 0
