"""Loading SAM3 with the command line's options (--model, --device, cache and tiling);
a checkpoint that cannot be loaded is one error line (exit 2), never a traceback.

The model arguments and --device are checked before torch is imported (a mistyped
folder fails at once); transformers is kept quiet by :mod:`napari_sam3.core.model`."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import PROG, CliError, one_line


def _load_error(e: Exception, model: str) -> CliError:
    from ..core.model import ModelLoadError

    if isinstance(e, ModelLoadError):
        return CliError(e)
    if isinstance(e, ValueError) and ("overlap" in str(e) or "tile size" in str(e)):
        return CliError(f"--tile/--overlap: {e}")  # TileGrid's checks
    return CliError(f"cannot load model {model!r}: {type(e).__name__}: {e}")


def checked_model(model: str, device: str):
    """``model.prepare_model`` and the device name, without torch: one error line, or a
    note when a local folder is used for a name that is also a hub id's."""
    from ..core.model import ModelLoadError, check_device_name, prepare_model

    try:
        check_device_name(device)
        source = prepare_model(model)
    except ModelLoadError as e:
        raise CliError(e) from None
    if source.note:
        print(f"{PROG}: note: {one_line(source.note)}", file=sys.stderr, flush=True)
    return source


def _from_pretrained(load, model: str, args, cache: Path | None, on_cache_warning):
    """``load(model, **options)`` with the CLI's options; errors are one line, exit 2."""
    source = checked_model(model, args.device)  # before torch is imported
    try:
        loaded = load(
            source,
            device=args.device,
            cache=cache,
            cache_dtype=args.cache_dtype,
            tile_size=args.tile,
            overlap=args.overlap,
            on_cache_warning=on_cache_warning,
        )
    except Exception as e:  # noqa: BLE001 - a broken checkpoint must not print a traceback
        raise _load_error(e, model) from None
    loaded.exact_dtype = bool(getattr(args, "exact_dtype", False))
    return loaded


def load_segmenter(args, cache: Path | None, on_cache_warning, video: bool = False):
    """Sam3Segmenter.from_pretrained (--model); with ``video``, its video tracker too."""

    def load(model, **options):
        from ..core.segmenter import Sam3Segmenter

        segmenter = Sam3Segmenter.from_pretrained(model, **options)
        if video:
            segmenter.video_tracker()  # fails here, before anything is written
        return segmenter

    return _from_pretrained(load, args.model, args, cache, on_cache_warning)


def load_concept(args, cache: Path | None, on_cache_warning):
    """ConceptSegmenter.from_pretrained (--concept-model, else --model); errors exit 2."""

    def load(model, **options):
        from ..core.concept import ConceptSegmenter

        return ConceptSegmenter.from_pretrained(model, **options)

    return _from_pretrained(load, args.concept_model or args.model, args, cache,
                            on_cache_warning)
