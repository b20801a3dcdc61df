"""Shared fixtures: tiny random SAM3 checkpoints, saved and loaded like real ones."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_tracker_dir(tmp_path_factory):
    """A folder with a tiny random Sam3Tracker checkpoint (safetensors + processor)."""
    from napari_sam3.testing import save_random_tracker

    return save_random_tracker(tmp_path_factory.mktemp("tiny_tracker"), seed=0)


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_tracker_dir):
    """A Sam3Segmenter loaded from the tiny checkpoint through ``from_pretrained``.

    The tiny model's input is 112 px; a 1024 px tile keeps test images untiled, as
    SAM3's 1008 px tiles keep ordinary images untiled.
    """
    from napari_sam3 import Sam3Segmenter

    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=1024)


@pytest.fixture
def asym_image():
    """A non-square uint8 RGB image with structure, so swapped axes give other masks."""
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[0:72, 0:120]
    base = (np.sin(rows / 7.0) * np.cos(cols / 11.0) * 100 + 128).astype(np.float32)
    img = np.stack([base, np.roll(base, 9, axis=1), base[::-1]], axis=-1)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True, scope="session")
def _scratch_in_pytest_tmp(tmp_path_factory):
    """Scratch labels folders of large images (system temp) land in pytest's tmp."""
    import tempfile

    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("system-tmp"))
    yield
    tempfile.tempdir = before


@pytest.fixture(autouse=True, scope="session")
def _autosaves_in_pytest_tmp(tmp_path_factory):
    """The widget's autosaves (and those of napari subprocesses the tests start) land in
    pytest's tmp, never in the user's data folder."""
    import os

    from napari_sam3.core.session_folder import AUTOSAVE_ENV

    before = os.environ.get(AUTOSAVE_ENV)
    os.environ[AUTOSAVE_ENV] = str(tmp_path_factory.mktemp("autosave"))
    yield
    if before is None:
        os.environ.pop(AUTOSAVE_ENV, None)
    else:
        os.environ[AUTOSAVE_ENV] = before
