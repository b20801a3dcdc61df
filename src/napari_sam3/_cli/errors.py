"""How the command line reports: one ``napari-sam3: error|warning: ...`` line each."""

from __future__ import annotations

import contextlib
import sys

PROG = "napari-sam3"


class CliError(Exception):
    """Reported as one line on stderr; ``status`` 2 for bad input, 1 for a failed run."""

    status = 2


def one_line(text) -> str:
    return " ".join(str(text).split())


def warn(message) -> None:
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr, flush=True)


def failed(message: str) -> CliError:
    """A CliError with status 1: the input was fine, the run failed."""
    err = CliError(message)
    err.status = 1
    return err


@contextlib.contextmanager
def reported_as_failed(what: str):
    """Any error but a CliError becomes ``WHAT failed: Type: message``, status 1."""
    try:
        yield
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line, status 1, nothing written
        raise failed(f"{what} failed: {type(e).__name__}: {e}") from None
