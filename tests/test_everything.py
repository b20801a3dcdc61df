"""Segment everything: parity with transformers' mask-generation pipeline, tiling, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam3 import ObjectPrompt, Sam3Segmenter
from napari_sam3.core.everything import (
    EverythingSettings,
    _grid_points,
    generate_everything,
    is_stack,
    point_grid,
    segment_everything,
    stack_limits,
)
from napari_sam3.core.instances import intersect, mask_iou, merge_tiles, tile_box

# random weights give mask logits of ~1e-5: a tiny offset makes stability scores vary
OPEN = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=0,
            max_area_fraction=None, max_hole_area=0, max_sprinkle_area=0)


def textured(shape, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.sin(rows / 5.0) * np.cos(cols / 7.0) * 100 + 128
    img = np.stack([base, base[::-1], np.roll(base, 11, axis=1)], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def reference_labels(masks, shape):
    """Pipeline masks (by decreasing score) written the documented way: ids 1.., the
    higher score keeps contested pixels."""
    labels = np.zeros(shape, dtype=np.int32)
    next_id = 1
    for m in masks:
        free = m & (labels == 0)
        if free.any():
            labels[free] = next_id
            next_id += 1
    return labels


@pytest.fixture(scope="module")
def generator(tiny_tracker_dir):
    """transformers' mask-generation pipeline on the tiny Sam3Tracker checkpoint, with the
    one-line no-memory correction the segmenter applies (see docs)."""
    from transformers import pipeline

    gen = pipeline("mask-generation", model=str(tiny_tracker_dir), device="cpu")
    model = gen.model
    assert type(model).__name__ == "Sam3TrackerModel"
    plain = type(model).get_image_embeddings

    def corrected(pixel_values, **kwargs):
        emb = list(plain(model, pixel_values, **kwargs))
        emb[-1] = emb[-1] + model.no_memory_embedding.reshape(1, -1, 1, 1)
        return emb

    model.get_image_embeddings = corrected
    return gen


def test_point_grid_is_transformers_grid():
    from transformers.models.sam3.image_processing_sam3 import _build_point_grid

    ours = point_grid(7)
    theirs = _build_point_grid(7).numpy()  # (x, y) = (col, row)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs[:, ::-1])
    pts = _grid_points(4, (60, 120))  # a non-square part: rows span 60, columns 120
    assert pts[:, 0].min() == 7.5 and pts[:, 0].max() == 52.5
    assert pts[:, 1].min() == 15 and pts[:, 1].max() == 105


@pytest.mark.parametrize("settings", [
    dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
    dict(pred_iou_thresh=0.4995, stability_score_thresh=0.3, stability_score_offset=1e-5,
         box_nms_thresh=0.99),
    dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7),
], ids=["no filters", "iou+stability filters", "default nms"])
def test_single_tile_matches_mask_generation_pipeline(generator, tiny_segmenter, settings):
    from PIL import Image

    img = textured((96, 96))
    out = generator(Image.fromarray(img), points_per_crop=8, points_per_batch=16,
                    pred_iou_thresh=settings["pred_iou_thresh"],
                    stability_score_thresh=settings["stability_score_thresh"],
                    stability_score_offset=settings.get("stability_score_offset", 1),
                    crops_nms_thresh=settings["box_nms_thresh"])
    theirs = [(m.numpy(), float(s)) for m, s in zip(out["masks"], out["scores"], strict=True)
              if m.any()]  # the pipeline keeps empty masks; we drop them
    res = generate_everything(tiny_segmenter, img, points_per_side=8, points_per_batch=16,
                              **{**OPEN, **settings})
    assert len(res.instances) == len(theirs) > 0
    for inst, (mask, score) in zip(res.instances, theirs, strict=True):
        assert np.float32(inst.score) == np.float32(score)
        np.testing.assert_array_equal(inst.full(img.shape[:2]), mask)
    labels = res.paint()
    np.testing.assert_array_equal(labels, reference_labels([m for m, _ in theirs], labels.shape))
    table = res.features
    assert set(table) >= {"index", "score", "area", "iou_score", "stability_score"}
    assert list(table["index"]) == sorted(set(np.unique(labels)) - {0})
    assert (np.diff(table["score"]) <= 0).all()  # ids by decreasing score


def test_filters_drop_masks(tiny_segmenter):
    img = textured((96, 96))
    base = generate_everything(tiny_segmenter, img, points_per_side=6, box_nms_thresh=1.0,
                               **OPEN)
    ious = np.array([x.extra["iou_score"] for x in base.instances])
    cut = float(np.median(ious))
    stricter = generate_everything(tiny_segmenter, img, points_per_side=6, box_nms_thresh=1.0,
                                   **{**OPEN, "pred_iou_thresh": cut})
    assert 0 < len(stricter.instances) < len(base.instances)
    assert all(x.score > cut for x in stricter.instances)
    areas = np.array([x.area for x in base.instances])
    small = generate_everything(tiny_segmenter, img, points_per_side=6, box_nms_thresh=1.0,
                                **{**OPEN, "max_area_fraction": float(np.median(areas)) / 96 ** 2})
    assert 0 < len(small.instances) < len(base.instances)
    big = generate_everything(tiny_segmenter, img, points_per_side=6, box_nms_thresh=1.0,
                              **{**OPEN, "min_area": int(np.median(areas))})
    assert all(x.area >= int(np.median(areas)) for x in big.instances)
    with pytest.raises(TypeError):
        generate_everything(tiny_segmenter, img, points_per_sid=4)
    with pytest.raises(ValueError):
        EverythingSettings(points_per_side=0)


def test_points_cover_non_square_images(tiny_segmenter):
    """Points span the whole image in the model frame (the pipeline scales both axes by
    the longest side, which for SAM3's squashed, unpadded input is wrong off-square)."""
    seen = []
    model = tiny_segmenter.model
    hook = model.prompt_encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_points"] if "input_points" in kwargs
                                             else args[0]),
        with_kwargs=True)
    try:
        generate_everything(tiny_segmenter, textured((48, 120)), points_per_side=4,
                            points_per_batch=16, **OPEN)
    finally:
        hook.remove()
    pts = torch.cat([p.reshape(-1, 2) for p in seen if p is not None])
    side = tiny_segmenter.input_size
    for axis in (0, 1):  # x and y both reach 1/8 .. 7/8 of the model input
        assert pts[:, axis].min().item() == pytest.approx(side / 8)
        assert pts[:, axis].max().item() == pytest.approx(side * 7 / 8)


@pytest.fixture(scope="module")
def tiled_segmenter(tiny_tracker_dir):
    return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                         overlap=28)


def test_tiled_run_has_each_instance_once(tiled_segmenter, monkeypatch):
    import napari_sam3.core.everything as everything

    seen = {}

    def spy(found, grid, **kwargs):
        seen["in"] = len(found)
        seen["out"] = merge_tiles(found, grid, **kwargs)
        return seen["out"]

    monkeypatch.setattr(everything, "merge_tiles", spy)
    seg = tiled_segmenter
    img = textured((196, 196), seed=2)
    before = seg.encoder_calls
    res = generate_everything(seg, img, points_per_side=4, points_per_batch=8,
                              **{**OPEN, "pred_iou_thresh": 0.499, "box_nms_thresh": 0.9})
    assert seg.encoder_calls - before == 4  # 2 x 2 tiles, each encoded once
    assert seen["in"] > len(seen["out"]) > 0  # copies on seams were merged
    grid = seg.tiles(img)
    assert {x.tile for x in res.instances} <= {0, 1, 2, 3}
    # the merge invariant: no two instances from different tiles are copies of one object
    # (pieces of objects larger than the overlap are stitched: extra["tiles"])
    plain = [x for x in res.instances if not x.extra.get("stitched")]
    for i, a in enumerate(plain):
        for b in plain[i + 1:]:
            if a.tile == b.tile:
                continue
            shared = intersect(tile_box(grid.tiles[a.tile]), tile_box(grid.tiles[b.tile]))
            assert shared is None or mask_iou(a, b, shared) <= 0.5
    labels = res.paint()
    table = res.features
    ids = sorted(set(np.unique(labels)) - {0})
    assert ids == list(table["index"]) == list(range(1, len(ids) + 1))
    np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], table["area"])
    # a second run reuses every tile embedding and gives the same labels
    again = segment_everything(seg, img, points_per_side=4, points_per_batch=8,
                               **{**OPEN, "pred_iou_thresh": 0.499, "box_nms_thresh": 0.9})
    assert seg.encoder_calls - before == 4
    np.testing.assert_array_equal(again, labels)


def test_reuses_the_zarr_cache_of_point_prompts(tiny_tracker_dir, tmp_path):
    img = textured((196, 196), seed=4)
    first = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                          overlap=28, cache=tmp_path / "emb.zarr",
                                          cache_dtype="float32")
    list(first.precompute(img))  # e.g. the user's clicks or a "precompute" button
    assert first.encoder_calls == 4
    a = segment_everything(first, img, points_per_side=3, **OPEN)
    assert first.encoder_calls == 4
    second = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                           overlap=28, cache=tmp_path / "emb.zarr",
                                           cache_dtype="float32")
    b = segment_everything(second, img, points_per_side=3, **OPEN)
    assert second.encoder_calls == 0  # every tile came from disk
    np.testing.assert_array_equal(a, b)


def test_existing_labels_are_kept_unless_overwrite(tiny_segmenter):
    img = textured((96, 96), seed=5)
    existing = np.zeros((96, 96), dtype=np.int32)
    existing[40:60, 40:60] = 5
    settings = dict(points_per_side=4, **OPEN)
    fresh = segment_everything(tiny_segmenter, img, **settings)
    assert fresh.dtype == np.int32 and fresh.max() > 0
    out = segment_everything(tiny_segmenter, img, out=existing.copy(), **settings)
    assert (out[40:60, 40:60] == 5).all()
    assert set(np.unique(out)) - {0, 5} and min(set(np.unique(out)) - {0, 5}) == 6
    over = segment_everything(tiny_segmenter, img, out=existing.copy(), overwrite=True,
                              **settings)
    assert not (over[40:60, 40:60] == 5).all()


def test_everything_on_a_stack(tiny_segmenter):
    stack = np.stack([textured((64, 64), seed=s)[..., 0].astype(np.uint16) * 10
                      for s in (6, 7)])
    assert is_stack(stack) and not is_stack(stack[0]) and not is_stack(textured((8, 8)))
    assert is_stack(stack, rgb=False) and not is_stack(stack[..., :3], rgb=True)
    lim = stack_limits(stack)
    labels = segment_everything(tiny_segmenter, stack, points_per_side=3, **OPEN)
    assert labels.shape == stack.shape and labels.dtype == np.int32
    ids0 = set(np.unique(labels[0])) - {0}
    ids1 = set(np.unique(labels[1])) - {0}
    assert ids0 and ids1 and not ids0 & ids1  # ids are unique across slices
    single = segment_everything(tiny_segmenter, stack[1], limits=lim, points_per_side=3, **OPEN)
    np.testing.assert_array_equal(labels[1] > 0, single > 0)


def test_progress_and_clicks_share_embeddings(tiny_segmenter):
    img = textured((80, 80), seed=8)
    tiny_segmenter.segment(img, [ObjectPrompt(points=[(40, 40)])])
    before = tiny_segmenter.encoder_calls
    calls = []
    segment_everything(tiny_segmenter, img, points_per_side=4, points_per_batch=5,
                       progress=lambda d, t: calls.append((d, t)), **OPEN)
    assert tiny_segmenter.encoder_calls == before
    assert calls == [(i, 4) for i in range(1, 5)]


def test_thin_method_if_present(tiny_segmenter):
    if not hasattr(Sam3Segmenter, "segment_everything"):
        pytest.skip("Sam3Segmenter.segment_everything not added yet")
    img = textured((64, 64), seed=9)
    np.testing.assert_array_equal(
        tiny_segmenter.segment_everything(img, points_per_side=3, **OPEN),
        segment_everything(tiny_segmenter, img, points_per_side=3, **OPEN))


def test_stack_limits():
    rgb = np.zeros((3, 10, 10, 3), dtype=np.uint8)
    assert stack_limits(rgb) is None  # 8-bit RGB goes to the model unchanged
    grey = np.stack([np.full((10, 10), v, dtype=np.uint16) for v in (100, 200, 300)])
    grey[:, :2] = 0
    lo, hi = stack_limits(grey)
    assert lo == pytest.approx(0, abs=2) and hi == pytest.approx(300, abs=1)
    assert stack_limits(grey, limits=(1, 2)) == (1, 2)
    two = np.stack([np.dstack([g, g * 2]) for g in grey])  # (Z, H, W, 2)
    per_channel = stack_limits(two)
    assert len(per_channel) == 2 and per_channel[1][1] == pytest.approx(600, abs=2)
