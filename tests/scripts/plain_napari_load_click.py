"""A user's first session in plain napari, run as its own process by test_cold_start.py.

Nothing is imported before the viewer: napari starts, the sample image is opened from
napari's File menu, the widget is docked from the Plugins menu, then *Load model* is
pressed and one point clicked. Usage: python plain_napari_load_click.py MODEL ROW COL
"""

import sys


def menu_action(window, *path):
    """The QAction at ``path`` in the main window's menu bar (e.g. "Plugins", "SAM3 ...")."""
    menu = None
    actions = window._qt_window.menuBar().actions()
    for i, name in enumerate(path):
        found = [a for a in actions if a.text().replace("&", "").startswith(name)]
        if not found:
            names = [a.text() for a in actions]
            raise SystemExit(f"no menu entry {name!r} under {path[:i]}: {names}")
        if i == len(path) - 1:
            return found[0]
        menu = found[0].menu()
        menu.aboutToShow.emit()  # napari fills some menus when they open
        actions = menu.actions()
    raise AssertionError


def main(model: str, row: float, col: float) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer()
    menu_action(viewer.window, "File", "Open Sample", "Synthetic fluorescent cells").trigger()
    QApplication.processEvents()
    menu_action(viewer.window, "Plugins", "SAM3 segmentation").trigger()
    QApplication.processEvents()
    dock_widgets = getattr(viewer.window, "dock_widgets", None) or {
        name: d.widget() for name, d in viewer.window._dock_widgets.items()}
    docks = [w for name, w in dock_widgets.items() if "SAM3" in name]
    assert len(docks) == 1, list(dock_widgets)
    widget = docks[0]
    widget.model_section.model_edit.setText(model)
    from napari_sam3._cli.view import _load_and_click

    _load_and_click(viewer, widget, row, col, timeout_s=300)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
