"""What ``segment`` writes: OUT checked up front, built in a hidden staging folder and
renamed into place (never a partial OUT), label images too large for memory, and the
per-instance score tables (OUT.csv, or the Zarr labels group's attributes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import CliError


def _exists_error(shown: str) -> CliError:
    return CliError(f"{shown} already exists (pass --overwrite to replace it)")


def _check_replaceable(path: Path, shown: str, image_path: str, overwrite: bool) -> None:
    """Refuse an existing ``path`` without --overwrite, and the input image always."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise _exists_error(shown)
        if path.resolve() == Path(image_path).resolve():
            raise CliError(f"refusing to overwrite the input image {image_path!r}")


def check_output(out: str, image_path: str, overwrite: bool) -> Path:
    """OUT as a Path: a label suffix, replaceable, in a writable folder."""
    from .. import io

    p = Path(out)
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


def scores_path(out: Path, image_path: str, overwrite: bool) -> Path | None:
    """OUT.csv next to a TIFF output (None for Zarr: scores go into its attributes)."""
    if out.suffix.lower() == ".zarr":
        return None
    csv_path = out.with_suffix(".csv")
    shown = f"{str(csv_path)!r} (the scores of {str(out)!r})"
    _check_replaceable(csv_path, shown, image_path, overwrite)
    return csv_path


@contextlib.contextmanager
def staging(out: Path):
    """A path named like OUT in a hidden sibling folder, removed on the way out."""
    tmpdir = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.absolute().parent)
    )
    try:
        yield tmpdir / out.name  # same name, so e.g. the Zarr group is named after OUT
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an existing OUT without --overwrite (before committing what goes with it)."""
    if not overwrite and (out.exists() or out.is_symlink()):
        raise _exists_error(repr(str(out)))


def commit(staged: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``staged`` output into place: never a partial OUT."""
    if out.exists() or out.is_symlink():
        if not overwrite:  # appeared while we were segmenting
            raise _exists_error(repr(str(out)))
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


# ---------------------------------------------------------------------- label images


def new_labels(staged: Path, shape: tuple):
    """Empty int32 labels for the staged OUT: for .zarr an NGFF labels group there, filled
    region by region (the label image is never all in memory), else a NumPy array."""
    if staged.suffix.lower() == ".zarr":
        from .. import io

        return io.create_labels_zarr(staged, shape, name=staged.stem, overwrite=True)
    import numpy as np

    return np.zeros(shape, dtype=np.int32)


class _Plane:
    """Plane ``k`` of a 3D array-like (e.g. Zarr): reads and writes go to ``arr[k, ...]``."""

    def __init__(self, arr, k: int):
        self.arr, self.k = arr, k
        self.shape, self.dtype = tuple(arr.shape[1:]), arr.dtype

    def __getitem__(self, key):
        return self.arr[(self.k,) + (key if isinstance(key, tuple) else (key,))]

    def __setitem__(self, key, value):
        self.arr[(self.k,) + (key if isinstance(key, tuple) else (key,))] = value


def plane(labels, k: int):
    """Slice ``k`` of 3D labels, to read and write: a NumPy view, or a plane of Zarr."""
    import numpy as np

    return labels[k] if isinstance(labels, np.ndarray) else _Plane(labels, k)


def count_labels(labels) -> tuple[dict[int, int], int]:
    """Pixels per id and the number of labelled slices, read one chunk at a time."""
    import numpy as np

    from .. import io

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
