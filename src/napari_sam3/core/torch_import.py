"""Importing torch safely into a process that already draws with Mesa's OpenGL.

The crash this prevents: napari opens its OpenGL context first (on Linux with Mesa,
that maps Mesa's ``libLLVM-*.so`` into the process, with its symbols in the global
scope); pressing *Load model* then imports torch, torchvision imports
``torch._dynamo``, and that imports triton, whose ``libtriton.so`` carries its own,
statically linked LLVM. When the dynamic linker loads ``libtriton.so`` its LLVM
references bind to the copy already in the global scope (Mesa's, another LLVM
release), and LLVM's static initialisers crash the process (segmentation fault).

The fix: before torch is first imported, load ``libtriton.so`` ourselves with
``RTLD_DEEPBIND``, so that it resolves symbols against its own LLVM first. Python's
later ``import triton`` finds the library already loaded and uses it as it is. Triton
stays fully usable (``torch.compile`` on CUDA keeps working), nothing is kept out of
the process, and nothing happens where the clash cannot exist: not on Windows or
macOS, not when no other LLVM is mapped (the command line, scripts, tests that import
torch before any viewer exists), not when triton is not installed (CPU-only torch
wheels) or is already imported.

Every model load calls :func:`prepare_torch_import` first; it is cheap (a read of
``/proc/self/maps`` once) and idempotent. It imports neither torch nor triton.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_done = False
_LLVM_MARKERS = ("libLLVM-", "libLLVM.so")


def foreign_llvm_loaded(maps_text: str | None = None) -> bool:
    """True if a shared LLVM library (e.g. Mesa's ``libLLVM-15.so.1``) is mapped."""
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return any(marker in maps_text for marker in _LLVM_MARKERS)


def _triton_library() -> Path | None:
    """The path of triton's ``libtriton*.so``, found without importing triton."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("triton")  # a top-level spec: triton is not run
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted((Path(folder) / "_C").glob("libtriton*.so"))
        if found:
            return found[0]
    return None


def prepare_torch_import() -> str:
    """Make the next ``import torch`` safe in this process; returns what was done:
    ``"deepbind"`` (triton's library preloaded), or why nothing was needed."""
    global _done
    with _lock:
        if _done:
            return "done before"
        reason = _prepare()
        _done = reason != "no foreign LLVM yet"  # a viewer may still open later
        log.debug("torch import preparation: %s", reason)
        return reason


def _prepare() -> str:
    if not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
        return "not Linux"
    if "triton" in sys.modules:
        return "triton already imported"
    if not foreign_llvm_loaded():
        return "no foreign LLVM yet"
    lib = _triton_library()
    if lib is None:
        return "triton not installed"
    import ctypes

    try:
        ctypes.CDLL(str(lib), mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    except OSError as e:  # the later import will say what is wrong with triton
        log.warning("could not preload %s: %s", lib, e)
        return "preload failed"
    return "deepbind"
