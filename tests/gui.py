"""Helpers shared by the GUI tests (real napari viewer under Xvfb)."""

from __future__ import annotations


class Notes:
    """New napari notifications since creation (the real notification manager)."""

    def __init__(self):
        from napari.utils.notifications import notification_manager

        self._manager = notification_manager
        self._start = len(notification_manager.records)

    def since(self, severity: str | None = None) -> list[str]:
        recs = self._manager.records[self._start :]
        return [
            str(r.message) for r in recs if severity is None or str(r.severity).lower() == severity
        ]

    def reset(self):
        self._start = len(self._manager.records)


def unwrap(layer):
    """The widget sees napari's PublicOnlyProxy of each layer; tests use the real layer."""
    return getattr(layer, "__wrapped__", layer)


WAIT_MS = 60_000


def dock(make_napari_viewer):
    """A shown viewer with the widget docked as napari's Plugins menu does it."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    return viewer, widget


def load(widget, qtbot, folder, cache=""):
    """Type a model folder, press Load model, wait for it."""
    from qtpy.QtCore import Qt

    widget.model_section.model_edit.setText(str(folder))
    widget.model_section.device_combo.setCurrentText("cpu")
    widget.cache_section.cache_edit.setText(str(cache))
    qtbot.mouseClick(widget.model_section.load_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.model_section.load_worker is None, timeout=WAIT_MS)
    assert widget.session.segmenter is not None, widget.status
    return widget.session.segmenter


def wait_idle(widget, qtbot):
    try:
        qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    except Exception as e:
        raise AssertionError(f"widget still busy; status: {widget.status}") from e


def canvas_click(viewer, qtbot, layer, row, col):
    """A real mouse click on the canvas at data pixel (row, col) of a 2D view, scale 1."""
    import numpy as np
    from qtpy.QtCore import QPoint, Qt

    viewer.layers.selection.active = layer
    layer.mode = "add"
    n = len(layer.data)
    native = viewer.window._qt_viewer.canvas.native
    cam = (viewer.camera if getattr(viewer, "scene", None) is None else viewer.scene.camera)
    cy, cx = cam.center[-2:]
    pos = QPoint(
        round((col - cx) * cam.zoom + native.width() / 2),
        round((row - cy) * cam.zoom + native.height() / 2),
    )
    qtbot.mouseClick(native, Qt.MouseButton.LeftButton, pos=pos)
    qtbot.waitUntil(lambda: len(layer.data) == n + 1, timeout=5000)
    got = np.asarray(layer.data[-1])
    tol = max(1.0, 1.0 / cam.zoom)  # a screen pixel is 1 / zoom data pixels
    assert abs(got[-2] - row) < tol and abs(got[-1] - col) < tol, (got, row, col)
    return got


def key(viewer, qtbot, layer, key_name: str, *modifiers: str):
    """A key press on the canvas with ``layer`` active, e.g. key(..., "Z", "Control")."""
    from qtpy.QtCore import Qt

    viewer.layers.selection.active = layer
    mods = Qt.KeyboardModifier.NoModifier
    for m in modifiers:
        mods |= getattr(Qt.KeyboardModifier, f"{m}Modifier")
    native = viewer.window._qt_viewer.canvas.native
    native.setFocus()
    qtbot.keyClick(native, getattr(Qt.Key, f"Key_{key_name}"), mods)


def press(qtbot, button):
    """Click a button as a user does: first open the collapsed section holding it."""
    from qtpy.QtCore import Qt
    from superqt import QCollapsible

    parent = button.parentWidget()
    while parent is not None:
        if isinstance(parent, QCollapsible) and not parent.isExpanded():
            parent.expand(animate=False)
        parent = parent.parentWidget()
    qtbot.waitUntil(lambda: button.height() > 0 and button.isVisible(), timeout=5000)
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
