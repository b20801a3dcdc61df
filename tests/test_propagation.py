"""Propagation through z/t against transformers' own video recipe (tiny random tracker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

from napari_sam3 import ObjectPrompt, PromptError, Sam3Segmenter
from napari_sam3.core.model import ModelLoadError

DEPTH = 14


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video"), seed=0)


@pytest.fixture(scope="module")
def seg(video_dir):
    return Sam3Segmenter.from_pretrained(str(video_dir), device="cpu", tile_size=1024)


@pytest.fixture(scope="module")
def stack():
    """A bright disc that moves right, shrinks and is gone after slice 10 (Z, Y, X, RGB)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:96, 0:128]
    frames = []
    for z in range(DEPTH):
        radius = max(0.0, 22 - 2.2 * z)
        disc = (rows - 48) ** 2 + (cols - 30 - 5 * z) ** 2 <= radius ** 2
        img = 40 + 150 * disc + rng.normal(0, 12, rows.shape)
        frames.append(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=-1))
    return np.stack(frames)


def recipe(video_dir, stack, prompted: dict, directions=("forward", "backward")):
    """transformers' documented video recipe; returns {slice: {id: logits (H, W)}}."""
    model = Sam3TrackerVideoModel.from_pretrained(str(video_dir)).eval()
    proc = Sam3TrackerVideoProcessor.from_pretrained(str(video_dir))
    session = proc.init_video_session(video=list(stack), inference_device="cpu",
                                      dtype=torch.float32, max_vision_features_cache_size=1)
    h, w = stack.shape[1:3]
    results = {}

    def keep(out):
        logits = proc.post_process_masks([out.pred_masks.float()], [[h, w]], binarize=False)[0]
        results[out.frame_idx] = {int(i): logits[j, 0].numpy()
                                  for j, i in enumerate(out.object_ids)}

    with torch.inference_mode():
        for k in sorted(prompted):
            for obj_id, kwargs in prompted[k].items():  # one object per call: transformers
                proc.add_inputs_to_inference_session(session, frame_idx=k, obj_ids=[obj_id],
                                                     **kwargs)  # keeps only the last as new
                keep(model(inference_session=session, frame_idx=k))
        first = min(prompted)
        if "forward" in directions:
            for out in model.propagate_in_video_iterator(session, start_frame_idx=first):
                keep(out)
        if "backward" in directions:
            for out in model.propagate_in_video_iterator(session, start_frame_idx=first,
                                                         reverse=True):
                keep(out)
    return results


def test_propagation_matches_transformers_video_recipe(seg, video_dir, stack):
    prompts = {4: {1: ObjectPrompt(points=[(48, 50)]),
                   7: ObjectPrompt(box=(5, 90, 30, 125))},
               6: {1: ObjectPrompt(points=[(48, 60), (10, 10)], point_labels=[1, 0])}}
    expected = recipe(video_dir, stack, {
        4: {1: dict(input_points=[[[[50, 48]]]], input_labels=[[[1]]]),
            7: dict(input_boxes=[[[90, 5, 125, 30]]])},
        6: {1: dict(input_points=[[[[60, 48], [10, 10]]]], input_labels=[[[1, 0]]])}})
    got = {}
    for r in seg.iter_propagate(stack, prompts, direction="both", stop_after=10 ** 6):
        got[r.index] = dict(zip(r.ids, r.logits, strict=True))
    assert sorted(got) == list(range(DEPTH))
    for k in range(DEPTH):
        assert set(got[k]) == {1, 7}
        for obj_id in (1, 7):
            np.testing.assert_array_equal(got[k][obj_id] > 0, expected[k][obj_id] > 0)
            np.testing.assert_allclose(got[k][obj_id], expected[k][obj_id], rtol=0, atol=1e-4)


def test_deep_stack_keeps_only_what_the_tracker_reads(seg, video_dir):
    """Memory flat in depth: of the slices tracked, the session keeps the mask memories of
    the last ``num_maskmem - 1`` and the object pointers of the last
    ``max_object_pointers_in_encoder - 1`` (and, for "both", those the backward pass will
    read after the first prompted slice); the logits still equal transformers' loop, which
    keeps everything."""
    depth, first = 30, 12
    rows, cols = np.mgrid[0:64, 0:80]
    rng = np.random.default_rng(2)
    deep = np.stack([np.repeat(np.clip(40 + 150 * ((rows - 32) ** 2 + (cols - 20 - z) ** 2 <= 144)
                                       + rng.normal(0, 12, rows.shape), 0, 255)
                               .astype(np.uint8)[..., None], 3, axis=-1) for z in range(depth)])
    engine = seg.video_tracker()
    memories, entries = [], []
    real_forward = engine.model.forward

    def spy(*args, **kwargs):
        for o in kwargs["inference_session"].output_dict_per_obj.values():
            tracked = o["non_cond_frame_outputs"].values()
            memories.append(sum("maskmem_features" in out for out in tracked))
            entries.append(len(tracked))
        return real_forward(*args, **kwargs)

    engine.model.forward = spy
    try:
        got = {r.index: r.logits[0] for r in seg.iter_propagate(
            deep, {first: {1: ObjectPrompt(points=[(32, 32)])}}, direction="both",
            stop_after=10 ** 6)}
    finally:
        del engine.model.forward
    m, p = engine.memory_reach, engine.pointer_reach
    assert (m, p) == (2, 3)  # the tiny tracker's num_maskmem=3, max_object_pointers=4
    # the forward pass keeps m (p) slices behind it, plus the m - 1 (p - 1) after the first
    # prompted slice that the backward pass reads (the prompted slice itself is a
    # conditioning output, never pruned); transformers' own loop keeps all 29
    assert max(memories) == 2 * m - 1 and max(entries) == 2 * p - 1, (memories, entries)
    assert memories[-1] <= m and entries[-1] <= p  # the backward pass let go of them
    expected = recipe(video_dir, deep, {first: {1: dict(input_points=[[[[32, 32]]]],
                                                        input_labels=[[[1]]])}})
    assert sorted(got) == list(range(depth))
    for k in range(depth):
        np.testing.assert_array_equal(got[k] > 0, expected[k][1] > 0)
        np.testing.assert_allclose(got[k], expected[k][1], rtol=0, atol=1e-4)


def _deep_stack(depth=30):
    rows, cols = np.mgrid[0:64, 0:80]
    rng = np.random.default_rng(2)
    return np.stack([np.repeat(np.clip(
        40 + 150 * ((rows - 32) ** 2 + (cols - 20 - z) ** 2 <= 144) + rng.normal(0, 12, rows.shape),
        0, 255).astype(np.uint8)[..., None], 3, axis=-1) for z in range(depth)])


def _pt(r, c):
    return ObjectPrompt(points=[(r, c)])


@pytest.mark.parametrize("prompts, kwargs", [
    ({12: {1: _pt(32, 32)}}, dict(direction="both")),
    ({8: {1: _pt(32, 28), 2: ObjectPrompt(box=(5, 50, 25, 75))}, 14: {1: _pt(32, 34)},
      20: {2: _pt(12, 60), 3: _pt(50, 10)}}, dict(direction="both", start=3, stop=27)),
    ({10: {1: _pt(32, 30)}, 22: {1: _pt(32, 42), 2: _pt(10, 10)}}, dict(direction="backward")),
    ({5: {1: _pt(32, 25)}}, dict(direction="forward", stop=25)),
])
def test_pruning_changes_no_logit(seg, prompts, kwargs):
    """What the pruning drops is never read: the logits equal, bit for bit, those of the
    same loop keeping every slice (transformers' tolerance-level check above cannot see
    a slice's memory dropped too soon on the tiny tracker: it reacts weakly to memory)."""
    deep = _deep_stack()
    engine = seg.video_tracker()

    def run():
        return {r.index: dict(zip(r.ids, r.logits, strict=True)) for r in seg.iter_propagate(
            deep, prompts, stop_after=10 ** 6, **kwargs)}

    pruned = run()
    reach = engine.memory_reach, engine.pointer_reach
    engine.memory_reach = engine.pointer_reach = 10 ** 6  # keep everything
    try:
        kept = run()
    finally:
        engine.memory_reach, engine.pointer_reach = reach
    assert sorted(pruned) == sorted(kept) and len(pruned) > 15
    for k in kept:
        assert sorted(pruned[k]) == sorted(kept[k])
        for obj_id, logits in kept[k].items():
            np.testing.assert_array_equal(pruned[k][obj_id], logits)


def test_objects_prompted_together_on_a_later_slice_keep_their_prompts(seg, video_dir, stack):
    """Two objects prompted on slices 4 and 9: each object's slice-9 prompt conditions it
    (conditioning object 1 there tracks object 2 at slice 9 first, which must not turn
    object 2's prompt into a correction that the pass then overwrites). Objects are tracked
    independently, so object 2 equals transformers' recipe run with object 2 alone."""
    prompts = {4: {1: ObjectPrompt(points=[(48, 50)]), 2: ObjectPrompt(points=[(10, 100)])},
               9: {1: ObjectPrompt(points=[(48, 75)]), 2: ObjectPrompt(box=(60, 90, 90, 125))}}
    got = {r.index: dict(zip(r.ids, r.logits, strict=True))
           for r in seg.iter_propagate(stack, prompts, direction="forward", stop_after=10 ** 6)}
    session = seg.video_tracker().last_session
    for obj_id in (1, 2):
        idx = session.obj_id_to_idx(obj_id)
        assert sorted(session.output_dict_per_obj[idx]["cond_frame_outputs"]) == [4, 9]
    alone = recipe(video_dir, stack, {
        4: {2: dict(input_points=[[[[100, 10]]]], input_labels=[[[1]]])},
        9: {2: dict(input_boxes=[[[90, 60, 125, 90]]])}}, directions=("forward",))
    assert sorted(got) == sorted(alone) == list(range(4, DEPTH))
    for k in alone:
        np.testing.assert_array_equal(got[k][2] > 0, alone[k][2] > 0)
        np.testing.assert_allclose(got[k][2], alone[k][2], rtol=0, atol=1e-4)


def test_stop_rule_ends_propagation(seg, stack):
    """With an unreachable score threshold every object counts as gone at once."""
    results = list(seg.iter_propagate(stack, {3: [ObjectPrompt(points=[(48, 45)])]},
                                      direction="forward", score_threshold=1e9, stop_after=2))
    assert [r.index for r in results] == [3, 4]
    assert results[0].ids == [1] and results[1].ids == []


def test_ids_kept_and_prompts_stay_on_their_slice(seg, stack):
    labels = seg.propagate(stack, {5: {9: ObjectPrompt(points=[(48, 55)])}},
                           direction="forward", stop_after=10 ** 6)
    assert labels.dtype == np.int32 and labels.shape == stack.shape[:3]
    assert set(np.unique(labels)) <= {0, 9}
    assert not labels[:5].any(), "forward from slice 5 writes nothing before it"
    clicked = seg.segment(stack[5], [ObjectPrompt(points=[(48, 55)])], max_hole_area=0,
                          max_sprinkle_area=0)
    assert clicked.shape == stack.shape[1:3]


def test_cancel_keeps_finished_slices_only(seg, stack):
    out = np.zeros(stack.shape[:3], np.int32)
    it = seg.iter_propagate(stack, {2: [ObjectPrompt(points=[(48, 40)])]}, direction="forward",
                            stop_after=10 ** 6)
    from napari_sam3.core.propagation import write_slice

    done = []
    for r in it:
        write_slice(out, r)
        done.append(r.index)
        if len(done) == 3:
            it.close()  # what a cancelled worker does
            break
    full = seg.propagate(stack, {2: [ObjectPrompt(points=[(48, 40)])]}, direction="forward",
                         stop_after=10 ** 6, max_hole_area=0, max_sprinkle_area=0)
    np.testing.assert_array_equal(out[2:5], full[2:5])
    assert not out[5:].any() and not out[:2].any()


def test_correction_repropagates_only_later_slices(seg, stack):
    first = {3: {1: ObjectPrompt(points=[(48, 45)])}}
    labels = seg.propagate(stack, first, direction="both", stop_after=10 ** 6)
    before = labels.copy()
    corrected = {**first, 8: {1: ObjectPrompt(points=[(48, 70), (48, 40)], point_labels=[1, 0])}}
    seg.propagate(stack, corrected, direction="forward", start=8, out=labels,
                  stop_after=10 ** 6)
    np.testing.assert_array_equal(labels[:8], before[:8])
    assert not np.array_equal(labels[8:], before[8:])


def test_embeddings_shared_with_clicks(video_dir, stack):
    seg = Sam3Segmenter.from_pretrained(str(video_dir), device="cpu", tile_size=1024)
    seg.propagate(stack, {0: [ObjectPrompt(points=[(48, 30)])]}, direction="forward",
                  stop_after=10 ** 6)
    assert seg.encoder_calls == DEPTH
    seg.segment(stack[6], [ObjectPrompt(points=[(48, 60)])])
    seg.propagate(stack, {0: [ObjectPrompt(points=[(48, 32)])]}, direction="forward",
                  stop_after=10 ** 6)
    assert seg.encoder_calls == DEPTH


def test_time_series_with_fixed_z(seg, stack):
    tzyx = np.stack([stack, stack[:, ::-1]], axis=1)  # (T, Z=2, Y, X, 3)
    a = seg.propagate(tzyx, {1: [ObjectPrompt(points=[(48, 35)])]}, axis=0, fixed={1: 0},
                      direction="forward", stop_after=10 ** 6)
    b = seg.propagate(stack, {1: [ObjectPrompt(points=[(48, 35)])]}, direction="forward",
                      stop_after=10 ** 6)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="fix the index"):
        seg.propagate(tzyx, {1: [ObjectPrompt(points=[(48, 35)])]}, axis=0)


def test_bad_prompts(seg, stack):
    with pytest.raises(PromptError, match="outside the stack"):
        seg.propagate(stack, {DEPTH: [ObjectPrompt(points=[(1, 1)])]})
    with pytest.raises(PromptError, match="no prompted slice"):
        seg.propagate(stack, {2: [ObjectPrompt(points=[(1, 1)])]}, start=5)


def test_image_only_checkpoint_cannot_propagate(tiny_tracker_dir, stack):
    seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu")
    with pytest.raises(ModelLoadError, match="video"):
        seg.propagate(stack, {2: [ObjectPrompt(points=[(1, 1)])]})
