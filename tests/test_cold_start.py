"""A user's first session, each in a fresh process: napari's OpenGL first, torch later.

The test process imports torch before any viewer exists, which hides crashes on the
order a user's napari takes (see napari_sam3.core.torch_import). These tests start napari
the way a user does, press *Load model* with a tiny checkpoint, click one point on the
canvas, and require a non-empty preview and a clean exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_sam3.core.torch_import import foreign_llvm_loaded

HERE = Path(__file__).resolve().parent
CLICK = ("250", "380")  # a cell of the synthetic sample (512 x 768)
TIMEOUT = 300


def _run(cmd, tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "PYTHONFAULTHANDLER": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                         cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"exit {out.returncode}\n{text[-4000:]}"
    assert "Traceback" not in text and "Fatal Python error" not in text, text[-4000:]
    assert "imported before Load model: neither torch nor transformers" in text, text
    preview = [line for line in text.splitlines() if line.startswith("clicked (250, 380)")]
    assert preview and "preview of 0 px" not in preview[0], text
    return text


@pytest.fixture
def display():
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.skip("needs a display (make test runs under Xvfb)")


def test_view_sample_load_model_and_click_in_a_fresh_process(display, tiny_tracker_dir,
                                                               tmp_path):
    exe = Path(sys.executable).with_name("napari-sam3")
    shot = tmp_path / "demo.png"
    _run([str(exe), "view", "--sample", "--model", str(tiny_tracker_dir),
          "--click", ",".join(CLICK), "--screenshot", str(shot)], tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_napari_menus_load_model_and_click_in_a_fresh_process(display, tiny_tracker_dir,
                                                                   tmp_path):
    script = HERE / "scripts" / "plain_napari_load_click.py"
    _run([sys.executable, str(script), str(tiny_tracker_dir), *CLICK], tmp_path)


def test_foreign_llvm_detection_reads_the_process_maps():
    mesa = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"
    assert foreign_llvm_loaded(mesa)
    assert foreign_llvm_loaded("7f00 r-xp /usr/lib/libLLVM.so.18.1\n")
    assert not foreign_llvm_loaded("7f00 r-xp /site-packages/triton/_C/libtriton.so\n")
