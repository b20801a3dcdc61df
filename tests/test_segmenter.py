"""Sam3Segmenter against the transformers recipe it wraps, on a tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Sam3TrackerModel, Sam3TrackerProcessor

from napari_sam3 import ObjectPrompt, PromptError, Sam3Segmenter
from napari_sam3.core.model import ModelLoadError
from napari_sam3.core.segmenter import add_no_memory_embedding


@pytest.fixture(scope="module")
def reference(tiny_tracker_dir):
    """The bare transformers objects, loaded directly from the same folder."""
    model = Sam3TrackerModel.from_pretrained(str(tiny_tracker_dir)).eval()
    processor = Sam3TrackerProcessor.from_pretrained(str(tiny_tracker_dir))
    return model, processor


def recipe(reference, image, points=None, labels=None, boxes=None, multimask=False):
    """transformers' documented recipe plus the one-line no-memory correction.

    Returns per-object (logits (H, W), binary mask (H, W)) with the mask choice
    rule: best predicted IoU when multimask, else the single mask.
    """
    model, processor = reference
    kwargs = {}
    if points is not None:
        kwargs.update(input_points=points, input_labels=labels)
    if boxes is not None:
        kwargs.update(input_boxes=boxes)
    inputs = processor(images=image, return_tensors="pt", **kwargs)
    with torch.no_grad():
        emb = model.get_image_embeddings(inputs["pixel_values"])
        emb[-1] = emb[-1] + model.no_memory_embedding.reshape(1, -1, 1, 1)
        prompt_inputs = {k: inputs[k] for k in ("input_points", "input_labels", "input_boxes")
                         if k in inputs}
        out = model(image_embeddings=emb, multimask_output=multimask, **prompt_inputs)
    logits = processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                          binarize=False)[0]
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0]
    best = out.iou_scores[0].argmax(-1)
    idx = torch.arange(len(best))
    return logits[idx, best].numpy(), masks[idx, best].numpy()


CASES = {
    "single point": (
        [ObjectPrompt(points=[(20, 95)])],
        dict(points=[[[[95, 20]]]], labels=[[[1]]], multimask=True),
    ),
    "positive and negative points": (
        [ObjectPrompt(points=[(20, 95), (50, 30), (60, 100)], point_labels=[1, 0, 1])],
        dict(points=[[[[95, 20], [30, 50], [100, 60]]]], labels=[[[1, 0, 1]]]),
    ),
    "box": (
        [ObjectPrompt(box=(10, 60, 50, 115))],
        dict(boxes=[[[60, 10, 115, 50]]]),
    ),
    "box and points": (
        [ObjectPrompt(box=(10, 60, 50, 115), points=[(30, 80), (12, 62)], point_labels=[1, 0])],
        dict(boxes=[[[60, 10, 115, 50]]], points=[[[[80, 30], [62, 12]]]], labels=[[[1, 0]]]),
    ),
    "several boxes": (
        [ObjectPrompt(box=(5, 5, 40, 50)), ObjectPrompt(box=(30, 60, 70, 118)),
         ObjectPrompt(box=(0, 40, 20, 80))],
        dict(boxes=[[[5, 5, 50, 40], [60, 30, 118, 70], [40, 0, 80, 20]]]),
    ),
    "several point objects": (
        [ObjectPrompt(points=[(10, 10), (40, 40)], point_labels=[1, 1]),
         ObjectPrompt(points=[(60, 100), (65, 20)], point_labels=[1, 0])],
        dict(points=[[[[10, 10], [40, 40]], [[100, 60], [20, 65]]]], labels=[[[1, 1], [1, 0]]]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_matches_transformers_recipe(case, tiny_segmenter, reference, asym_image):
    prompts, kwargs = CASES[case]
    ref_logits, ref_masks = recipe(reference, asym_image, **kwargs)
    emb = tiny_segmenter.encode(asym_image)
    preds = tiny_segmenter.predict(emb, prompts)
    assert len(preds) == len(prompts)
    for pred, lg, mk in zip(preds, ref_logits, ref_masks, strict=True):
        assert pred.logits.shape == asym_image.shape[:2]
        np.testing.assert_array_equal(pred.logits > 0, mk)
        np.testing.assert_allclose(pred.logits, lg, rtol=0, atol=1e-5)
    assert any(m.any() and not m.all() for m in ref_masks), "degenerate case: mask empty/full"


@pytest.mark.parametrize("case", list(CASES))
def test_segment_labels_match_recipe(case, tiny_segmenter, reference, asym_image):
    prompts, kwargs = CASES[case]
    ref_logits, _ = recipe(reference, asym_image, **kwargs)
    labels = tiny_segmenter.segment(asym_image, prompts, max_hole_area=0, max_sprinkle_area=0)
    expected = np.where((ref_logits > 0).any(0), np.argmax(np.where(ref_logits > 0, ref_logits,
                                                                     -np.inf), 0) + 1, 0)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) <= set(range(len(prompts) + 1))


def test_mixed_objects_equal_one_by_one(tiny_segmenter, reference, asym_image):
    """Objects of different prompt kinds in one call give each object's own recipe result."""
    prompts = [CASES["single point"][0][0], CASES["box"][0][0],
               CASES["positive and negative points"][0][0]]
    preds = tiny_segmenter.predict(tiny_segmenter.encode(asym_image), prompts)
    for name, pred in zip(["single point", "box", "positive and negative points"], preds,
                          strict=True):
        _, mk = recipe(reference, asym_image, **CASES[name][1])
        np.testing.assert_array_equal(pred.logits > 0, mk[0])


def test_swapped_axes_give_other_masks(tiny_segmenter, reference, asym_image):
    """A (row, col) point is not read as (x, y): the recipe with swapped coords differs."""
    emb = tiny_segmenter.encode(asym_image)
    ours = tiny_segmenter.predict(emb, [ObjectPrompt(box=(10, 60, 50, 115))])[0].logits > 0
    _, swapped = recipe(reference, asym_image, boxes=[[[10, 60, 50, 115]]])
    assert not np.array_equal(ours, swapped[0])


def test_embedding_reused(tiny_tracker_dir, asym_image):
    seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=1024)
    seg.segment(asym_image, [ObjectPrompt(points=[(5, 5)])])
    seg.segment(asym_image, [ObjectPrompt(points=[(50, 5)]), ObjectPrompt(box=(1, 1, 9, 9))])
    assert seg.encoder_calls == 1
    edited = asym_image.copy()
    edited[0, 0, 0] ^= 1
    seg.segment(edited, [ObjectPrompt(points=[(5, 5)])])
    assert seg.encoder_calls == 2


def test_no_memory_embedding_added_where_transformers_did_not(reference, asym_image):
    model, processor = reference
    pixels = processor(images=asym_image, return_tensors="pt")["pixel_values"]
    nomem = model.no_memory_embedding.reshape(1, -1, 1, 1)
    assert nomem.abs().sum() > 0, "the fixture must make no_memory_embedding non-zero"
    with torch.no_grad():
        plain = model.get_image_embeddings(pixels)
        ours = add_no_memory_embedding(model, pixels)
    torch.testing.assert_close(ours[-1], plain[-1] + nomem, rtol=0, atol=0)
    for a, b in zip(ours[:-1], plain[:-1], strict=True):
        assert torch.equal(a, b)


def test_no_memory_embedding_not_added_twice(reference, asym_image, monkeypatch):
    """A transformers release that adds the term itself is not corrected again."""
    model, processor = reference
    pixels = processor(images=asym_image, return_tensors="pt")["pixel_values"]
    nomem = model.no_memory_embedding.reshape(1, -1, 1, 1)
    original = model.get_image_embeddings

    def fixed_release(pixel_values, **kwargs):
        emb = original(pixel_values, **kwargs)
        emb[-1] = emb[-1] + nomem
        return emb

    monkeypatch.setattr(model, "get_image_embeddings", fixed_release)
    with torch.no_grad():
        expected = fixed_release(pixels)
        ours = add_no_memory_embedding(model, pixels)
    assert torch.equal(ours[-1], expected[-1])


def test_uint16_image_normalised_with_limits(tiny_segmenter):
    rng = np.random.default_rng(3)
    img = rng.integers(100, 4000, size=(50, 70)).astype(np.uint16)
    prompts = [ObjectPrompt(points=[(25, 35)])]
    a = tiny_segmenter.segment(img, prompts, limits=(100, 4000))
    rgb = np.repeat(np.clip(np.rint((img.astype(np.float32) - 100) * (255 / 3900)), 0,
                            255).astype(np.uint8)[..., None], 3, axis=-1)
    b = tiny_segmenter.segment(rgb, prompts)
    np.testing.assert_array_equal(a, b)


def test_mask_prompt_refines(tiny_segmenter, asym_image):
    box = tiny_segmenter.segment(asym_image, [ObjectPrompt(box=(10, 60, 50, 115))],
                                 max_hole_area=0, max_sprinkle_area=0)
    refined = tiny_segmenter.segment(asym_image, [ObjectPrompt(mask=box == 1)])
    assert refined.shape == box.shape and set(np.unique(refined)) <= {0, 1}


def test_prompt_outside_image_is_rejected(tiny_segmenter, asym_image):
    with pytest.raises(PromptError, match="outside"):
        tiny_segmenter.segment(asym_image, [ObjectPrompt(points=[(72, 5)])])
    with pytest.raises(PromptError, match="outside"):
        tiny_segmenter.segment(asym_image, [ObjectPrompt(box=(80, 0, 90, 10))])


def test_missing_model_folder_message(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        Sam3Segmenter.from_pretrained(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelLoadError, match="config.json"):
        Sam3Segmenter.from_pretrained(str(tmp_path), device="cpu")


def test_offline_hub_model_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hf auth login"):
        Sam3Segmenter.from_pretrained("facebook/sam3-not-cached-here", device="cpu")


# -- the warm click: a remembered key, the bare mask, our clean-up ------------------------------
def _untiled(tiny_tracker_dir):
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=1024)


def _count(monkeypatch, seg):
    """Counts of normalisations (``prepare``) and content hashes (``embedding_key``)."""
    calls = {"prepare": 0, "embedding_key": 0}
    for name in calls:
        real = getattr(seg, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(seg, name, counted)
    return calls


def test_the_image_key_is_remembered_and_follows_pixels_and_limits(tiny_tracker_dir,
                                                                   monkeypatch):
    """The same array object gives the same key without normalising or hashing it again;
    a pixel edited in place, or other limits, give a new key (a stale key would give
    the old image's embedding: a wrong mask)."""
    rng = np.random.default_rng(3)
    img = (rng.random((72, 120)) * 4000).astype(np.uint16)
    seg = _untiled(tiny_tracker_dir)
    calls = _count(monkeypatch, seg)
    key = seg.image_key(img, (0, 4000))
    assert calls == {"prepare": 1, "embedding_key": 1}
    assert key == seg.embedding_key(seg.prepare(img, (0, 4000)))  # the same key as before
    calls.update(prepare=0, embedding_key=0)
    for _ in range(3):
        assert seg.image_key(img, (0, 4000)) == key
    seg.segment(img, [ObjectPrompt(points=[(30, 40)])], limits=(0, 4000))
    seg.segment(img, [ObjectPrompt(points=[(30, 40)])], limits=(0, 4000))
    # one encode: the image is normalised for the encoder only; no hash at all
    assert seg.encoder_calls == 1 and calls == {"prepare": 1, "embedding_key": 0}
    other = seg.image_key(img, (0, 3000))
    assert other != key
    img[5, 7] += 100  # one pixel, in place: the same object
    edited = seg.image_key(img, (0, 4000))
    assert edited not in (key, other)
    assert edited == seg.embedding_key(seg.prepare(img, (0, 4000)))
    before = seg.encoder_calls
    seg.segment(img, [ObjectPrompt(points=[(30, 40)])], limits=(0, 4000))
    assert seg.encoder_calls == before + 1  # the edited image is encoded, not the old one
    img[5, 7] -= 100  # back: the first key again (and its cached embedding)
    assert seg.image_key(img, (0, 4000)) == key
    assert seg.cached_embedding(img, (0, 4000)).key == key
    # without limits the key depends on the pixels only: remembered too, and edits count
    auto = seg.image_key(img)
    calls.update(prepare=0, embedding_key=0)
    assert seg.image_key(img) == auto and calls == {"prepare": 0, "embedding_key": 0}
    img[:36] = img[36:][::-1]  # an edit that keeps the histogram, so the limits
    assert seg.image_key(img) != auto


def test_a_plane_of_a_stack_edited_in_place_gets_a_new_key(tiny_tracker_dir):
    from napari_sam3.core.planes import plane_of

    rng = np.random.default_rng(4)
    stack = (rng.random((3, 72, 120)) * 255).astype(np.uint8)
    seg = _untiled(tiny_tracker_dir)
    keys = [seg.image_key(plane_of(stack, (z,)), (0, 255)) for z in range(3)]
    assert len(set(keys)) == 3
    assert seg.image_key(plane_of(stack, (1,)), (0, 255)) == keys[1]  # a new view, same plane
    stack[1, 0, 0] ^= 1
    assert seg.image_key(plane_of(stack, (1,)), (0, 255)) != keys[1]
    assert seg.image_key(plane_of(stack, (2,)), (0, 255)) == keys[2]


@pytest.mark.parametrize("case", ["single point", "box"])
def test_a_warm_click_is_the_bare_mask_with_our_clean_up(case, tiny_tracker_dir, reference,
                                                         asym_image):
    """The API's ``segment`` and the widget's click job, warm, give exactly the bare
    decoder's best mask upsampled (transformers' recipe) with our hole/island clean-up."""
    import threading

    from napari_sam3.core.postprocess import clean_mask
    from napari_sam3.widget import jobs

    prompts, kwargs = CASES[case]
    ref_logits, _ = recipe(reference, asym_image, **kwargs)
    seg = _untiled(tiny_tracker_dir)
    areas = (40, 15)
    expected = np.where(clean_mask(ref_logits[0] > 0, *areas), 7, 0)
    assert not np.array_equal(expected > 0, ref_logits[0] > 0), "the clean-up changes nothing"
    seg.encode(asym_image)
    labels = seg.segment(asym_image, prompts, ids=[7], max_hole_area=areas[0],
                         max_sprinkle_area=areas[1])
    np.testing.assert_array_equal(labels, expected)
    req = jobs.ClickRequest(image=asym_image, lead=(), spatial_shape=asym_image.shape[:2],
                            limits=None, prompt=prompts[0], obj_id=7, max_hole_area=areas[0],
                            max_sprinkle_area=areas[1], image_layer=None, ignored=0)
    steps = jobs.segment_job(seg, threading.Lock(), req)
    names = []
    try:
        while True:
            names.append(next(steps))
    except StopIteration as stop:
        obj, clicked = stop.value
    assert "encoding" not in names and seg.encoder_calls == 1
    assert obj.region == (slice(0, 72), slice(0, 120)) and obj.tile is None
    np.testing.assert_allclose(obj.logits, ref_logits[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(clicked, expected)
    # the raw mask is shown first (the clean-up follows in the same job)
    raw = [s for s in names if isinstance(s, jobs.RawPreview)]
    assert len(raw) == 1 and raw[0].obj is obj and raw[0].labels.dtype == np.int32
    np.testing.assert_array_equal(raw[0].labels, np.where(obj.logits > 0, 7, 0))
    # no clean-up set: no raw step, the labels are the raw mask
    req.max_hole_area = req.max_sprinkle_area = 0
    steps = list(_steps_and_result(jobs.segment_job(seg, threading.Lock(), req)))
    assert not any(isinstance(s, jobs.RawPreview) for s in steps[:-1])
    np.testing.assert_array_equal(steps[-1][1], np.where(obj.logits > 0, 7, 0))


def _steps_and_result(gen):
    """A job's yields, then its return value."""
    try:
        while True:
            yield next(gen)
    except StopIteration as stop:
        yield stop.value


def test_crops_found_on_a_device_equal_those_found_on_the_host():
    """CUDA/MPS keep the upsampled logits on the device and copy only each object's crop:
    the same regions and values as the host path (run here on CPU tensors)."""
    from napari_sam3.core.decode import device_crops, host_crops

    rng = np.random.default_rng(2)
    up = torch.from_numpy(rng.normal(-1.5, 1.0, (3, 40, 50)).astype(np.float32))
    up[1] = -1.0  # an empty mask
    for crop in (True, False):
        for valid in ((40, 50), (31, 44)):
            host, device = host_crops(up, valid, crop), device_crops(up, valid, crop)
            assert len(host) == len(device) == 3
            for (r_h, lg_h), (r_d, lg_d) in zip(host, device, strict=True):
                assert r_h == r_d and lg_d.dtype == np.float32
                np.testing.assert_array_equal(lg_d, lg_h)
    assert host_crops(up, (40, 50), True)[1][0] == (slice(0, 0), slice(0, 0))


def test_a_warm_untiled_click_looks_its_key_up_once(tiny_tracker_dir, asym_image,
                                                    monkeypatch):
    import threading

    from napari_sam3.widget import jobs

    seg = _untiled(tiny_tracker_dir)
    seg.encode(asym_image)
    lookups = []
    real = seg.tile_keys.get
    monkeypatch.setattr(seg.tile_keys, "get", lambda *a, **k: lookups.append(1) or real(*a, **k))
    req = jobs.ClickRequest(image=asym_image, lead=(), spatial_shape=asym_image.shape[:2],
                            limits=None, prompt=ObjectPrompt(points=[(20, 95)]), obj_id=1,
                            max_hole_area=0, max_sprinkle_area=0, image_layer=None, ignored=0)
    steps = jobs.segment_job(seg, threading.Lock(), req)
    with pytest.raises(StopIteration):
        while True:
            next(steps)
    assert len(lookups) == 1 and seg.encoder_calls == 1
