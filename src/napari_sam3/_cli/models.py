"""Loading SAM3 with the command line's options (--model, --device, cache and tiling);
a checkpoint that cannot be loaded is one error line (exit 2), never a traceback."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import CliError


@contextlib.contextmanager
def _quiet_local_load(model: str):
    """No "Loading weights" bar for a local folder; hub downloads keep their progress bars."""
    if not Path(model).expanduser().exists():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_error(e: Exception, model: str) -> CliError:
    from ..model import ModelLoadError

    if isinstance(e, ModelLoadError):
        return CliError(e)
    if isinstance(e, ValueError) and ("overlap" in str(e) or "tile size" in str(e)):
        return CliError(f"--tile/--overlap: {e}")  # TileGrid's checks
    return CliError(f"cannot load model {model!r}: {type(e).__name__}: {e}")


def _from_pretrained(load, model: str, args, cache: Path | None, on_cache_warning):
    """``load(model, **options)`` with the CLI's options; errors are one line, exit 2."""
    try:
        with _quiet_local_load(model):
            return load(
                model,
                device=args.device,
                cache=cache,
                cache_dtype=args.cache_dtype,
                tile_size=args.tile,
                overlap=args.overlap,
                on_cache_warning=on_cache_warning,
            )
    except Exception as e:  # noqa: BLE001 - a broken checkpoint must not print a traceback
        raise _load_error(e, model) from None


def load_segmenter(args, cache: Path | None, on_cache_warning, video: bool = False):
    """Sam3Segmenter.from_pretrained (--model); with ``video``, its video tracker too."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ..segmenter import Sam3Segmenter

    def load(model, **options):
        segmenter = Sam3Segmenter.from_pretrained(model, **options)
        if video:
            segmenter.video_tracker()  # fails here, before anything is written
        return segmenter

    return _from_pretrained(load, args.model, args, cache, on_cache_warning)


def load_concept(args, cache: Path | None, on_cache_warning):
    """ConceptSegmenter.from_pretrained (--concept-model, else --model); errors exit 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ..concept import ConceptSegmenter

    model = args.concept_model or args.model
    return _from_pretrained(ConceptSegmenter.from_pretrained, model, args, cache, on_cache_warning)
