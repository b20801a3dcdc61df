"""What worker threads run: job inputs captured on the GUI thread, job functions (no Qt)."""

from __future__ import annotations

from dataclasses import dataclass, field

_TASK_NAMES = {
    "precompute": "precompute",
    "propagation": "propagation",
    "concept": "concept search",
    "everything": "segment-everything run",
}


# -- what jobs get (captured on the GUI thread) -----------------------------------------------
@dataclass
class _Request:
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


@dataclass
class _Task:
    """A long job (precompute, propagation, concept or everything) with progress and Cancel."""

    kind: str  # a key of _TASK_NAMES
    worker: object = None
    total: int = 0
    done: int = 0
    encoded: int = 0
    cancelled: bool = False
    failed: bool = False
    # propagation
    obj_id: int = 0
    labels: object = None
    view: object = None  # _layers.AxisView of the labels' data
    written: set = field(default_factory=set)
    max_hole_area: int = 0
    max_sprinkle_area: int = 0
    # concept / everything
    source: str = ""  # what was asked, for messages and the features table
    n_lead: int = 0
    spatial_shape: tuple = ()
    results: list | None = None  # [(slice, ConceptResult or EverythingResult)]
    holder: dict = field(default_factory=dict)  # the concept model, once loaded
    concept_key: tuple = ()  # (segmenter, concept model) the holder's model is for
    step: str = ""


# -- worker functions (run in threads; no Qt, no napari) --------------------------------------
def _load_segmenter(
    model: str, device: str, cache=None, tile_size=None, overlap=None, on_cache_warning=None
):
    from .core.segmenter import Sam3Segmenter

    return Sam3Segmenter.from_pretrained(
        model,
        device=device,
        cache=cache,
        tile_size=tile_size,
        overlap=overlap,
        on_cache_warning=on_cache_warning,
    )


def _locked(gen, lock):
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


def _segment_job(segmenter, lock, req: _Request):
    """Generator run in a worker thread; each yield is a point where Cancel can stop it."""
    from .core.postprocess import masks_to_labels

    yield "cache"
    with lock:
        single = segmenter.tiles(req.image).single
        cached = single and segmenter.cached_embedding(req.image, req.limits) is not None
    if not cached:
        yield "encoding"
    with lock:
        obj = segmenter.predict_objects(req.image, [req.prompt], req.limits)[0]
    yield "post-processing"
    labels = masks_to_labels(
        obj.logits[None],
        ids=[req.obj_id],
        max_hole_area=req.max_hole_area,
        max_sprinkle_area=req.max_sprinkle_area,
    )
    return obj, labels


def _precompute_job(segmenter, lock, jobs):
    """Encode the tiles of each ``(plane, limits, region)``; yields (done, total, encoded)."""
    with lock:
        total = sum(len(segmenter.tiles(img).tiles_in(region)) for img, _, region in jobs)
    done = encoded = 0
    yield done, total, encoded
    for img, limits, region in jobs:
        for _, _, new in _locked(segmenter.precompute(img, limits, region), lock):
            done += 1
            encoded += bool(new)
            yield done, total, encoded


def _propagate_job(segmenter, lock, stack, prompts, kwargs):
    """Yields each ``SliceResult`` of ``Sam3Segmenter.iter_propagate`` as it is computed."""
    yield from _locked(segmenter.iter_propagate(stack, prompts, **kwargs), lock)


def _slice_progress(progress, i: int, n: int):
    """``progress(done, total)`` of slice ``i`` of ``n`` as progress over all slices."""

    def report(done, total):
        progress(i * int(total) + int(done), n * int(total))

    return report


def _concept_job(segmenter, lock, holder, model, planes, text, options, progress):
    """Find the concept on each ``(slice, plane, boxes, labels)``; loads the detector first
    if ``holder`` has none. Yields ("loading", model) and ("slice", i, n, slice) steps;
    returns ``[(slice, ConceptResult)]``."""
    from .core.concept import ConceptSegmenter

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
                progress=_slice_progress(progress, i, n),
                **options,
            )
        results.append((lead, res))
    return results


def _everything_job(segmenter, lock, planes, settings, limits, progress):
    """Segment everything on each ``(slice, plane)``; returns ``[(slice, EverythingResult)]``."""
    from .core.everything import generate_everything

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
                progress=_slice_progress(progress, i, n),
            )
        results.append((lead, res))
    return results
