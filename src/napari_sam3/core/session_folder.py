"""A session folder: one image's labels, their provenance and its prompts, to resume work.

Layout (schema ``napari-sam3/session``, :data:`VERSION`)::

    SESSION/
      zarr.json      a Zarr v3 group: {"napari_sam3": {"kind": "napari-sam3 session"}}
      session.json   the record (below), replaced atomically
      labels/        the labels: an OME-NGFF-style multiscale label image in
        0/ 1/ ...    ``core.pyramid``'s layout (level k: every f-th pixel of level 0),
                     with {"napari_sam3": {"kind": LABELS_KIND, "provenance": {...}}}

The record::

    {"schema": "napari-sam3/session", "version": 1, "software": {...}, "saved": ISO time,
     "image": {"path": str | null, "name": str, "shape": [...], "dtype": str,
               "rgb": bool, "fingerprint": {...}},      # provenance.image_fingerprint
     "labels": {"name": str, "shape": [...], "n_lead": int},
     "object_id": int,                                  # the current object
     "settings": {"model": str, "device": str, "cache": str | null,
                  "tiling": [tile, overlap] | null,
                  "postprocess": {"max_hole_area", "max_sprinkle_area", "overwrite"}},
     "points": {"name", "data": [[...], ...], "object_id": [...], "positive": [...]},
     "boxes": {"name", "data": [[[...], ...], ...], "shape_type": [...], "object_id": [...]},
     "autosave": true}                                  # only in autosaves (prunable)

``settings`` also holds ``channels`` (the image refs of the extra channel layers) and
the widget's ``propagation``, ``concept`` and ``everything`` fields.

The image is referenced by path and content fingerprint, never copied. A folder is
ours (:func:`is_session`) when it holds our marker, a record and nothing else; only
such a folder (or an empty one) is ever written over or removed. A whole session is
written into a staging folder beside the target, then renamed into place (a folder is
never renamed onto an existing one). Autosaves update only a region of the labels
(:func:`update_labels`): level 0 there and the same region of every lower level.

NumPy and Zarr only: no Qt, napari or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .io import LABELS_KIND

SCHEMA = "napari-sam3/session"
VERSION = 1
KIND = "napari-sam3 session"
RECORD = "session.json"
LABELS = "labels"
TMP_SUFFIX = ".napari-sam3-tmp"  # a file being replaced atomically
BLOCK = 2048  # rows and columns read and written at once when a region is large
ONE_WRITE = 1 << 24  # a region up to this many voxels is written in one piece
AUTOSAVE_ENV = "NAPARI_SAM3_AUTOSAVE_DIR"  # overrides the autosave folder's location


class SessionError(ValueError):
    """A folder that cannot be a session here; the message is one line for the user."""


# -- recognising ours ---------------------------------------------------------------------------
def _read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _is_tmp(name: str) -> bool:
    return name.endswith(TMP_SUFFIX)


def is_session(folder) -> bool:
    """True for a session folder we wrote: our marker in ``zarr.json``, a record, labels
    of ours, and nothing else (files being replaced by us aside)."""
    p = Path(folder)
    try:
        marker = _read_json(p / "zarr.json").get("attributes", {}).get("napari_sam3", {})
        record = _read_json(p / RECORD)
        labels = _read_json(p / LABELS / "zarr.json").get("attributes", {}).get(
            "napari_sam3", {})
        names = {c.name for c in p.iterdir()}
    except (OSError, ValueError, AttributeError):
        return False
    return (marker.get("kind") == KIND and isinstance(record, dict)
            and record.get("schema") == SCHEMA and labels.get("kind") == LABELS_KIND
            and all(n in ("zarr.json", RECORD, LABELS) or _is_tmp(n) for n in names))


def check_target(folder) -> Path:
    """``folder`` if a session may be written there: absent, empty, or a session of ours;
    else :class:`SessionError` (nothing is touched)."""
    p = Path(folder)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise SessionError(f"{p} is not a folder: choose a new or empty folder for the session")
    if p.is_dir() and any(p.iterdir()) and not is_session(p):
        raise SessionError(f"{p} is not empty and is not a napari-sam3 session: it is never "
                           "replaced (choose a new or empty folder)")
    return p


def remove(folder) -> bool:
    """Delete a session folder of ours; anything else is left alone (returns False). A
    deletion that fails raises :class:`SessionError`."""
    if not is_session(folder):
        return False
    try:
        shutil.rmtree(folder)
    except OSError as e:
        raise SessionError(f"cannot delete the session {folder}: {e}") from None
    return True


# -- the record ---------------------------------------------------------------------------------
def new_record(*, image: dict, labels: dict, settings: dict, object_id: int,
               points: dict | None = None, boxes: dict | None = None) -> dict:
    """A record (see the module docstring) with the schema, version, software and time."""
    from .provenance import _software, jsonable

    return jsonable({"schema": SCHEMA, "version": VERSION, "software": _software(),
                     "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), "image": image,
                     "labels": labels, "object_id": int(object_id), "settings": settings,
                     "points": points, "boxes": boxes})


def check_record(record) -> dict:
    """The record if we can read it, else :class:`SessionError`."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise SessionError("not a napari-sam3 session record")
    if int(record.get("version", 0)) > VERSION:
        raise SessionError(f"session version {record.get('version')} is newer than this "
                           f"napari-sam3 reads ({VERSION}): upgrade napari-sam3")
    for key in ("image", "labels"):
        if not isinstance(record.get(key), dict):
            raise SessionError(f"the session record has no {key}")
    return record


def read_record(folder) -> dict:
    """The record of a session folder of ours, else :class:`SessionError`."""
    p = Path(folder)
    if not is_session(p):
        raise SessionError(f"{p} is not a napari-sam3 session folder")
    try:
        return check_record(_read_json(p / RECORD))
    except (OSError, ValueError) as e:
        raise SessionError(f"cannot read the session {p}: {e}") from None


def _write_json(path: Path, value) -> None:
    """Write JSON to ``path`` atomically: a temporary file beside it, then replaced."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(value, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def write_record(folder, record: dict) -> None:
    """Replace the record of a session folder of ours (atomically)."""
    _write_json(Path(folder) / RECORD, check_record(record))


def set_provenance(folder, provenance) -> None:
    """Store the labels' provenance (a ``Provenance``, its dict, or None) in the labels
    group's attributes, replacing its ``zarr.json`` atomically."""
    record = provenance.to_dict() if hasattr(provenance, "to_dict") else provenance
    meta_path = Path(folder) / LABELS / "zarr.json"
    meta = _read_json(meta_path)
    attrs = meta.setdefault("attributes", {})
    attrs["napari_sam3"] = {"kind": LABELS_KIND, "provenance": record or {}}
    _write_json(meta_path, meta)


def read_provenance(folder) -> dict | None:
    """The labels' provenance dict (None when none was recorded)."""
    try:
        attrs = _read_json(Path(folder) / LABELS / "zarr.json").get("attributes", {})
    except (OSError, ValueError):
        return None
    record = attrs.get("napari_sam3", {}).get("provenance")
    return record or None


def image_mismatch(recorded: dict, current: dict) -> str | None:
    """Why the image ``current`` (``path``, ``name``, ``shape``, ``fingerprint``) is not
    the session's image ``recorded`` (one line), or None when it is."""
    if list(current.get("shape", [])) != list(recorded.get("shape", [])):
        return (f"the session's image has shape {tuple(recorded.get('shape', []))}, this "
                f"one {tuple(current.get('shape', []))}")
    if current.get("fingerprint") != recorded.get("fingerprint"):
        return ("the session's image changed since it was saved (its pixels differ: "
                "content fingerprint)")
    return None


def same_image_ref(recorded: dict, current: dict) -> bool:
    """True when ``current`` names the session's image: the same path (when one was
    recorded), else the same layer name."""
    if recorded.get("path"):
        return bool(current.get("path")) and _norm(recorded["path"]) == _norm(current["path"])
    return recorded.get("name") == current.get("name")


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(str(path)))


# -- labels -----------------------------------------------------------------------------------------
def _read(source, key) -> np.ndarray:
    """``source`` (NumPy, Zarr, a Pyramid, a list of levels) at ``key`` of level 0."""
    if isinstance(source, list | tuple):
        source = source[0]
    if hasattr(source, "read") and hasattr(source, "levels"):
        return np.asarray(source.read(key))
    return np.asarray(source[key])


def _blocks(key: tuple):
    """Sub-keys of a full key: the whole key when it is small, else one leading index
    at a time and ``BLOCK`` x ``BLOCK`` pieces of its plane."""
    sizes = [s.stop - s.start for s in key if isinstance(s, slice)]
    if int(np.prod(sizes, dtype=np.int64)) <= ONE_WRITE:
        yield key
        return
    lead, (rows, cols) = key[:-2], key[-2:]
    lead_ranges = [range(k.start, k.stop) if isinstance(k, slice) else [k] for k in lead]
    for idx in itertools.product(*lead_ranges):
        for r in range(rows.start, rows.stop, BLOCK):
            for c in range(cols.start, cols.stop, BLOCK):
                yield tuple(idx) + (slice(r, min(r + BLOCK, rows.stop)),
                                    slice(c, min(c + BLOCK, cols.stop)))


def _pyramid(folder):
    from .pyramid import Pyramid

    return Pyramid.open(Path(folder) / LABELS)


def copy_labels(pyramid, source, key=(), *, changed_only: bool = False,
                fresh: bool = False) -> int:
    """Copy ``source`` over ``key`` (level 0) into ``pyramid`` block by block (every level
    follows); ``changed_only``: blocks equal to the pyramid's are skipped; ``fresh``: the
    pyramid is all 0 there, so all-0 blocks are skipped. Returns the largest id copied."""
    top = 0
    for block in _blocks(pyramid.full_key(key)):
        values = _read(source, block)
        biggest = int(values.max()) if values.size else 0
        if (fresh and biggest == 0 and not values.any()) or (
                changed_only and np.array_equal(pyramid.read(block), values)):
            top = max(top, biggest)
            continue
        pyramid.write(block, values)
        top = max(top, biggest)
    return top


def update_labels(folder, source, region=None) -> int:
    """Write ``source`` (the labels as they are now) over ``region`` (ints and slices;
    None: anywhere, then only the blocks that differ are written) into the session's
    labels, at every level; returns the largest id in what was read."""
    pyramid = _pyramid(folder)
    if tuple(pyramid.shape) != tuple(int(s) for s in source.shape):
        raise SessionError(f"the session's labels have shape {pyramid.shape}, these "
                           f"{tuple(source.shape)}")
    if region is None:
        return copy_labels(pyramid, source, (), changed_only=True)
    return copy_labels(pyramid, source, tuple(region))


def read_labels(folder):
    """The session's labels as a :class:`~napari_sam3.core.pyramid.Pyramid` (lazy)."""
    return _pyramid(folder)


# -- writing a whole session ---------------------------------------------------------------------
def _stage(target: Path) -> Path:
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.napari-sam3-", suffix=".partial",
                                 dir=parent))


def _build(folder: Path, record: dict, labels, provenance, image_levels) -> int:
    """A complete session in the new folder ``folder``; returns the largest id."""
    import zarr

    from .pyramid import Pyramid

    check_record(record)
    shape = tuple(int(s) for s in (record["labels"].get("shape") or labels.shape))
    n_lead = int(record["labels"].get("n_lead", len(shape) - 2))
    zarr.open_group(folder, mode="w", zarr_format=3,
                    attributes={"napari_sam3": {"kind": KIND, "version": VERSION}})
    pyramid = Pyramid.create(folder / LABELS, shape, n_lead, image_levels)
    set_provenance(folder, provenance)
    top = 0 if labels is None else copy_labels(pyramid, labels, (), fresh=True)
    _write_json(folder / RECORD, record)
    return top


def write_session(folder, record: dict, labels=None, provenance=None, *,
                  image_levels=None) -> Path:
    """Write a whole session at ``folder`` (absent, empty or a session of ours, which is
    replaced): ``labels`` (NumPy, Zarr, a Pyramid; None: all 0, of the record's labels
    shape) with ``provenance``, and the record. Built in a staging folder beside it and
    renamed into place; returns the folder."""
    target = check_target(folder)
    stage = _stage(target)
    old, placed = stage / "old", False
    try:
        new = stage / "new"
        _build(new, record, labels, provenance, image_levels)
        check_target(target)  # may have changed meanwhile
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        elif target.exists():
            os.replace(target, old)
        try:
            os.replace(new, target)
            placed = True
        except BaseException as exc:
            if old.exists():
                try:
                    os.replace(old, target)
                except OSError:
                    raise SessionError(f"cannot put the new session at {target} ({exc}); "
                                       f"your previous session is at {old}") from exc
            raise
    finally:
        if placed or not old.exists():  # never delete the previous session not put back
            with contextlib.suppress(OSError):
                shutil.rmtree(stage)
    return target


# -- autosaves ------------------------------------------------------------------------------------
def autosave_root() -> Path:
    """Where autosaves of sessions not saved yet go: ``$NAPARI_SAM3_AUTOSAVE_DIR``, else
    ``autosave`` in the user's data folder (platformdirs)."""
    env = os.environ.get(AUTOSAVE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-sam3", appauthor=False)) / "autosave"


def new_autosave_folder(name: str, root=None) -> Path:
    """A fresh (not yet existing) autosave folder for an image called ``name``."""
    root = autosave_root() if root is None else Path(root)
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))[:40]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    salt = hashlib.blake2b(f"{os.getpid()}{time.time_ns()}".encode(), digest_size=3).hexdigest()
    return root / f"{slug or 'image'}-{stamp}-{salt}"


KEEP_AUTOSAVES = 5  # per image, besides those in use: older ones are deleted
PRUNE_AFTER_S = 24 * 3600  # an autosave written to within this time is never deleted


def prune_autosaves(image: dict, keep: int = KEEP_AUTOSAVES, root=None,
                    exclude=()) -> list[Path]:
    """Delete the autosaves of ``image`` (as :func:`find_autosaves` finds them) beyond the
    ``keep`` newest. Only folders that are sessions of ours *and* were written as
    autosaves (``"autosave": true`` in their record; a session the user saved is never
    pruned, even there), none in ``exclude``, and none whose record changed in the last
    :data:`PRUNE_AFTER_S` (another napari may still be autosaving into it). Returns the
    deleted folders (one that cannot be deleted is left, and skipped)."""
    removed = []
    now = time.time()
    for folder in find_autosaves(image, root, exclude)[max(0, int(keep)):]:
        try:
            if not read_record(folder).get("autosave"):
                continue
            if now - (Path(folder) / RECORD).stat().st_mtime < PRUNE_AFTER_S:
                continue
            if remove(folder):
                removed.append(folder)
        except (SessionError, OSError):
            continue
    return removed


def find_autosaves(image: dict, root=None, exclude=()) -> list[Path]:
    """Autosaves (sessions of ours under the autosave root) of ``image`` (``path``,
    ``name``, ``shape``, ``fingerprint``): same path or name and same pixels, newest
    first; folders in ``exclude`` are left out."""
    root = autosave_root() if root is None else Path(root)
    skip = {_norm(p) for p in exclude}
    found = []
    try:
        children = list(root.iterdir())
    except OSError:
        return []
    for child in children:
        if _norm(child) in skip or not child.is_dir():
            continue
        try:
            rec = read_record(child)
        except SessionError:
            continue
        if same_image_ref(rec["image"], image) and image_mismatch(rec["image"], image) is None:
            found.append((str(rec.get("saved", "")), child))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


__all__ = ["SCHEMA", "VERSION", "KIND", "SessionError", "is_session", "check_target",
           "remove", "new_record", "check_record", "read_record", "write_record",
           "set_provenance", "read_provenance", "image_mismatch", "same_image_ref",
           "copy_labels", "update_labels", "read_labels", "write_session", "autosave_root",
           "new_autosave_folder", "find_autosaves", "prune_autosaves", "KEEP_AUTOSAVES"]
