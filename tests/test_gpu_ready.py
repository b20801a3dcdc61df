"""The GPU path, checked on a CPU: half precision, devices at our boundaries, batches of
tiles, and the GPU benchmark's dry run (so it cannot rot).

* bfloat16 and float16: every tiny-model path runs with the model loaded in that dtype,
  every floating tensor our code hands the model has the model's dtype
  (``device_guard``), and clicks equal transformers' own recipe in that dtype.
* devices: the model on PyTorch's ``meta`` device stands in for a GPU; a tensor our code
  left on the host would reach a module on another device (``device_guard`` raises).
* batches: several tiles per encoder forward give the embeddings of one tile at a time
  within float32 rounding, and the same cache entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam3 import ObjectPrompt, Sam3Segmenter
from napari_sam3.core import batch_encode
from napari_sam3.core.model import BoundaryError, device_guard

REPO = Path(__file__).resolve().parents[1]
HALF = ["bfloat16", "float16"]
BATCH_ATOL = 1e-5  # batched vs one tile at a time: measured 2.4e-7 (tiny model, fp32 CPU)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("gpu_ready_video"), seed=0)


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    from napari_sam3.testing_concept import save_random_concept_model

    return save_random_concept_model(tmp_path_factory.mktemp("gpu_ready_concept"), seed=0)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:96, 0:128]
    base = 120 + 80 * np.sin(rows / 9.0) * np.cos(cols / 13.0)
    img = np.stack([base, np.roll(base, 7, axis=1), base[::-1]], axis=-1)
    return np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)


def disc_mask(shape, center, radius):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2


def recipe_logits(seg, rgb, **prompts) -> np.ndarray:
    """transformers' click recipe in the model's dtype: processor, encoder (with the
    no-memory term where SAM3 adds it), decoder, post_process_masks."""
    from napari_sam3.core.segmenter import add_no_memory_embedding

    model, proc = seg.model, seg.processor
    inputs = proc(images=rgb, return_tensors="pt", **prompts)
    multimask = "input_boxes" not in prompts and len(prompts["input_points"][0][0]) == 1
    with torch.inference_mode():
        emb = add_no_memory_embedding(model, inputs["pixel_values"].to(model.dtype))
        kw = {k: inputs[k].to(model.dtype) if inputs[k].is_floating_point() else inputs[k]
              for k in ("input_points", "input_labels", "input_boxes") if k in inputs}
        out = model(image_embeddings=emb, multimask_output=multimask, **kw)
        best = out.iou_scores[0, 0].argmax()
        low = out.pred_masks[0, 0, best][None, None].float()
        return proc.post_process_masks([low], inputs["original_sizes"], binarize=False
                                       )[0][0, 0].numpy()


# -- half precision ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=HALF)
def half(request, video_dir):
    seg = Sam3Segmenter.from_pretrained(str(video_dir), device="cpu", dtype=request.param,
                                        tile_size=1024)
    assert seg.dtype == getattr(torch, request.param)
    return seg


def test_clicks_in_half_precision_equal_the_recipe(half, image):
    cases = [
        (ObjectPrompt(points=[(40, 50)]), {"input_points": [[[[50, 40]]]],
                                           "input_labels": [[[1]]]}),
        (ObjectPrompt(points=[(40, 50), (70, 90)], point_labels=[1, 0]),
         {"input_points": [[[[50, 40], [90, 70]]]], "input_labels": [[[1, 0]]]}),
        (ObjectPrompt(box=(20, 30, 70, 100)), {"input_boxes": [[[30, 20, 100, 70]]]}),
    ]
    with device_guard(half.model):
        for prompt, recipe in cases:
            [ours] = half.predict(half.encode(image), [prompt])
            assert ours.logits.dtype == np.float32
            np.testing.assert_array_equal(ours.logits, recipe_logits(half, image, **recipe))


def test_every_path_runs_in_half_precision(half, image):
    shape = image.shape[:2]
    with device_guard(half.model):
        labels = half.segment(image, [ObjectPrompt(points=[(40, 50)]),
                                      ObjectPrompt(box=(10, 60, 80, 120))])
        refined = half.segment(image, [ObjectPrompt(mask=disc_mask(shape, (48, 64), 20))])
        everything = half.segment_everything(image, points_per_side=4)
    for out in (labels, refined, everything):
        assert out.shape == shape and out.dtype == np.int32
    [pred] = half.predict(half.encode(image), [ObjectPrompt(mask=disc_mask(shape, (48, 64), 20))])
    assert np.isfinite(pred.logits).all() and np.isfinite(pred.iou_score)
    stack = np.stack([np.roll(image, 4 * z, axis=1) for z in range(4)])
    engine = half.video_tracker()
    assert engine.model.dtype == half.dtype
    # the video model's own prompt encoder takes float32 points from its session (as in
    # transformers' recipe): only its top-level inputs are ours
    with device_guard(engine.model, dtype_depth=0):
        tracked = half.propagate(stack, {1: [ObjectPrompt(points=[(40, 50)])]})
    assert tracked.shape == (4,) + shape


@pytest.mark.parametrize("dtype", HALF)
def test_concept_paths_in_half_precision(concept_dir, image, dtype):
    from napari_sam3.core.concept import ConceptSegmenter

    cs = ConceptSegmenter.from_pretrained(str(concept_dir), device="cpu", dtype=dtype,
                                          tile_size=1024)
    ref = ConceptSegmenter.from_pretrained(str(concept_dir), device="cpu", tile_size=1024)
    with device_guard(cs.model):
        found = cs.detect(image, "nucleus", min_score=0.0)
        cs.detect(image, exemplars=[(20, 30, 60, 80)], min_score=0.0)
    assert cs.model.dtype == getattr(torch, dtype)
    expected = ref.detect(image, "nucleus", min_score=0.0)
    ours = sorted(x.score for x in found.candidates)
    theirs = sorted(x.score for x in expected.candidates)
    assert len(ours) == len(theirs)  # every query kept at a floor of 0
    np.testing.assert_allclose(ours, theirs, atol=0.05)  # half-precision rounding only


@pytest.mark.parametrize("dtype", HALF)
def test_precompute_then_warm_click_in_half_precision(video_dir, tmp_path, dtype):
    rng = np.random.default_rng(5)
    big = (rng.random((200, 180)) * 4000).astype(np.uint16)
    opts = dict(device="cpu", dtype=dtype, tile_size=112, overlap=28, cache=tmp_path / "c")
    cold = Sam3Segmenter.from_pretrained(str(video_dir), **opts)
    with device_guard(cold.model):
        steps = list(cold.precompute(big, limits=(0, 4000)))
    n = len(cold.tiles(big))
    assert [s[:2] for s in steps] == [(i, n) for i in range(1, n + 1)]
    assert cold.encoder_calls == n
    prompts = [ObjectPrompt(points=[(60, 50)]), ObjectPrompt(box=(120, 100, 190, 170))]
    expected = cold.segment(big, prompts, limits=(0, 4000))
    warm = Sam3Segmenter.from_pretrained(str(video_dir), **opts)
    with device_guard(warm.model):
        got = warm.segment(big, prompts, limits=(0, 4000))
    assert warm.encoder_calls == 0
    np.testing.assert_array_equal(got, expected)
    [key, *_] = warm.store.disk_entries()
    assert stored_meta(warm.store, key)["compute_dtype"] == f"torch.{dtype}"


def stored_meta(store, key) -> dict:
    import zarr

    return dict(zarr.open_group(store.path / "tiles" / key, mode="r").attrs["meta"])


# -- devices: the meta device stands in for a GPU --------------------------------------------------
@pytest.fixture
def on_meta(monkeypatch, video_dir):
    """A segmenter whose models live on ``meta``; copies to the host give zeros."""
    import torch.fx.experimental._config as fx_config

    host = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        return torch.zeros(self.shape, dtype=self.dtype) if self.is_meta else host(self, *args,
                                                                                    **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)
    seg = Sam3Segmenter.from_pretrained(str(video_dir), device="cpu", dtype="bfloat16",
                                        tile_size=1024)
    seg.model.to("meta")
    seg.device = "meta"
    return seg


def test_every_tensor_we_hand_the_model_is_on_its_device(on_meta, image):
    seg, shape = on_meta, image.shape[:2]
    with device_guard(seg.model):
        seg.segment(image, [ObjectPrompt(points=[(40, 50), (60, 70)], point_labels=[1, 0])])
        seg.segment(image, [ObjectPrompt(box=(10, 10, 60, 80))])
        seg.segment(image, [ObjectPrompt(mask=disc_mask(shape, (48, 64), 20))])
        seg.segment_everything(image, points_per_side=4)
    assert seg.encoder_calls == 1
    engine = seg.video_tracker()
    engine.model.to("meta")
    stack = np.stack([image] * 3)
    with device_guard(engine.model, dtype_depth=0):
        seg.propagate(stack, {1: [ObjectPrompt(points=[(40, 50)])]})
    # the guard itself: a host tensor reaching the model is named
    with device_guard(seg.model), pytest.raises(BoundaryError, match="is on cpu"):
        seg.model.get_image_embeddings(torch.zeros(1, 3, 112, 112, dtype=torch.bfloat16))
    with device_guard(seg.model), pytest.raises(BoundaryError, match="torch.float32"):
        seg.model.get_image_embeddings(torch.zeros(1, 3, 112, 112, device="meta"))


# -- batches of tiles ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiled(tiny_tracker_dir):
    def make(**kw):
        return Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                             overlap=28, **kw)
    return make


def test_batched_encoder_equals_one_tile_at_a_time(tiled):
    seg = tiled()
    rng = np.random.default_rng(0)
    rgbs = [(rng.random((112, 112, 3)) * 255).astype(np.uint8) for _ in range(5)]
    rgbs[4] = rgbs[4][:90, :70]  # a smaller (edge) image: resized by the processor alike
    one = [seg.encode_rgb(r) for r in rgbs]
    many = batch_encode.encode_batch(seg, rgbs, keys=list("abcde"))
    assert seg.encoder_calls == 10
    for a, b, key in zip(one, many, "abcde", strict=True):
        assert b.key == key and b.image_shape == a.image_shape
        for x, y in zip(a.raw + a.features, b.raw + b.features, strict=True):
            assert y.shape == x.shape and y.untyped_storage().nbytes() == y.nbytes
            torch.testing.assert_close(y, x, rtol=0, atol=BATCH_ATOL)


def test_batched_precompute_fills_the_same_cache(tiled, tmp_path):
    rng = np.random.default_rng(1)
    img = (rng.random((300, 260)) * 255).astype(np.uint8)
    serial, batched = tiled(cache=tmp_path / "one"), tiled(cache=tmp_path / "many")
    a = list(serial.precompute(img))
    b = list(batched.precompute(img, batch_size=4))
    assert a == b and len(a) == len(serial.tiles(img)) == 12
    assert batched.encoder_calls == serial.encoder_calls == 12
    keys = serial.store.disk_entries()
    assert keys == batched.store.disk_entries() and len(keys) == 12  # same tiles, same keys
    for key in keys:
        assert stored_meta(serial.store, key) == stored_meta(batched.store, key)
        for x, y in zip(serial.store.get(key), batched.store.get(key), strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=2e-3)  # float16 storage steps
    again = list(batched.precompute(img, batch_size=3))
    assert batched.encoder_calls == 12 and not any(new for _, _, new in again)
    # a region: only its tiles; a skip rule: reported as skipped
    from napari_sam3.core.distributed import PrecomputeReport

    fresh, report = tiled(), PrecomputeReport()
    part = list(fresh.precompute(img, region=(0, 0, 100, 100), batch_size=2, report=report))
    assert len(part) == len(fresh.tiles(img).tiles_in((0, 0, 100, 100)))
    assert report.encoded == len(part) and not report.skipped


def test_worker_tasks_encode_in_batches(tiled, tmp_path):
    from napari_sam3.core.distributed.sources import spec_of
    from napari_sam3.core.distributed.tasks import precompute_tiles

    rng = np.random.default_rng(2)
    img = (rng.random((300, 260)) * 255).astype(np.uint8)
    client_side = tiled(cache=tmp_path / "shared")
    spec = spec_of(client_side)
    lim = client_side.resolve_limits(img)
    got = precompute_tiles(spec, img, (), list(range(7)), lim, None, 3)
    assert [k for k, _, _ in got] == list(range(7))
    assert {s for _, _, s in got} == {"encoded"}
    again = precompute_tiles(spec, img, (), list(range(9)), lim, None, 4)
    assert [s for _, _, s in again] == ["cached"] * 7 + ["encoded"] * 2
    assert [key for _, key, _ in again[:7]] == [key for _, key, _ in got]
    assert client_side.store.disk_entries() == sorted(key for _, key, _ in again)


def test_batch_size_is_checked():
    assert batch_encode.check_batch_size(None, "cpu") == 1
    assert batch_encode.check_batch_size(None, "cuda:0") == batch_encode.CUDA_BATCH
    assert batch_encode.check_batch_size(8.0) == 8
    for bad in (0, -1, 2.5, True, "4", "x", [2]):
        with pytest.raises(ValueError, match="batch_size"):
            batch_encode.check_batch_size(bad)


# -- the GPU benchmark, dry run --------------------------------------------------------------------
def test_gpu_script_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), "--dry-run",
                          "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["dry_run"] is True and result["device"]["name"]
    enc = result["encoder_ms_per_tile"]
    assert set(enc) == {"float32", "bfloat16", "float16"}
    for per_batch in enc.values():
        assert set(per_batch) == {"1", "4", "8"} and all(v > 0 for v in per_batch.values())
    assert result["click_ms"]["api_point"] > 0 and result["click_ms"]["api_box"] > 0
    assert "widget" in result["click_ms"]
    assert set(result["propagation_ms_per_slice"]) == {"1", "5"}
    assert result["concept_ms_per_tile_warm"] > 0
    pre = result["precompute"]
    assert pre["tiles_per_s"] > 0 and pre["bare_tiles_per_s"] > 0 and pre["ratio"] > 0
    table = (tmp_path / "gpu_bench.md").read_text()
    assert result["device"]["name"] in table
    for row in ("encoder", "click", "propagation", "concept", "precompute"):
        assert row in table
