"""Concept segmentation (text / exemplar boxes) against transformers' recipe, on a tiny
random Sam3Model; thresholds, tiling, caching, stacks and existing labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam3 import PromptError, Sam3Segmenter
from napari_sam3.core.concept import (
    ConceptSegmenter,
    attach_concept,
    concept_for,
    detect_concept,
    load_concept_model,
    segment_concept,
)
from napari_sam3.core.instances import intersect, mask_iou, tile_box
from napari_sam3.core.model import ModelLoadError
from napari_sam3.core.prompts import box_to_xyxy

EXACT = dict(min_score=0.0, max_hole_area=0, max_sprinkle_area=0)


@pytest.fixture(scope="module")
def tiny_concept_dir(tmp_path_factory):
    from napari_sam3.testing_concept import save_random_concept_model

    return save_random_concept_model(tmp_path_factory.mktemp("tiny_concept"), seed=0)


@pytest.fixture(scope="module")
def concept(tiny_concept_dir):
    """Loaded through the package's own loader; a 1024 px tile keeps test images untiled."""
    return ConceptSegmenter.from_pretrained(str(tiny_concept_dir), device="cpu", tile_size=1024)


@pytest.fixture(scope="module")
def reference(tiny_concept_dir):
    from transformers import Sam3Model, Sam3Processor

    return (Sam3Model.from_pretrained(str(tiny_concept_dir)).eval(),
            Sam3Processor.from_pretrained(str(tiny_concept_dir)))


def noisy(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(tuple(shape) + (3,)) * 255).astype(np.uint8)


def recipe(reference, rgb, text=None, boxes=None, labels=None, threshold=0.0):
    """transformers' documented recipe; instances by decreasing score, empty masks dropped."""
    model, processor = reference
    kwargs = {}
    if boxes is not None:
        kwargs["input_boxes"] = [[box_to_xyxy(b) for b in boxes]]
        kwargs["input_boxes_labels"] = [list(labels or [1] * len(boxes))]
    inputs = processor(images=rgb, text=text, return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = model(**inputs)
    res = processor.post_process_instance_segmentation(
        out, threshold=threshold, mask_threshold=0.5, target_sizes=[rgb.shape[:2]])[0]
    order = np.argsort(-res["scores"].numpy(), kind="stable")
    return [(float(res["scores"][i]), res["masks"][i].numpy().astype(bool)) for i in order
            if res["masks"][i].any()]


def paint(masks, shape):
    labels = np.zeros(shape, dtype=np.int32)
    next_id = 1
    for m in masks:
        free = m & (labels == 0)
        if free.any():
            labels[free] = next_id
            next_id += 1
    return labels


PROMPTS = {
    "text": dict(text="nucleus"),
    "text + positive and negative exemplars": dict(
        text="cell", boxes=[[10, 20, 40, 60], [50, 60, 80, 120]], labels=[1, 0]),
    "exemplar only": dict(boxes=[[30, 70, 60, 110]]),
}


@pytest.mark.parametrize("case", PROMPTS, ids=list(PROMPTS))
def test_single_tile_matches_transformers_recipe(concept, reference, case):
    p = PROMPTS[case]
    rgb = noisy((90, 130), seed=1)  # not square: the processor squashes, masks come back
    theirs = recipe(reference, rgb, p.get("text"), p.get("boxes"), p.get("labels"))
    res = concept.detect(rgb, p.get("text"), p.get("boxes"), exemplar_labels=p.get("labels"),
                         **EXACT)
    mine = sorted(res.candidates, key=lambda x: -x.score)
    assert len(mine) == len(theirs) > 0
    for inst, (score, mask) in zip(mine, theirs, strict=True):
        assert np.float32(inst.score) == np.float32(score)
        np.testing.assert_array_equal(inst.full(rgb.shape[:2]), mask)
    threshold = float(np.median([s for s, _ in theirs]))
    labels = res.paint(threshold=threshold)
    above = [m for s, m in theirs if s > threshold]
    assert 0 < len(above) < len(theirs)
    np.testing.assert_array_equal(labels, paint(above, labels.shape))
    table = res.features
    assert list(table["index"]) == list(range(1, labels.max() + 1))
    assert (np.diff(table["score"]) <= 0).all() and (table["score"] > threshold).all()
    assert "presence" in table


def test_threshold_changes_never_run_the_model(concept):
    rgb = noisy((80, 80), seed=2)
    res = concept.detect(rgb, "cell", **EXACT)
    enc, dec = concept.encoder_calls, concept.decoder_calls
    scores = sorted(x.score for x in res.candidates)
    for t in np.linspace(scores[0], scores[-1], 7):
        res.paint(threshold=float(t))
    assert concept.encoder_calls == enc and concept.decoder_calls == dec
    counts = []
    for t in (scores[0] - 1e-6, scores[len(scores) // 2], scores[-1]):
        labels = res.paint(threshold=t)
        counts.append(len(res.features["index"]))
        assert labels.dtype == np.int32 and res.threshold == t
        fresh = concept.detect(rgb, "cell", threshold=t, **EXACT).paint()
        np.testing.assert_array_equal(labels, fresh)
    assert counts[0] >= counts[1] >= counts[2] == 0
    assert concept.encoder_calls == enc  # fresh detections reused the cached ViT features
    with pytest.raises(ValueError, match="min_score"):
        concept.detect(rgb, "cell", min_score=0.2).paint(threshold=0.1)


def test_text_and_vision_features_are_cached(concept):
    rgb = noisy((70, 70), seed=3)
    before = concept.encoder_calls
    concept.detect(rgb, "nucleus", **EXACT)
    concept.detect(rgb, "mitochondrion", **EXACT)
    concept.detect(rgb, exemplars=[[5, 5, 30, 30]], **EXACT)
    assert concept.encoder_calls == before + 1
    assert "nucleus" in concept._text_cache and "mitochondrion" in concept._text_cache


@pytest.fixture(scope="module")
def tiled(tiny_concept_dir):
    return ConceptSegmenter.from_pretrained(str(tiny_concept_dir), device="cpu", tile_size=112,
                                            overlap=28)


def test_tiles_match_the_recipe_on_each_tile(tiled, reference):
    """Every tile's candidates are the recipe's on that tile (zero-padded to 112 px)."""
    from napari_sam3.core.tiling import pad_to

    rgb = noisy((196, 196), seed=4)
    before = tiled.encoder_calls
    res = tiled.detect(rgb, "cell", **EXACT)
    grid = tiled.tiles(rgb)
    assert len(grid) == 4 and tiled.encoder_calls - before == 4
    for k, t in enumerate(grid.tiles):
        padded = pad_to(rgb[t.slices], (112, 112))
        theirs = [(s, m[:t.shape[0], :t.shape[1]]) for s, m in recipe(reference, padded, "cell")]
        theirs = [(s, m) for s, m in theirs if m.any()]
        mine = sorted((x for x in res.candidates if x.tile == k), key=lambda x: -x.score)
        assert len(mine) == len(theirs)
        for inst, (score, mask) in zip(mine, theirs, strict=True):
            assert np.float32(inst.score) == np.float32(score)
            np.testing.assert_array_equal(inst.full(rgb.shape[:2])[t.slices], mask)


def test_tiled_labels_have_each_instance_once(tiled):
    rgb = noisy((196, 196), seed=5)
    res = tiled.detect(rgb, "cell", **EXACT)
    threshold = float(np.median([x.score for x in res.candidates]))
    chosen = res.instances(threshold)
    assert len(chosen) < sum(x.score > threshold for x in res.candidates)  # seams merged
    grid = res.grid
    plain = [x for x in chosen if not x.extra.get("stitched")]
    for i, a in enumerate(plain):
        for b in plain[i + 1:]:
            if a.tile != b.tile:
                shared = intersect(tile_box(grid.tiles[a.tile]), tile_box(grid.tiles[b.tile]))
                assert shared is None or mask_iou(a, b, shared) <= 0.5
    labels = res.paint(threshold=threshold)
    ids = sorted(set(np.unique(labels)) - {0})
    assert ids == list(res.features["index"]) == list(range(1, len(ids) + 1))
    np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], res.features["area"])


def test_exemplar_in_one_tile_prompts_every_tile(tiled, reference):
    """The exemplar is encoded in its own tile; those prompt tokens are used everywhere."""
    rgb = noisy((196, 196), seed=6)
    box = [120, 130, 150, 170]  # inside tile 3 only (rows/cols 84-196)
    res = tiled.detect(rgb, exemplars=[box], **EXACT)
    assert {x.tile for x in res.candidates} == {0, 1, 2, 3}
    # tile 3 equals the recipe on that tile with the box in tile coordinates
    from napari_sam3.core.tiling import pad_to

    t = res.grid.tiles[3]
    local = [box[0] - t.r0, box[1] - t.c0, box[2] - t.r0, box[3] - t.c0]
    theirs = recipe(reference, pad_to(rgb[t.slices], (112, 112)), None, [local])
    mine = sorted((x for x in res.candidates if x.tile == 3), key=lambda x: -x.score)
    assert [np.float32(x.score) for x in mine] == [np.float32(s) for s, m in theirs
                                                   if m[:t.shape[0], :t.shape[1]].any()]
    with pytest.raises(PromptError):
        tiled.detect(rgb, exemplars=[[300, 300, 320, 320]])


def test_vision_cache_on_disk_is_shared_across_sessions(tiny_concept_dir, tiny_tracker_dir,
                                                        tmp_path):
    cache = tmp_path / "emb.zarr"
    rgb = noisy((196, 196), seed=7)
    first = ConceptSegmenter.from_pretrained(str(tiny_concept_dir), device="cpu", tile_size=112,
                                             overlap=28, cache=cache, cache_dtype="float32")
    a = first.detect(rgb, "cell", **EXACT)
    assert first.encoder_calls == 4
    second = ConceptSegmenter.from_pretrained(str(tiny_concept_dir), device="cpu",
                                              tile_size=112, overlap=28, cache=cache,
                                              cache_dtype="float32")
    b = second.detect(rgb, "nucleus", **EXACT)
    c = second.detect(rgb, "cell", **EXACT)
    assert second.encoder_calls == 0 and second.store.disk_reads == 4
    assert [x.score for x in a.candidates] == [x.score for x in c.candidates]
    assert len(b.candidates) > 0
    # the tracker's tile embeddings live in the same folder under their own keys
    seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                        overlap=28, cache=cache, cache_dtype="float32")
    list(seg.precompute(rgb))
    assert seg.encoder_calls == 4 and len(seg.store.disk_entries()) == 8
    # float16 storage: close to float32, not bit-equal
    half = ConceptSegmenter.from_pretrained(str(tiny_concept_dir), device="cpu", tile_size=112,
                                            overlap=28, cache=tmp_path / "half.zarr")
    half.detect(rgb, "cell", **EXACT)
    again = ConceptSegmenter.from_pretrained(str(tiny_concept_dir), device="cpu",
                                             tile_size=112, overlap=28,
                                             cache=tmp_path / "half.zarr")
    d = again.detect(rgb, "cell", **EXACT)
    assert again.encoder_calls == 0
    np.testing.assert_allclose(sorted(x.score for x in d.candidates),
                               sorted(x.score for x in a.candidates), atol=1e-3)


def test_existing_labels_are_kept_unless_overwrite(concept):
    rgb = noisy((64, 64), seed=8)
    existing = np.zeros((64, 64), dtype=np.int32)
    existing[10:30, 10:30] = 4
    opts = dict(threshold=0.0, **EXACT)
    out = concept.segment_concept(rgb, "cell", out=existing.copy(), **opts)
    assert (out[10:30, 10:30] == 4).all()
    new = set(np.unique(out)) - {0, 4}
    assert new and min(new) == 5
    over = concept.segment_concept(rgb, "cell", out=existing.copy(), overwrite=True, **opts)
    assert not (over[10:30, 10:30] == 4).all()


def test_stack_is_segmented_slice_by_slice(concept):
    stack = np.stack([noisy((48, 48), seed=s)[..., 0].astype(np.uint16) * 100
                      for s in (9, 10, 11)])
    labels = concept.segment_concept(stack, "cell", threshold=0.0, **EXACT)
    assert labels.shape == stack.shape and labels.dtype == np.int32
    per_slice = [set(np.unique(sl)) - {0} for sl in labels]
    assert all(per_slice)
    assert not (per_slice[0] & per_slice[1]) and not (per_slice[1] & per_slice[2])


def test_prompt_errors(concept):
    rgb = noisy((40, 40))
    with pytest.raises(PromptError):
        concept.detect(rgb)
    with pytest.raises(PromptError):
        concept.detect(rgb, "  ")
    with pytest.raises(PromptError):
        concept.detect(rgb, exemplars=[[1, 2, 3]])
    with pytest.raises(PromptError):
        concept.detect(rgb, exemplars=[[1, 2, 10, 10]], exemplar_labels=[2])
    with pytest.raises(PromptError):
        concept.detect(rgb, exemplars=[[1, 2, 10, 10]], exemplar_labels=[1, 0])


def test_loading_errors(tiny_tracker_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="concept detector"):
        load_concept_model(str(tiny_tracker_dir))
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_concept_model(str(tmp_path / "missing" / "model" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_concept_model(str(tmp_path / "empty"))


def test_segmenter_api(tiny_segmenter, tiny_concept_dir, concept):
    rgb = noisy((60, 60), seed=12)
    labels = segment_concept(tiny_segmenter, rgb, "cell", threshold=0.0,
                             concept_model=str(tiny_concept_dir), **EXACT)
    cs = concept_for(tiny_segmenter)
    assert cs.model_id == str(tiny_concept_dir)
    assert cs.tile_size == tiny_segmenter.tile_size and cs.overlap == tiny_segmenter.overlap
    np.testing.assert_array_equal(
        labels, concept.segment_concept(rgb, "cell", threshold=0.0, **EXACT))
    res = detect_concept(tiny_segmenter, rgb, "cell", **EXACT)
    assert len(res.candidates) > 0
    attach_concept(tiny_segmenter, concept)
    assert concept_for(tiny_segmenter) is concept
    if hasattr(Sam3Segmenter, "segment_concept"):
        np.testing.assert_array_equal(
            tiny_segmenter.segment_concept(rgb, "cell", threshold=0.0, **EXACT), labels)


def test_shared_trunk_with_the_tracker(tiny_tracker_dir, tiny_concept_dir, tmp_path):
    """A checkpoint whose detector and tracker share one ViT (as facebook/sam3 does): the
    trunk is held once in memory and its cached output can feed the tracker exactly."""
    from transformers import Sam3Model

    from napari_sam3.core.concept import share_backbone, tracker_embeddings_from_trunk

    seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=1024)
    other = ConceptSegmenter.for_segmenter(seg, str(tiny_concept_dir))
    assert not other.shares_backbone  # different random weights: nothing shared
    model = Sam3Model.from_pretrained(str(tiny_concept_dir))
    model.vision_encoder.backbone.load_state_dict(seg.model.vision_encoder.backbone.state_dict())
    model.save_pretrained(tmp_path / "shared")
    other.processor.save_pretrained(tmp_path / "shared")
    cs = ConceptSegmenter.for_segmenter(seg, str(tmp_path / "shared"))
    assert cs.shares_backbone
    assert cs.model.vision_encoder.backbone is seg.model.vision_encoder.backbone
    assert share_backbone(cs.model, seg.model)
    rgb = noisy((70, 70), seed=13)
    feats = tracker_embeddings_from_trunk(seg.model, cs.trunk(rgb))
    direct = seg.encode_rgb(rgb).features
    for a, b in zip(feats, direct, strict=True):
        assert torch.equal(a, b)


def test_optional_nms_within_a_tile(concept):
    rgb = noisy((64, 64), seed=14)
    plain = concept.detect(rgb, "cell", **EXACT)
    with_nms = concept.detect(rgb, "cell", nms_iou=0.3, **EXACT)
    t = min(x.score for x in plain.candidates) - 1e-6
    assert 0 < len(with_nms.instances(t)) < len(plain.instances(t))


def test_rgb_stack(concept):
    stack = np.stack([noisy((40, 40), seed=s) for s in (15, 16)])  # (Z, H, W, 3) uint8
    labels = concept.segment_concept(stack, "cell", threshold=0.0, **EXACT)
    assert labels.shape == (2, 40, 40)
    np.testing.assert_array_equal(
        labels[0], concept.segment_concept(stack[0], "cell", threshold=0.0, **EXACT))
