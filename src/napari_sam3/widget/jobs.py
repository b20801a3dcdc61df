"""What worker threads run: the click request captured on the GUI thread, and the job
generators (no Qt, no napari; each yield is a point where Cancel can stop them)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


# -- what jobs get (captured on the GUI thread) -----------------------------------------------
@dataclass
class ClickRequest:
    """Everything a segmentation job needs."""

    image: object  # the plane to segment (lazy)
    lead: tuple  # its slice; () for a 2D image
    spatial_shape: tuple
    limits: tuple[float, float] | None
    prompt: object  # ObjectPrompt
    obj_id: int
    max_hole_area: int
    max_sprinkle_area: int
    image_layer: object
    ignored: int


# -- worker functions (run in threads; no Qt, no napari) --------------------------------------
def load_segmenter(
    model: str, device: str, cache=None, tile_size=None, overlap=None, on_cache_warning=None
):
    from ..core.segmenter import Sam3Segmenter

    return Sam3Segmenter.from_pretrained(
        model,
        device=device,
        cache=cache,
        tile_size=tile_size,
        overlap=overlap,
        on_cache_warning=on_cache_warning,
    )


def locked(gen, lock):
    """Run ``gen`` one step at a time under ``lock``, never holding it across a yield."""
    try:
        while True:
            with lock:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        gen.close()


def decode_threads(total: int) -> int:
    """Torch threads for a click whose embedding is cached, on the CPU: one core is left
    to napari's GUI thread, which draws while the decoder runs (on 2 cores, 2 threads
    and the GUI thread stall each other: warm clicks measured ~2x slower, BENCHMARKS.md);
    the small decoder gains nothing from more than 4."""
    return max(1, min(4, int(total) - 1))


@contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch intra-op threads (None: as they are), restored after."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _warm_tile(segmenter, req: ClickRequest) -> bool:
    """An encoded tile holds the prompt (what the tile routing then uses)."""
    from ..core.prompts import prompt_bbox

    r0, c0, r1, c1 = prompt_bbox(req.prompt)
    return any(b[0] <= r0 and b[1] <= c0 and r1 <= b[2] and c1 <= b[3]
               for b in segmenter.encoded_tiles(req.image, req.limits))


def click_object(segmenter, req: ClickRequest, embedding=None):
    """The click's ObjectMask over its tile (the whole image when it is not tiled);
    ``embedding``: the untiled image's, already found (its key is then not looked up
    again)."""
    if embedding is None:
        return segmenter.predict_objects(req.image, [req.prompt], req.limits)[0]
    from ..core.decode import ObjectMask
    from ..core.prompts import as_prompts

    h, w = embedding.image_shape
    pred = segmenter.predict(embedding, as_prompts([req.prompt], (h, w)))[0]
    return ObjectMask((slice(0, h), slice(0, w)), pred.logits, pred.iou_score,
                      pred.object_score)


def click_labels(obj, req: ClickRequest):
    """The click's object cleaned (holes, islands) as int32 labels over ``obj.region``."""
    from ..core.postprocess import masks_to_labels

    return masks_to_labels(obj.logits[None], ids=[req.obj_id],
                           max_hole_area=req.max_hole_area,
                           max_sprinkle_area=req.max_sprinkle_area)


def raw_labels(obj, req: ClickRequest) -> np.ndarray:
    """The click's object as the decoder gave it (logits > 0), int32 over ``obj.region``."""
    return (obj.logits > 0).astype(np.int32) * np.int32(req.obj_id)


@dataclass(frozen=True)
class RawPreview:
    """A step of :func:`segment_job`: the decoded mask before its clean-up, to show at once;
    the job then cleans it and returns the cleaned labels, which replace it."""

    obj: object  # ObjectMask
    labels: np.ndarray  # raw_labels(obj, req)


def segment_job(segmenter, lock, req: ClickRequest):
    """Generator run in a worker thread; each yield is a point where Cancel can stop it.

    Per click the image's key is found once (remembered per image object: a digest of
    the raw pixels, see ``tile_keys.image_key``) and the decoder runs. With a clean-up
    set, the raw mask is yielded first (a :class:`RawPreview`, shown at once: filling
    holes and removing islands costs tens of ms on a large mask, as much as a fifth of a
    CPU click), then the mask is cleaned on its bounding box and returned; the cleaned
    mask is what a commit writes."""
    yield "cache"
    with lock:
        single = segmenter.tiles(req.image).single
        emb = segmenter.cached_embedding(req.image, req.limits) if single else None
        cached = emb is not None if single else _warm_tile(segmenter, req)
    if not cached:
        yield "encoding"
    threads = None
    if cached and str(segmenter.device) == "cpu":
        import torch

        threads = decode_threads(torch.get_num_threads())
    with lock, torch_threads(threads):
        obj = click_object(segmenter, req, emb)
    if req.max_hole_area > 0 or req.max_sprinkle_area > 0:
        yield RawPreview(obj, raw_labels(obj, req))
    else:
        yield "post-processing"
    return obj, click_labels(obj, req)


def precompute_job(segmenter, lock, jobs):
    """Encode the tiles of each ``(plane, limits, region)``; yields (done, total, encoded)."""
    with lock:
        total = sum(len(segmenter.tiles(img).tiles_in(region)) for img, _, region in jobs)
    done = encoded = 0
    yield done, total, encoded
    for img, limits, region in jobs:
        for _, _, new in locked(segmenter.precompute(img, limits, region), lock):
            done += 1
            encoded += bool(new)
            yield done, total, encoded


def propagate_job(segmenter, lock, stack, prompts, kwargs):
    """Yields each ``SliceResult`` of ``Sam3Segmenter.iter_propagate`` as it is computed."""
    yield from locked(segmenter.iter_propagate(stack, prompts, **kwargs), lock)


def slice_progress(progress, i: int, n: int):
    """``progress(done, total)`` of slice ``i`` of ``n`` as progress over all slices."""

    def report(done, total):
        progress(i * int(total) + int(done), n * int(total))

    return report


def concept_job(segmenter, lock, holder, model, planes, text, options, progress):
    """Find the concept on each ``(slice, plane, boxes, labels)``; loads the detector first
    if ``holder`` has none. Yields ("loading", model) and ("slice", i, n, slice) steps;
    returns ``[(slice, ConceptResult)]``."""
    from ..core.concept import ConceptSegmenter

    concept = holder.get("concept")
    if concept is None:
        yield ("loading", model or segmenter.model_id)
        # no lock: loading only reads the tracker (to share its ViT when the weights match)
        concept = ConceptSegmenter.for_segmenter(segmenter, model)
        holder["concept"] = concept
    results = []
    n = len(planes)
    for i, (lead, image, boxes, labels) in enumerate(planes):
        yield ("slice", i, n, lead)
        with lock:
            res = concept.detect(
                image,
                text,
                boxes,
                exemplar_labels=labels,
                progress=slice_progress(progress, i, n),
                **options,
            )
        results.append((lead, res))
    return results


def everything_job(segmenter, lock, planes, settings, limits, progress):
    """Segment everything on each ``(slice, plane)``; returns ``[(slice, EverythingResult)]``."""
    from ..core.everything import generate_everything

    results = []
    n = len(planes)
    for i, (lead, image) in enumerate(planes):
        yield ("slice", i, n, lead)
        with lock:
            res = generate_everything(
                segmenter,
                image,
                settings=settings,
                limits=limits,
                progress=slice_progress(progress, i, n),
            )
        results.append((lead, res))
    return results
