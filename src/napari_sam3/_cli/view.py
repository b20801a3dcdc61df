"""``view``: napari with an image (or the synthetic sample) and the SAM3 widget, or a
screenshot of that window for headless checks."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .errors import PROG, CliError, failed
from .inputs import read_image

#: Planes with more pixels than this (or a side over 16,384) open as a lazy pyramid.
LAZY_PIXELS = 4096 * 4096

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


def _set_widget_model(widget, model: str) -> None:
    """Preset the model id or folder in the widget's Model section."""
    widget.model_section.model_edit.setText(model)


def _parse_click(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value.split(","))
    except ValueError:
        raise CliError(f"--click {value!r}: give ROW,COL, e.g. --click 250,380") from None
    if not (row >= 0 and col >= 0):  # also refuses NaN
        raise CliError(f"--click {value!r}: ROW and COL must be pixel positions (>= 0)")
    return row, col


def _wait(condition, timeout_s: float, what: str) -> None:
    """Let Qt run until ``condition()`` holds; a time-out is a failed run."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise failed(f"{what} did not finish within {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.01)


def _load_and_click(viewer, widget, row: float, col: float, timeout_s: float = 900) -> int:
    """What a user does first: press *Load model*, click one point on the canvas, see its
    preview. Returns the preview's pixel count; an empty preview is a failed run."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    heavy = ", ".join(m for m in ("torch", "transformers") if m in sys.modules)
    print(f"napari is up; imported before Load model: {heavy or 'neither torch nor transformers'}",
          flush=True)
    widget.model_section.load_button.click()
    _wait(lambda: widget.runner.load_worker is None, timeout_s, "Load model")
    if widget.session.segmenter is None:
        raise failed(f"Load model failed: {widget.status}")
    print(f"model loaded: {widget.status}", flush=True)
    points = widget.binder.points_layer
    if points is None:
        raise failed("no image to click on: the widget has no points layer")
    image_shape = widget.binder.image_layer.data.shape[:2]
    if not (row < image_shape[0] and col < image_shape[1]):
        raise failed(f"--click {row:g},{col:g} is outside the image of {image_shape[0]}x"
                     f"{image_shape[1]} px")
    viewer.reset_view()
    QApplication.processEvents()
    viewer.layers.selection.active = points
    points.mode = "add"
    scene = getattr(viewer, "scene", None)  # napari < 0.9: viewer.camera
    canvas = viewer.window._qt_viewer.canvas.native
    camera = viewer.camera if scene is None else scene.camera
    cy, cx = camera.center[-2:]
    pos = QPoint(round((col - cx) * camera.zoom + canvas.width() / 2),
                 round((row - cy) * camera.zoom + canvas.height() / 2))
    n = len(points.data)
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pos)
    _wait(lambda: len(points.data) > n, 10, "the click on the canvas")
    _wait(lambda: not widget.busy, timeout_s, "the preview")
    import numpy as np

    area = int(np.count_nonzero(np.asarray(widget.binder.preview_layer.data)))
    print(f"clicked ({row:g}, {col:g}): preview of {area} px; {widget.status}", flush=True)
    if area == 0:
        raise failed(f"the click gave an empty preview: {widget.status}")
    return area


def open_image(path: str, threshold: int | None = None):
    """IMAGE for napari: ``(data, multiscale)``. A TIFF or Zarr with a plane over
    ``threshold`` pixels (default :data:`LAZY_PIXELS`), or with its own pyramid, is a
    lazy dask pyramid (``core.lazy_pyramid``: nothing read but metadata, napari then
    reads only the level and region in view); anything else is read as before."""
    from ..core.lazy_pyramid import lazy_pyramid, needs_pyramid, open_lazy

    threshold = LAZY_PIXELS if threshold is None else threshold
    if Path(path).suffix.lower() in (".tif", ".tiff", ".zarr") and Path(path).exists():
        try:
            levels = open_lazy(path)
        except Exception:  # noqa: BLE001 - read_image says what is wrong in one line
            levels = None
        if levels and (len(levels) > 1 or needs_pyramid(levels[0].shape, threshold=threshold)):
            return lazy_pyramid(levels), True
    return read_image(path), False


def add_image(viewer, path: str, opened=None):
    """Add IMAGE to ``viewer``: ``opened`` as :func:`open_image` returned it (default:
    open it now). Returns the layer."""
    data, multiscale = open_image(path) if opened is None else opened
    name = Path(path).stem.removesuffix(".ome")
    if not multiscale:
        return viewer.add_image(data, name=name)
    shape = "x".join(map(str, data[0].shape))
    print(f"{path}: {shape} opened lazily as a pyramid of {len(data)} levels", flush=True)
    return viewer.add_image(data, name=name, multiscale=True)


def cmd_view(args) -> int:
    if args.image and args.sample:
        raise CliError("give an IMAGE or --sample, not both")
    click_at = _parse_click(args.click)
    image = open_image(args.image) if args.image else None
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
        add_image(viewer, args.image, image)
    else:
        from .._sample_data import sample_cells

        for data, kwargs, _layer_type in sample_cells():
            viewer.add_image(data, **kwargs)
    try:
        _dock, widget = viewer.window.add_plugin_dock_widget(PROG, WIDGET_NAME)
    except Exception as e:  # noqa: BLE001 - say what failed in one line, then close napari
        viewer.close()
        raise failed(f"cannot open the {WIDGET_NAME} widget: {type(e).__name__}: {e}") from None
    if args.model:
        _set_widget_model(widget, args.model)
    from qtpy.QtWidgets import QApplication

    try:
        if shot is not None:
            viewer.window.resize(1400, 900)  # a fixed, roomy size for comparable screenshots
        for _ in range(5):
            QApplication.processEvents()
        if click_at is not None:
            _load_and_click(viewer, widget, *click_at)
        if shot is None:
            napari.run()
            return 0
        viewer.reset_view()  # the window was resized for the screenshot
        QApplication.processEvents()
        viewer.screenshot(str(shot), canvas_only=False, flash=False)
    except BaseException:
        viewer.close()
        raise
    viewer.close()
    print(f"saved screenshot {shot}")
    return 0
