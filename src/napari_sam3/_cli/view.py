"""``view``: napari with an image (or the synthetic sample) and the SAM3 widget, or a
screenshot of that window for headless checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import PROG, CliError, failed, warn
from .inputs import read_image

WIDGET_NAME = "SAM3 segmentation"
SCREENSHOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_HEADLESS_QPA = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb")


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


def cmd_view(args) -> int:
    if args.image and args.sample:
        raise CliError("give an IMAGE or --sample, not both")
    image = read_image(args.image) if args.image else None
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
        from .._sample_data import sample_cells

        for data, kwargs, _layer_type in sample_cells():
            viewer.add_image(data, **kwargs)
    try:
        _dock, widget = viewer.window.add_plugin_dock_widget(PROG, WIDGET_NAME)
    except Exception as e:  # noqa: BLE001 - say what failed in one line, then close napari
        viewer.close()
        raise failed(f"cannot open the {WIDGET_NAME} widget: {type(e).__name__}: {e}") from None
    if args.model and not _set_widget_model(widget, args.model):
        warn("the widget has no model field; --model ignored")

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
