"""The npe2 manifest validates, declares what napari needs, and importing stays light."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import npe2
import pytest

import napari_sam3

MANIFEST = Path(napari_sam3.__file__).parent / "napari.yaml"


@pytest.fixture(scope="module")
def manifest() -> npe2.PluginManifest:
    return npe2.PluginManifest.from_file(MANIFEST)


def test_manifest_file_validates(manifest):
    assert manifest.name == "napari-sam3"


def test_manifest_is_installed_as_entry_point():
    pm = npe2.PluginManifest.from_distribution("napari-sam3")
    assert pm.name == "napari-sam3"
    assert {c.id for c in pm.contributions.commands} >= {
        "napari-sam3.make_widget",
        "napari-sam3.write_labels_tif",
        "napari-sam3.write_labels_zarr",
        "napari-sam3.sample_cells",
    }


def test_npe2_validate_cli():
    exe = Path(sys.executable).with_name("npe2")
    cmd = str(exe) if exe.exists() else shutil.which("npe2")
    if cmd is None:
        pytest.skip("npe2 command-line tool not found")
    res = subprocess.run([cmd, "validate", "napari-sam3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout.lower()


def test_contributions(manifest):
    c = manifest.contributions
    (widget,) = c.widgets
    assert widget.display_name == "SAM3 segmentation"
    # napari's Plugins menu reads "<widget> (<plugin>)": the two names must differ
    assert manifest.display_name == "napari-sam3" != widget.display_name
    assert widget.command == "napari-sam3.make_widget"

    writers = {w.command: w for w in c.writers}
    assert set(writers) == {"napari-sam3.write_labels_tif", "napari-sam3.write_labels_zarr"}
    tif = writers["napari-sam3.write_labels_tif"]
    assert set(tif.filename_extensions) == {".tif", ".tiff"}
    assert [str(t) for t in tif.layer_types] == ["labels"]
    zw = writers["napari-sam3.write_labels_zarr"]
    assert zw.filename_extensions == [".zarr"]
    assert [str(t) for t in zw.layer_types] == ["labels"]

    (sample,) = c.sample_data
    assert sample.key == "cells"
    assert sample.command == "napari-sam3.sample_cells"


@pytest.mark.parametrize(
    "command_id",
    ["napari-sam3.write_labels_tif", "napari-sam3.write_labels_zarr", "napari-sam3.sample_cells"],
)
def test_python_names_resolve(manifest, command_id):
    (cmd,) = [c for c in manifest.contributions.commands if c.id == command_id]
    module, _, attr = cmd.python_name.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_light_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import napari_sam3, napari_sam3._writers, napari_sam3._sample_data, napari_sam3.core.io\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_io_does_not_import_gui():
    code = (
        "import sys\n"
        "import napari_sam3.core.io, napari_sam3._writers\n"
        "gui = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'torch')"
        " if m in sys.modules]\n"
        "assert not gui, gui\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
