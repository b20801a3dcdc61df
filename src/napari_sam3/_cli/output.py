"""What ``segment`` writes: OUT checked up front, built in a hidden staging folder and
renamed into place (never a partial OUT), label images too large for memory, and the
per-instance score tables (OUT.csv, or the Zarr labels group's attributes).

Overwrite rule: ``--overwrite`` replaces only an output of the same kind, a file for a
TIFF OUT or OUT.csv, a labels Zarr we wrote (``io.is_labels_zarr``: our marker, nothing
else inside) for a Zarr OUT; never the input image or a folder holding it.

Leftovers: a killed run leaves its staging folder ``.OUT.napari-sam3-XXXX.partial``
beside OUT; the next run to the same OUT removes those untouched for STALE_STAGING_S.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import CliError

#: A staging folder with nothing written in it for this long (seconds) is a killed
#: run's leftover. A TIFF output is written only when its run ends, so the limit must
#: exceed the longest run: a week.
STALE_STAGING_S = 7 * 24 * 3600
_STAGING_TAG, _STAGING_SUFFIX = ".napari-sam3-", ".partial"


def _exists_error(shown: str) -> CliError:
    return CliError(f"{shown} already exists (pass --overwrite to replace it)")


def _not_replaceable(path: Path, image_path: str | None) -> str | None:
    """Why --overwrite may not replace the existing ``path``, or None."""
    from ..core import io

    target = path.resolve()
    if image_path is not None:
        image = Path(image_path).resolve()
        if image == target:
            return "it is the input image"
        if target in image.parents:
            return f"it holds the input image {image_path!r}"
    if path.suffix.lower() in io.ZARR_SUFFIXES:
        if io.is_labels_zarr(path):
            return None
        return "it is not a labels Zarr written by napari-sam3, or holds other files"
    if path.is_file():
        return None
    return "it is a folder, not a file" if path.is_dir() else "it is not a regular file"


def _check_replaceable(path: Path, shown: str, image_path: str | None, overwrite: bool) -> None:
    """Refuse an existing ``path`` without --overwrite, and with it anything but an output
    of the same kind (see the module's overwrite rule)."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise _exists_error(shown)
        if why := _not_replaceable(path, image_path):
            raise CliError(
                f"refusing to overwrite {shown}: {why} (--overwrite only replaces a labels "
                "file or a labels Zarr that napari-sam3 wrote)"
            )


def check_output(out: str, image_path: str, overwrite: bool, labels_shape=None) -> Path:
    """OUT as a Path: a label suffix (or IMAGE.zarr/labels/NAME of an OME-Zarr image whose
    label images fit ``labels_shape``), replaceable, in a writable folder."""
    from ..core import io

    p = Path(out)
    if (target := ngff_target(p)) is not None:
        from ..core.ngff import check_target, labels_shape_fits

        try:
            check_target(*target, overwrite)
            if labels_shape is not None:
                labels_shape_fits(target[0], labels_shape)
        except (OSError, ValueError) as e:
            raise CliError(e) from None
        if not os.access(target[0].absolute().parent, os.W_OK | os.X_OK):
            raise CliError(f"cannot write {out!r}: the folder holding {str(target[0])!r} is "
                           "not writable")
        return p
    if p.suffix.lower() not in io.LABEL_SUFFIXES:
        raise CliError(
            f"cannot write labels to {out!r}: unsupported suffix {p.suffix or '(none)'!r}, "
            f"use one of {', '.join(io.LABEL_SUFFIXES)}"
        )
    _check_replaceable(p, repr(out), image_path, overwrite)
    parent = p.absolute().parent
    if not parent.is_dir():
        raise CliError(f"cannot write {out!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {out!r}: folder {str(parent)!r} is not writable")
    return p


def ngff_target(out: Path) -> tuple[Path, str] | None:
    """(IMAGE, NAME) of an OUT that is IMAGE.zarr/labels/NAME, else None."""
    from ..core.ngff import labels_target

    return labels_target(out)


def sidecar_path(out: Path, image_path: str, overwrite: bool) -> Path | None:
    """OUT.tif.json, the provenance of a TIFF output, checked like OUT (None for Zarr)."""
    if out.suffix.lower() not in (".tif", ".tiff") or ngff_target(out) is not None:
        return None
    path = out.with_name(out.name + ".json")
    _check_replaceable(path, f"{str(path)!r} (the provenance of {str(out)!r})", image_path,
                       overwrite)
    return path


def scores_path(out: Path, image_path: str, overwrite: bool) -> Path | None:
    """OUT.csv next to a TIFF output (None for Zarr: scores go into its attributes)."""
    if out.suffix.lower() == ".zarr" or ngff_target(out) is not None:
        return None
    csv_path = out.with_suffix(".csv")
    shown = f"{str(csv_path)!r} (the scores of {str(out)!r})"
    _check_replaceable(csv_path, shown, image_path, overwrite)
    return csv_path


def _newest_mtime(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def stale_staging(out: Path) -> list[Path]:
    """Staging folders of OUT that killed runs left: ours by name, untouched for longer
    than STALE_STAGING_S (age alone: other runs may be writing to the same OUT)."""
    pattern = re.compile(
        re.escape(f".{out.name}{_STAGING_TAG}") + r"[a-z0-9_]+" + re.escape(_STAGING_SUFFIX)
    )
    found = []
    for p in out.absolute().parent.iterdir():
        with contextlib.suppress(OSError):  # removed meanwhile by another run
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                if time.time() - _newest_mtime(p) > STALE_STAGING_S:
                    found.append(p)
    return sorted(found)


@contextlib.contextmanager
def staging(out: Path):
    """A path named like OUT in a hidden sibling folder, removed on the way out; stale
    staging folders of the same OUT go first."""
    ngff = ngff_target(out)  # IMAGE.zarr/labels/NAME: level 0 staged beside IMAGE.zarr
    where = out if ngff is None else ngff[0].absolute().parent / f"{ngff[0].name}.{ngff[1]}"
    for old in stale_staging(where):
        shutil.rmtree(old, ignore_errors=True)
    tmpdir = Path(
        tempfile.mkdtemp(
            prefix=f".{where.name}{_STAGING_TAG}", suffix=_STAGING_SUFFIX,
            dir=where.absolute().parent
        )
    )
    try:  # same name, so e.g. the Zarr group is named after OUT
        yield tmpdir / (out.name if ngff is None else f"{out.name}.zarr")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that may not be replaced (before committing what goes with it)."""
    _check_replaceable(out, repr(str(out)), None, overwrite)


def commit(staged: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``staged`` output into place: never a partial OUT."""
    if out.exists() or out.is_symlink():
        _check_replaceable(out, repr(str(out)), None, overwrite)  # may have appeared meanwhile
        if staged.is_file() and not out.is_dir():
            os.replace(staged, out)  # atomic
            return
        old = staged.parent / (out.name + ".old")  # directories cannot be replaced in one step
        os.replace(out, old)
        try:
            os.replace(staged, out)
        except BaseException:
            os.replace(old, out)
            raise
    else:
        os.replace(staged, out)


def finished(staged: Path, out: Path, labels, record, overwrite: bool,
             extra: tuple = ()) -> list[tuple[Path, Path]]:
    """Write the finished labels with their provenance ``record``; returns the ``(staged,
    final)`` pairs to :func:`commit`, in order, OUT last. IMAGE.zarr/labels/NAME is put in
    place here (``ngff.write_ngff_labels``: nothing to commit); a labels Zarr gets the
    record in its attributes; a TIFF is written with its OUT.tif.json sidecar. ``extra``:
    staged files that go with OUT (e.g. OUT.csv), committed before it."""
    from ..core import io

    if (target := ngff_target(out)) is not None:
        from ..core.ngff import write_ngff_labels
        from .colors import napari_colors

        counts, _ = count_labels(labels)
        write_ngff_labels(*target, labels, record, overwrite, colors=napari_colors(counts),
                          properties=record.label_properties(counts))
        return []
    if staged.suffix.lower() in io.ZARR_SUFFIXES:
        import zarr

        group = zarr.open_group(staged, mode="r+")
        group.attrs["napari_sam3"] = {**group.attrs.get("napari_sam3", {}),
                                      "provenance": record.to_dict()}
    else:
        io.write_labels(staged, labels)
        side = staged.parent / (staged.name + ".json")
        side.write_text(record.to_json(indent=1), encoding="utf-8")
        extra = (*extra, (side, out.with_name(out.name + ".json")))
    if extra:
        refuse_existing(out, overwrite)  # before what goes with it is replaced
    return [*extra, (staged, out)]  # OUT last: it appears with what describes it


def read_record(path: str):
    """The provenance of a labels output (its Zarr attributes or OUT.tif.json)."""
    from ..core import io
    from ..core.ngff import read_provenance
    from ..core.provenance import Provenance, ProvenanceError

    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        raise CliError(f"labels {path!r}: no such file or folder")
    try:
        if p.is_dir():
            found = read_provenance(p)
            if found is None:
                raise CliError(f"labels {path!r} hold no napari-sam3 provenance")
            return Provenance.from_dict(found)
        side = p.with_name(p.name + ".json")
        if p.suffix.lower() not in io.TIF_SUFFIXES or not side.is_file():
            raise CliError(f"labels {path!r}: no provenance ({side.name} not found)")
        return Provenance.from_json(side.read_text(encoding="utf-8"))
    except ProvenanceError as e:
        raise CliError(f"labels {path!r}: {e}") from None


# ---------------------------------------------------------------------- label images


def new_labels(staged: Path, shape: tuple):
    """Empty int32 labels for the staged OUT: for .zarr an NGFF labels group there, filled
    region by region (the label image is never all in memory), else a NumPy array."""
    if staged.suffix.lower() == ".zarr":
        from ..core import io

        return io.create_labels_zarr(staged, shape, name=staged.stem, overwrite=True)
    import numpy as np

    return np.zeros(shape, dtype=np.int32)


def plane(labels, k: int):
    """Slice ``k`` of 3D labels, to read and write: a NumPy view, or a plane of Zarr."""
    import numpy as np

    from ..core.planes import PlaneView

    return labels[k] if isinstance(labels, np.ndarray) else PlaneView(labels, (k,))


def count_labels(labels) -> tuple[dict[int, int], int]:
    """Pixels per id and the number of labelled slices, read one chunk at a time."""
    import numpy as np

    from ..core import io

    counts: dict[int, int] = {}
    planes = (
        [labels] if len(labels.shape) == 2 else [plane(labels, k) for k in range(labels.shape[0])]
    )
    labelled = 0
    for one in planes:
        if isinstance(one, np.ndarray):
            blocks = [np.asarray(one)]
        else:
            step = tuple(labels.chunks[-2:])
            blocks = (np.asarray(one[b]) for b in io._chunk_regions(one.shape, step))
        any_label = False
        for block in blocks:
            ids, n = np.unique(block, return_counts=True)
            for i, c in zip(ids.tolist(), n.tolist(), strict=True):
                if i != 0:
                    counts[i] = counts.get(i, 0) + c
                    any_label = True
        labelled += any_label
    return counts, labelled


# ---------------------------------------------------------------------- score tables


def instance_rows(features: dict, k: int | None) -> list[dict]:
    """One dict per painted instance: id, (slice,) score, area and the mode's extras."""
    import numpy as np

    extra = [key for key in features if key not in ("index", "score", "area")]
    rows = []
    for i in range(len(features["index"])):
        row: dict[str, Any] = {"id": int(features["index"][i])}
        if k is not None:
            row["slice"] = k
        row["score"] = float(features["score"][i])
        row["area"] = int(features["area"][i])
        for key in extra:
            value = float(features[key][i])
            row[key] = value if np.isfinite(value) else None
        rows.append(row)
    return rows


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_scores_attrs(path: Path, mode: str, settings: dict, rows: list[dict]) -> None:
    """The instance table in the labels group's attributes, under ``napari_sam3``."""
    import zarr

    group = zarr.open_group(path, mode="r+")
    group.attrs["napari_sam3"] = {
        **group.attrs.get("napari_sam3", {}),  # io's marker: this labels Zarr is ours
        "mode": mode,
        "settings": _jsonable(settings),
        "instances": rows,
    }


def write_scores_csv(path: Path, rows: list[dict]) -> None:
    """The instance table as CSV: a header, then one row per instance."""
    import csv

    columns = list(rows[0]) if rows else ["id", "score", "area"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
