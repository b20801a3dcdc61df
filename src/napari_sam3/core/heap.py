"""Giving freed heap memory back to the operating system (glibc only; elsewhere a no-op).

Work that allocates and frees many large arrays of varying sizes (per-object logits,
per-slice tensors) fragments glibc's heap: resident memory creeps up with the amount
of work although what is alive stays bounded. Trimming after each bounded step keeps
the resident size bounded too; it costs about a millisecond.
"""

from __future__ import annotations

_libc = None


def trim_heap() -> None:
    """``malloc_trim(0)``: return the free memory at the top and inside glibc's heaps."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
