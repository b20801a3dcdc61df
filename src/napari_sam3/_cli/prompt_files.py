"""PROMPTS.json (one entry per object) and EXEMPLARS.json (example boxes), checked
against the image they prompt; every problem is one error line naming the entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.defaults import MAX_ID
from ..core.prompts import PromptError, check_box
from .errors import CliError
from .inputs import Input


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class PromptedObject:
    """One entry of PROMPTS.json."""

    id: int
    slice: int | None
    prompt: Any  # ObjectPrompt


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _json_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    return {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _read_json(path: str, what: str):
    """The JSON value in ``path`` (NaN/Infinity refused); ``what`` names it in errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"cannot read {what} {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {what} {path!r}: {e}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise CliError(
            f"{what} {path!r} are not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except ValueError as e:
        why = "a number has too many digits" if "digits" in str(e) else str(e)
        raise CliError(f"{what} {path!r} are not valid JSON: {why}") from None
    except RecursionError:
        raise CliError(f"{what} {path!r} are not usable JSON: nested too deeply") from None


def load_exemplars(path: str, inp: Input) -> tuple[list[list[float]], list[int]]:
    """EXEMPLARS.json: boxes (row0, col0, row1, col1) meeting the image, and 1/0 labels."""
    data = _read_json(path, "exemplars")
    if not isinstance(data, list):
        raise CliError(
            f"exemplars {path!r} must be a JSON list of boxes [row0, col0, row1, col1], "
            f"got a JSON {_json_type(data)}"
        )
    if not data:
        raise CliError(f"exemplars {path!r} hold no boxes (an empty list)")
    h, w = inp.plane_shape
    boxes, labels = [], []
    for i, entry in enumerate(data, start=1):
        where = f"exemplars {path!r}, box {i}"
        positive = True
        if isinstance(entry, dict):
            unknown = set(entry) - {"box", "positive"}
            if unknown:
                raise CliError(
                    f"{where}: unknown key(s) {', '.join(sorted(unknown))} (use 'box' and "
                    "'positive')"
                )
            if "box" not in entry:
                raise CliError(f"{where}: an exemplar object needs a 'box'")
            positive = entry.get("positive", True)
            if not isinstance(positive, bool):
                raise CliError(
                    f"{where}: 'positive' must be true or false, got {json.dumps(positive)}"
                )
            entry = entry["box"]
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in entry)
        ):
            raise CliError(
                f"{where}: a box is 4 numbers [row0, col0, row1, col1], got "
                f"{_short(json.dumps(entry))}"
            )
        try:
            r0, c0, r1, c1 = check_box(entry).tolist()
        except PromptError as e:
            raise CliError(f"{where}: {e}") from None
        if r1 < 0 or c1 < 0 or r0 >= h or c0 >= w:
            raise CliError(
                f"{where}: box (rows {r0:g}-{r1:g}, cols {c0:g}-{c1:g}) is outside the "
                f"{h}x{w} image"
            )
        boxes.append([r0, c0, r1, c1])
        labels.append(int(positive))
    return boxes, labels


def load_prompts(path: str, inp: Input) -> list[PromptedObject]:
    """Parse PROMPTS.json into objects, each inside its image or slice."""
    import numpy as np

    from ..core.prompts import ObjectPrompt, PromptError

    data = _read_json(path, "prompts")
    if not isinstance(data, list):
        raise CliError(
            f"prompts {path!r} must be a JSON list with one entry per object, "
            f"got a JSON {_json_type(data)}"
        )
    if not data:
        raise CliError(f"prompts {path!r} hold no objects (an empty list)")
    h, w = inp.plane_shape
    objects: list[PromptedObject] = []
    seen: dict[tuple, int] = {}
    for i, entry in enumerate(data, start=1):
        where = f"prompts {path!r}, object {i}"
        if isinstance(entry, dict):
            entry = dict(entry)
            obj_id = entry.pop("id", i)
            if not _json_int(obj_id) or not 1 <= obj_id <= MAX_ID:
                raise CliError(
                    f"{where}: 'id' must be a whole number from 1 to {MAX_ID}, "
                    f"got {json.dumps(obj_id)}"
                )
            k = entry.get("slice")
            if k is not None and not _json_int(k):
                raise CliError(
                    f"{where}: 'slice' must be a whole number (a 0-based slice index), "
                    f"got {json.dumps(k)}"
                )
            if inp.is_stack:
                if k is None:
                    raise CliError(
                        f"{where}: image {inp.path!r} is a {inp.describe()}; give each "
                        f"object a 'slice' from 0 to {inp.depth - 1}, or segment a 2D image"
                    )
                if not 0 <= k < inp.depth:
                    raise CliError(
                        f"{where}: slice {k} is outside the stack of {inp.depth} slices "
                        f"(0 to {inp.depth - 1})"
                    )
            elif k not in (None, 0):
                raise CliError(
                    f"{where}: 'slice' {k} is for 3D stacks, but image {inp.path!r} is a 2D "
                    f"{h}x{w} image"
                )
        else:
            obj_id, k = i, None
        try:
            prompt = ObjectPrompt.from_dict(entry)
            coords = list(prompt.points.ravel()) + ([] if prompt.box is None else list(prompt.box))
            if not np.isfinite(coords).all():
                raise PromptError("coordinates must be finite numbers")
            prompt.check_inside((h, w))
        except PromptError as e:
            raise CliError(f"{where}: {e}") from None
        key = (k if inp.is_stack else None, obj_id)
        if key in seen:
            on = f" on slice {k}" if inp.is_stack else ""
            raise CliError(
                f"{where}: id {obj_id} is already used by object {seen[key]}{on}; "
                "give one entry per object and slice"
            )
        seen[key] = i
        objects.append(PromptedObject(obj_id, k if inp.is_stack else None, prompt))
    return objects


def by_slice(objects: list[PromptedObject]) -> dict[int, dict[int, Any]]:
    """``{slice: {id: ObjectPrompt}}`` in the order of PROMPTS.json."""
    out: dict[int, dict[int, Any]] = {}
    for o in objects:
        out.setdefault(o.slice, {})[o.id] = o.prompt
    return dict(sorted(out.items()))
