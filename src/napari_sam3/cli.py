"""Command line: ``napari-sam3 segment`` (batch, no GUI) and ``napari-sam3 view`` (napari).

Only the standard library, NumPy and the package's light modules are imported
here; torch/transformers are imported after the input has been validated, and
napari only by ``view``.

Exit codes: 0 success, 2 bad input (one ``napari-sam3: error: ...`` line on
stderr, nothing written), 1 an unexpected failure while segmenting or writing
(also one line; nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .model import DEFAULT_MODEL

PROG = "napari-sam3"
WIDGET_NAME = "SAM3 segmentation"
SCREENSHOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_HEADLESS_QPA = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb")


class CliError(Exception):
    """Reported as one line on stderr; ``status`` 2 for bad input, 1 for a failed run."""

    status = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``napari-sam3: error:`` line too."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of pixels, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from .postprocess import DEFAULTS

    parser = _Parser(
        prog=PROG,
        description="SAM3 promptable segmentation of 2D (microscopy) images.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    seg = sub.add_parser(
        "segment",
        help="segment objects from point/box prompts and write a label image",
        description=(
            "Segment one object per prompt entry and write int32-compatible labels "
            "(0 background, object i -> id i+1) to a .tif/.tiff or .zarr (OME-NGFF) file."
        ),
        epilog=(
            "PROMPTS.json is a list with one entry per object, e.g. "
            '[{"points": [[40, 25]], "labels": [1]}, {"box": [10, 50, 30, 80]}]. '
            "Coordinates are (row, col) pixels, as in napari; labels are 1 (inside) or "
            "0 (outside) and default to 1; a box is [row0, col0, row1, col1]."
        ),
    )
    seg.add_argument(
        "image",
        metavar="IMAGE",
        help="2D grayscale or RGB(A) image (.tif, .tiff, .png, .jpg, .npy, .zarr)",
    )
    seg.add_argument(
        "--prompts",
        required=True,
        metavar="PROMPTS.json",
        help="JSON list of per-object prompts (see below)",
    )
    seg.add_argument(
        "--out", required=True, metavar="OUT", help="output labels: OUT.tif, OUT.tiff or OUT.zarr"
    )
    seg.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="M",
        help="Hugging Face model id or local checkpoint folder (default: %(default)s)",
    )
    seg.add_argument(
        "--device",
        default="auto",
        metavar="D",
        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)",
    )
    seg.add_argument(
        "--max-hole-area",
        type=_non_negative_int,
        metavar="N",
        default=DEFAULTS.max_hole_area,
        help="fill holes of up to N pixels in each mask; 0 = off (default: %(default)s)",
    )
    seg.add_argument(
        "--max-sprinkle-area",
        type=_non_negative_int,
        metavar="N",
        default=DEFAULTS.max_sprinkle_area,
        help="remove islands of up to N pixels; 0 = off (default: %(default)s)",
    )
    seg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    seg.set_defaults(func=_cmd_segment)

    view = sub.add_parser(
        "view",
        help="open napari with an image and the SAM3 widget",
        description="Open napari with IMAGE (or the synthetic cell sample) and the SAM3 widget.",
    )
    view.add_argument(
        "image", nargs="?", metavar="IMAGE", help="image to open (default: the synthetic sample)"
    )
    view.add_argument(
        "--sample", action="store_true", help="open the synthetic fluorescent-cells sample image"
    )
    view.add_argument(
        "--model",
        metavar="M",
        default=None,
        help="model id or local folder to preset in the widget",
    )
    view.add_argument(
        "--screenshot",
        metavar="PATH",
        default=None,
        help="save a screenshot of the window to PATH (.png) and exit (headless checks)",
    )
    view.set_defaults(func=_cmd_view)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``napari-sam3`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CliError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# -------------------------------------------------------------------------- segment


def _load_image(path: str):
    """Read IMAGE and check it is 2D or (Y, X, C) with C <= 4; lazy arrays stay lazy."""
    from . import io

    try:
        image = io.read_image(path)
    except io.ImageReadError as e:
        raise CliError(e) from None
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 2 and shape[0] == 1 and not _yxc(shape):
        image, shape = image[0], shape[1:]  # drop leading singleton axes, e.g. (1, Y, X)
    if not (len(shape) == 2 or _yxc(shape)):
        raise CliError(
            f"image {path!r} has shape {shape}: segment needs a 2D image, grayscale (Y, X) "
            "or with 2-4 channels last (Y, X, C), e.g. RGB"
        )
    if 0 in shape:
        raise CliError(f"image {path!r} is empty (shape {shape})")
    kind = getattr(getattr(image, "dtype", None), "kind", None)
    if kind not in ("b", "u", "i", "f"):
        raise CliError(f"image {path!r} has unsupported data type {getattr(image, 'dtype', '?')}")
    return image


def _yxc(shape) -> bool:
    """(Y, X, C) with 2 to 4 channels: what ``normalize.to_rgb_uint8`` takes besides (Y, X)."""
    return len(shape) == 3 and shape[-1] in (2, 3, 4)


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _load_prompts(path: str, shape: tuple[int, int]):
    """Parse PROMPTS.json into ObjectPrompts, all inside an image of ``shape``."""
    import numpy as np

    from .prompts import ObjectPrompt, PromptError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"cannot read prompts {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read prompts {path!r}: {e}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise CliError(
            f"prompts {path!r} are not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except ValueError as e:
        raise CliError(f"prompts {path!r} are not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise CliError(
            f"prompts {path!r} must be a JSON list with one entry per object, "
            f"got a JSON {_json_type(data)}"
        )
    if not data:
        raise CliError(f"prompts {path!r} hold no objects (an empty list)")
    prompts = []
    for i, entry in enumerate(data, start=1):
        where = f"prompts {path!r}, object {i}"
        if isinstance(entry, dict) and entry.get("slice") not in (None, 0):
            raise CliError(f"{where}: 'slice' is for 3D stacks; segment works on 2D images")
        try:
            prompt = ObjectPrompt.from_dict(entry)
            coords = list(prompt.points.ravel()) + ([] if prompt.box is None else list(prompt.box))
            if not np.isfinite(coords).all():
                raise PromptError("coordinates must be finite numbers")
            prompt.check_inside(shape)
        except PromptError as e:
            raise CliError(f"{where}: {e}") from None
        prompts.append(prompt)
    return prompts


def _json_type(value) -> str:
    return {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _check_output(out: str, image_path: str, overwrite: bool) -> Path:
    from . import io

    p = Path(out)
    if p.suffix.lower() not in io.LABEL_SUFFIXES:
        raise CliError(
            f"cannot write labels to {out!r}: unsupported suffix {p.suffix or '(none)'!r}, "
            f"use one of {', '.join(io.LABEL_SUFFIXES)}"
        )
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise CliError(f"{out!r} already exists (pass --overwrite to replace it)")
        if p.resolve() == Path(image_path).resolve():
            raise CliError(f"refusing to overwrite the input image {image_path!r}")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise CliError(f"cannot write {out!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {out!r}: folder {str(parent)!r} is not writable")
    return p


def _write_atomic(out: Path, labels, overwrite: bool) -> None:
    """Write into a hidden sibling folder, then rename into place: never a partial OUT."""
    from . import io

    tmpdir = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.absolute().parent)
    )
    try:
        staged = tmpdir / out.name  # same name, so e.g. the Zarr group is named after OUT
        io.write_labels(staged, labels)
        if out.exists() or out.is_symlink():
            if not overwrite:  # appeared while we were segmenting
                raise CliError(f"{str(out)!r} already exists (pass --overwrite to replace it)")
            if staged.is_file() and not out.is_dir():
                os.replace(staged, out)  # atomic
                return
            old = tmpdir / (out.name + ".old")  # directories cannot be replaced in one step
            os.replace(out, old)
            try:
                os.replace(staged, out)
            except BaseException:
                os.replace(old, out)
                raise
        else:
            os.replace(staged, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_local_load(model: str):
    """No "Loading weights" bar for a local folder; hub downloads keep their progress bars."""
    if not Path(model).expanduser().exists():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _cmd_segment(args) -> int:
    import numpy as np

    image = _load_image(args.image)
    shape = tuple(int(s) for s in image.shape[:2])
    prompts = _load_prompts(args.prompts, shape)
    out = _check_output(args.out, args.image, args.overwrite)
    try:
        pixels = np.asarray(image)
    except Exception as e:  # noqa: BLE001 - e.g. a corrupt Zarr chunk
        raise CliError(f"cannot read image {args.image!r}: {type(e).__name__}: {e}") from None
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .model import ModelLoadError
    from .segmenter import Sam3Segmenter

    try:
        with _quiet_local_load(args.model):
            segmenter = Sam3Segmenter.from_pretrained(args.model, device=args.device)
    except ModelLoadError as e:
        raise CliError(e) from None
    except Exception as e:  # noqa: BLE001 - a broken checkpoint must not print a traceback
        raise CliError(f"cannot load model {args.model!r}: {type(e).__name__}: {e}") from None

    try:
        labels = segmenter.segment(
            pixels,
            prompts,
            max_hole_area=args.max_hole_area,
            max_sprinkle_area=args.max_sprinkle_area,
        )
        _write_atomic(out, labels, args.overwrite)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, status 1, nothing written
        err = CliError(f"segmentation failed: {type(e).__name__}: {e}")
        err.status = 1
        raise err from None

    counts = np.bincount(labels.ravel(), minlength=len(prompts) + 1)
    per_id = ", ".join(f"{i}: {int(counts[i])}" for i in range(1, len(prompts) + 1))
    n = len(prompts)
    print(
        f"segmented {n} object{'s' if n != 1 else ''} in {shape[0]}x{shape[1]} image; "
        f"pixels per id {{{per_id}}}; wrote {out}"
    )
    return 0


# ----------------------------------------------------------------------------- view


def _check_display() -> None:
    """Qt aborts the process without a display; say so in one line instead."""
    if not sys.platform.startswith("linux"):
        return
    qpa = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0]
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or qpa in _HEADLESS_QPA:
        return
    raise CliError(
        "no display found: run under xvfb-run (e.g. 'xvfb-run -a napari-sam3 view "
        "--screenshot shot.png') or set QT_QPA_PLATFORM=offscreen"
    )


def _set_widget_model(widget, model: str) -> bool:
    """Preset the model id/folder in the widget; True if the widget has a place for it."""
    setter = getattr(widget, "set_model_name", None)
    if callable(setter):
        setter(model)
        return True
    for name in ("model_edit", "model_field", "model_name", "model"):
        field = getattr(widget, name, None)
        if field is None:
            continue
        if hasattr(field, "setText"):  # a QLineEdit
            field.setText(model)
            return True
        if hasattr(field, "value") and not callable(field.value):  # a magicgui widget
            field.value = model
            return True
    return False


def _cmd_view(args) -> int:
    if args.image and args.sample:
        raise CliError("give an IMAGE or --sample, not both")
    image = None
    if args.image:
        from . import io

        try:
            image = io.read_image(args.image)
        except io.ImageReadError as e:
            raise CliError(e) from None
    shot = None
    if args.screenshot:
        shot = Path(args.screenshot)
        if shot.suffix.lower() not in SCREENSHOT_SUFFIXES:
            raise CliError(
                f"screenshot {args.screenshot!r}: use a .png file "
                f"(or one of {', '.join(SCREENSHOT_SUFFIXES)})"
            )
        if not shot.absolute().parent.is_dir():
            raise CliError(f"screenshot {args.screenshot!r}: folder does not exist")
    _check_display()

    import napari

    viewer = napari.Viewer(title="napari-sam3")
    if image is not None:
        viewer.add_image(image, name=Path(args.image).stem.removesuffix(".ome"))
    else:
        from ._sample_data import sample_cells

        for data, kwargs, _layer_type in sample_cells():
            viewer.add_image(data, **kwargs)
    try:
        _dock, widget = viewer.window.add_plugin_dock_widget(PROG, WIDGET_NAME)
    except Exception as e:  # noqa: BLE001 - say what failed in one line, then close napari
        viewer.close()
        err = CliError(f"cannot open the {WIDGET_NAME} widget: {type(e).__name__}: {e}")
        err.status = 1
        raise err from None
    if args.model and not _set_widget_model(widget, args.model):
        print(f"{PROG}: warning: the widget has no model field; --model ignored", file=sys.stderr)

    if shot is None:
        napari.run()
        return 0
    from qtpy.QtWidgets import QApplication

    try:
        viewer.window.resize(1400, 900)  # a fixed, roomy size for comparable screenshots
        for _ in range(5):
            QApplication.processEvents()
        viewer.reset_view()  # the dock narrowed the canvas
        QApplication.processEvents()
        viewer.screenshot(str(shot), canvas_only=False, flash=False)
    finally:
        viewer.close()
    print(f"saved screenshot {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
