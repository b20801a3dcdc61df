"""Precompute on the cluster, click on the laptop (issue 11): a CLI precompute in one
folder, the cache and the image copied elsewhere, the image opened in the widget from the
other path and clicked: nothing is encoded. And the widget's Precompute on a scheduler."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from gui import canvas_click, dock, load, unwrap, wait_idle

from napari_sam3 import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def image(seed=5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:200, 0:260]
    img = rng.normal(300, 40, (200, 260))
    for r, c in ((40, 40), (100, 130), (160, 220)):
        img += 2500 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 80.0)
    img[5, 5] = 9000  # a hot pixel: napari's automatic contrast is not the percentiles
    return np.clip(img, 0, 65535).astype(np.uint16)


def test_cli_precompute_copied_cache_clicked_in_the_widget_encodes_nothing(
        make_napari_viewer, qtbot, tiny_tracker_dir, tmp_path, capsys, monkeypatch):
    import threading

    from napari_sam3.core import distributed

    cluster_side, laptop = tmp_path / "cluster", tmp_path / "laptop"
    cluster_side.mkdir()
    tifffile.imwrite(cluster_side / "slide.tif", image())
    model = cluster_side / "model"
    shutil.copytree(tiny_tracker_dir, model)
    assert cli.main(["precompute", str(cluster_side / "slide.tif"), "--model", str(model),
                     "--cache", str(cluster_side / "cache")]) == 0
    assert "9 encoded" in capsys.readouterr().out

    laptop.mkdir()  # everything copied: the image, the cache, the model, other paths
    shutil.copy(cluster_side / "slide.tif", laptop / "cells.tif")
    shutil.copytree(cluster_side / "cache", laptop / "embeddings.zarr")
    shutil.copytree(model, laptop / "sam3")
    shutil.rmtree(cluster_side)

    viewer, widget = dock(make_napari_viewer)
    widget.cache_section.tile_spin.setValue(112)  # the CLI's default: the model's input
    widget.cache_section.overlap_spin.setValue(28)
    seg = load(widget, qtbot, laptop / "sam3", cache=laptop / "embeddings.zarr")
    looked_up_in = []
    real = distributed.recorded_limits
    monkeypatch.setattr(distributed, "recorded_limits", lambda store, data: (
        looked_up_in.append(threading.current_thread()) or real(store, data)))
    layer = viewer.add_image(tifffile.imread(laptop / "cells.tif"), name="cells")
    qtbot.waitUntil(lambda: widget.binder.points_layer is not None, timeout=5000)
    wait_idle(widget, qtbot)
    # the recorded limits are offered, not imposed: nothing changes until "Use them"
    from napari.utils.notifications import notification_manager

    auto = tuple(layer.contrast_limits_range)
    assert tuple(layer.contrast_limits) == auto
    def offered():
        return next((r for r in reversed(notification_manager.records)
                     if "recorded in the cache" in str(r.message)), None)

    qtbot.waitUntil(lambda: offered() is not None, timeout=10000)  # looked up in a worker
    record = offered()
    assert looked_up_in and threading.main_thread() not in looked_up_in  # never the GUI's
    (name, use), = record.actions
    assert name == "Use them" and "precompute" in widget.status
    use(record)
    assert tuple(layer.contrast_limits) != auto  # the recorded limits, not napari's
    points = unwrap(widget.binder.points_layer)
    for row, col in ((40, 40), (100, 130), (160, 220)):
        widget.object_section.new_object()
        canvas_click(viewer, qtbot, points, row, col)
        wait_idle(widget, qtbot)
        assert widget.object_section.preview_mask is not None
    assert seg.encoder_calls == 0  # every click decoded from the copied cache
    assert seg.store.disk_reads >= 1


def test_limits_you_set_are_kept(make_napari_viewer, qtbot, tiny_tracker_dir, tmp_path):
    from napari_sam3 import Sam3Segmenter

    img = image(seed=6)
    pre = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu",
                                        cache=tmp_path / "c")
    list(pre.precompute(img))
    viewer, widget = dock(make_napari_viewer)
    load(widget, qtbot, tiny_tracker_dir, cache=tmp_path / "c")
    layer = viewer.add_image(img, name="cells", contrast_limits=(100.0, 3000.0))
    layer.contrast_limits = (200.0, 2000.0)  # chosen by the user: kept
    assert not widget.cache_section.adopt_recorded_limits()
    assert tuple(layer.contrast_limits) == (200.0, 2000.0)


def test_widget_precompute_on_a_scheduler(make_napari_viewer, qtbot, tiny_tracker_dir,
                                          tmp_path):
    from distributed import LocalCluster

    img = image(seed=7)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        viewer, widget = dock(make_napari_viewer)
        widget.cache_section.tile_spin.setValue(112)
        widget.cache_section.overlap_spin.setValue(28)
        seg = load(widget, qtbot, tiny_tracker_dir, cache=tmp_path / "c")
        viewer.add_image(img, name="cells")
        qtbot.waitUntil(lambda: widget.binder.points_layer is not None, timeout=5000)
        wait_idle(widget, qtbot)
        widget.cache_section.scheduler_edit.setText(cluster.scheduler_address)
        assert widget.cache_section.precompute("whole image")
        wait_idle(widget, qtbot)
        assert widget.status.startswith("Precomputed 9 tiles (9 encoded"), widget.status
        assert seg.encoder_calls == 0 and len(seg.store.disk_entries()) == 9
