"""Error types of the widget and where they stop: worker generators, Qt slots, the status line."""

from __future__ import annotations

import functools
import logging

from ..core.prompts import PromptError
from . import layer_data

log = logging.getLogger("napari_sam3.widget")  # one logger for every module of the widget


class UserError(Exception):
    """A problem to report in one line (no model, no image, no prompt...)."""


class Cancelled(Exception):
    """Raised in a worker from a progress callback once Cancel was pressed."""


class WorkerError(Exception):
    """Carries a RuntimeError out of a generator worker: superqt's GeneratorWorker turns a
    RuntimeError into "aborted thread" and emits neither ``errored`` nor ``finished``
    (ModelLoadError and many torch errors are RuntimeErrors)."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def shielded(fn):
    """``fn`` (a generator function) with RuntimeErrors re-raised as ``WorkerError``."""

    @functools.wraps(fn)
    def gen(*args, **kwargs):
        try:
            return (yield from fn(*args, **kwargs))
        except RuntimeError as exc:
            raise WorkerError(exc) from exc

    return gen


def user_message(exc: BaseException) -> str:
    """One line for the user: our own errors carry it, others get their type."""
    from ..core.model import ModelLoadError

    exc = getattr(exc, "original", exc)  # WorkerError
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError | PromptError | layer_data.LayerError | ModelLoadError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def qt_deleted(obj) -> bool:
    """True once the C++ side of a Qt object is gone (PyQt: sip, PySide: shiboken)."""
    try:
        from qtpy import sip

        return bool(sip.isdeleted(obj))
    except Exception:  # noqa: BLE001 - PySide or no sip module
        try:
            from qtpy import shiboken

            return not shiboken.isValid(obj)
        except Exception:  # noqa: BLE001
            return False


def guarded(method):
    """Qt slots and napari callbacks of a widget part (anything with a ``session``): report
    any exception in one line instead of raising into Qt.

    A callback that arrives after the dock widget was closed or deleted closes the
    session (every part disconnects from napari) and does nothing.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        session = self.session
        if session.closed or qt_deleted(self):
            session.close()
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the boundary to Qt
            log.exception("SAM3 widget: %s failed", method.__name__)
            try:
                session.report(f"SAM3: {user_message(exc)}")
            except Exception:  # noqa: BLE001 - widget already deleted
                pass
            return None

    return wrapper
