"""napari + the widget, one commit, then wait to be killed: run by test_widget_session.py.

Opens IMAGE (a TIFF) in napari, docks the widget, loads MODEL, clicks one point (ROW,
COL), commits it and waits for the autosave to land (the autosave folder comes from
$NAPARI_SAM3_AUTOSAVE_DIR). Then it saves the labels layer to OUT (.npy), prints
``AUTOSAVED <folder>`` and waits until the test kills the process.
Usage: python session_autosave_kill.py MODEL IMAGE ROW COL OUT
"""

import sys
import time


def wait_for(app, condition, what: str, timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def main(model: str, image: str, row: float, col: float, out: str) -> int:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer()
    app = QApplication.instance()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    widget.model_section.model_edit.setText(model)
    widget.model_section.device_combo.setCurrentText("cpu")
    widget.cache_section.cache_edit.setText("")
    widget.cache_section.tile_spin.setValue(1024)
    widget.model_section.load_model()
    wait_for(app, lambda: widget.model_section.load_worker is None, "the model")
    assert widget.session.segmenter is not None, widget.status
    viewer.open(image)
    binder = widget.binder
    wait_for(app, lambda: binder.points_layer is not None and binder.labels_layer is not None
             and not widget.busy, "the layers")
    points = getattr(binder.points_layer, "__wrapped__", binder.points_layer)
    labels = getattr(binder.labels_layer, "__wrapped__", binder.labels_layer)
    points.add([[row, col]])
    wait_for(app, lambda: not widget.busy and widget.object_section.preview_mask is not None,
             "the preview")
    assert widget.object_section.commit(), widget.status
    assert labels.data.any(), "the commit wrote nothing"
    wait_for(app, lambda: widget.store.last_autosave is not None and not widget.busy,
             "the autosave")
    np.save(out, np.asarray(labels.data))
    print("AUTOSAVED", widget.store.last_autosave, flush=True)
    while True:  # until killed
        app.processEvents()
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                  sys.argv[5]))
