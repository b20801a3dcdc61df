"""dask.distributed (issue 11): precompute, segment-everything and batches of images on a
LocalCluster of 2 single-threaded worker processes, a worker killed mid-run, the jobqueue
path without a queue system, empty tiles, and the portable cache (model by content, the
compute dtype recorded in entries, limits recorded with a precompute).

One LocalCluster serves the whole module (started once, closed at the end); the tiny
random model and small images keep it fast."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_sam3 import Sam3Segmenter, cli
from napari_sam3.core import io
from napari_sam3.core.distributed import EmptyTiles, PrecomputeReport, open_client
from napari_sam3.core.distributed.run import recorded_limits
from napari_sam3.core.embedding_store import EmbeddingStore
from napari_sam3.core.everything import segment_everything

OPEN = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=0,
            max_area_fraction=None, max_hole_area=0, max_sprinkle_area=0)


def cells(shape=(200, 260), seed=0, blank_cols=None) -> np.ndarray:
    """A uint16 image of bright blobs on noise (3 x 3 tiles of the tiny model's 112 px)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    img = rng.normal(300, 30, shape)
    for r, c in rng.integers(10, min(shape) - 10, size=(12, 2)):
        img += 2000 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 60.0)
    if blank_cols is not None:
        img[:, blank_cols:] = 0
    return np.clip(img, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def client():
    with open_client("local", 2, torch_threads=1) as c:  # as the serial runs: same rounding
        c.wait_for_workers(2)
        c.get_task_stream()  # the scheduler records tasks from the first call on
        yield c


@pytest.fixture
def one_thread():
    """Serial runs with torch on one thread, as each worker: the same floating point."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seg_with(model_dir, cache=None, **kw) -> Sam3Segmenter:
    return Sam3Segmenter.from_pretrained(str(model_dir), device="cpu", cache=cache, **kw)


def workers_of(client, t0: float, prefix: str) -> set[str]:
    return {t["worker"] for t in client.get_task_stream(start=t0)
            if str(t["key"]).startswith(prefix) or prefix in str(t["key"])}


# ------------------------------------------------------------------ precompute / everything
def test_precompute_on_two_workers_equals_serial(client, tiny_tracker_dir, tmp_path, one_thread):
    img = cells()
    serial = seg_with(tiny_tracker_dir, tmp_path / "serial")
    assert list(serial.precompute(img))[-1][:2] == (9, 9)

    dist = seg_with(tiny_tracker_dir, tmp_path / "dist")
    t0 = time.time()
    report = PrecomputeReport()
    steps = list(dist.precompute(img, client=client, report=report))
    assert [s[0] for s in steps] == list(range(1, 10)) and all(s[2] for s in steps)
    assert dist.encoder_calls == 0  # the client encoded nothing: the workers did
    assert (report.encoded, report.cached, report.skipped) == (9, 0, [])
    assert workers_of(client, t0, "napari-sam3-precompute") == set(
        client.scheduler_info()["workers"])  # both workers encoded tiles

    keys = serial.store.disk_entries()
    assert dist.store.disk_entries() == keys and sorted(report.keys.values()) == keys
    for key in keys:
        for a, b in zip(serial.store.get(key), dist.store.get(key), strict=True):
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32),
                                       rtol=1e-3, atol=1e-3)
    # a rerun encodes nothing; the in-process segmenter then finds every tile cached
    again = list(dist.precompute(img, client=client))
    assert not any(s[2] for s in again)
    assert dist.encoded_tiles(img, read=True) == [(t.r0, t.c0, t.r1, t.c1)
                                                   for t in dist.tiles(img)]
    assert dist.encoder_calls == 0


def test_everything_on_workers_gives_identical_labels(client, tiny_tracker_dir, one_thread):
    img = cells(seed=3)
    serial = seg_with(tiny_tracker_dir)
    want = segment_everything(serial, img, **OPEN)
    assert want.max() > 3  # objects from several tiles
    t0 = time.time()
    got = segment_everything(seg_with(tiny_tracker_dir), img, client=client, **OPEN)
    np.testing.assert_array_equal(got, want)
    assert len(workers_of(client, t0, "napari-sam3-everything")) == 2


def test_concept_on_workers_gives_identical_labels(client, tmp_path_factory, one_thread):
    from napari_sam3.core.concept import ConceptSegmenter
    from napari_sam3.testing_concept import save_random_concept_model

    folder = save_random_concept_model(tmp_path_factory.mktemp("tiny_concept"), seed=0)

    def detector():
        return ConceptSegmenter.from_pretrained(str(folder), device="cpu", tile_size=112,
                                                overlap=28)

    img = cells(seed=4)
    want = detector().segment_concept(img, "nucleus", threshold=0.0, min_area=0)
    assert want.max() > 1  # several instances, over several tiles
    t0 = time.time()
    got = detector().segment_concept(img, "nucleus", threshold=0.0, min_area=0, client=client)
    np.testing.assert_array_equal(got, want)
    assert len(workers_of(client, t0, "napari-sam3-concept")) == 2


def test_empty_tiles_are_skipped_and_listed(client, tiny_tracker_dir, tmp_path, one_thread):
    from napari_sam3.core.everything import generate_everything

    img = cells(seed=4, blank_cols=148)  # the right column of tiles (148:260) is blank
    blank = [(r0, 148, r1, 260) for r0, r1 in ((0, 112), (84, 196), (88, 200))]
    seg = seg_with(tiny_tracker_dir, tmp_path / "c")
    report = PrecomputeReport()
    list(seg.precompute(img, limits=(0, 2500), skip=EmptyTiles(max_range=0), report=report))
    assert report.skipped == blank and report.encoded == 6
    assert len(seg.store.disk_entries()) == 6

    rule = EmptyTiles(mask=np.pad(np.ones((10, 13)), ((0, 0), (0, 13))))  # left half only
    serial = generate_everything(seg_with(tiny_tracker_dir), img, skip=rule, **OPEN)
    dist = generate_everything(seg_with(tiny_tracker_dir), img, skip=rule, client=client, **OPEN)
    assert serial.skipped == dist.skipped == blank
    np.testing.assert_array_equal(serial.paint(), dist.paint())
    with pytest.raises(ValueError, match="0 to 255"):
        EmptyTiles(max_range=300)


# ------------------------------------------------------------------ the command line, batches
def test_a_folder_of_three_images_gives_three_outputs_and_a_rerun_skips(
        client, tiny_tracker_dir, tmp_path, capsys):
    folder = tmp_path / "plates"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"field{k}.tif", cells((120, 150), seed=10 + k))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "labels"
    cache = tmp_path / "cache"
    common = ["--model", str(tiny_tracker_dir), "--scheduler", client.scheduler.address]
    assert cli.main(["precompute", str(folder), "--cache", str(cache), *common]) == 0
    text = capsys.readouterr().out
    assert text.count("precomputed 4 tiles of a 120x150 image: 4 encoded") == 3
    assert len(EmbeddingStore(cache).disk_entries()) == 12

    args = ["segment", str(folder), "--everything", "--out", str(out), "--out-format", "zarr",
            "--cache", str(cache), "--points-per-side", "2", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--min-area", "0", *common]
    assert cli.main(args) == 0
    made = sorted(p.name for p in out.iterdir())
    assert made == ["field0.zarr", "field1.zarr", "field2.zarr"]
    assert "3 of 3 images segmented" in capsys.readouterr().out
    serial = seg_with(tiny_tracker_dir)
    want = segment_everything(serial, cells((120, 150), seed=11), points_per_side=2,
                              pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=0)
    np.testing.assert_array_equal(io.read_labels(out / "field1.zarr"), want)

    stamp = (out / "field1.zarr" / "zarr.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert text.count("skipped ") == 3 and "0 of 3 images segmented" in text
    assert (out / "field1.zarr" / "zarr.json").stat().st_mtime_ns == stamp


def test_cli_scheduler_errors_are_one_line(tiny_tracker_dir, tmp_path, capsys, monkeypatch):
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, cells((60, 60)))
    base = ["precompute", str(img), "--cache", str(tmp_path / "c"), "--model",
            str(tiny_tracker_dir)]
    cases = {
        ("--workers", "2"): "--workers needs --scheduler",
        ("--scheduler", "tcp://127.0.0.1:9", "--workers", "2"): "brings its own workers",
    }
    for extra, message in cases.items():
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # extra missing
    assert cli.main([*base, "--scheduler", "slurm", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install napari-sam3[cluster]" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_slurm_cluster_from_a_config_without_submitting():
    import dask
    import dask_jobqueue  # noqa: F401 - its defaults join dask's config on import

    from napari_sam3.core.distributed import jobqueue_cluster

    config = {"jobqueue.slurm.cores": 1, "jobqueue.slurm.processes": 1,
              "jobqueue.slurm.memory": "8GB", "jobqueue.slurm.walltime": "02:00:00",
              "jobqueue.slurm.job-extra-directives": ["--gres=gpu:1"],
              "jobqueue.slurm.scheduler-options": {"host": "127.0.0.1",
                                                    "dashboard_address": "127.0.0.1:0"}}
    with dask.config.set(config):
        cluster = jobqueue_cluster("slurm")
        try:
            script = cluster.job_script()
            assert "#SBATCH -t 02:00:00" in script and "#SBATCH --gres=gpu:1" in script
            assert "--nthreads 1" in script and "tcp://127.0.0.1:" in script  # one GPU, one
            assert "--nworkers" not in script  # worker: one process of one thread per job
            assert len(cluster.workers) == 0  # nothing submitted
        finally:
            cluster.close()


# ------------------------------------------------------------------ the portable cache
def test_cache_survives_moving_the_model_and_another_compute_dtype(tiny_tracker_dir, tmp_path):
    img = cells((100, 100))  # one tile: the whole image
    bf16 = seg_with(tiny_tracker_dir, tmp_path / "c", dtype="bfloat16")
    list(bf16.precompute(img))
    (key,) = bf16.store.disk_entries()
    attrs = json.loads(
        (tmp_path / "c" / "tiles" / key / "zarr.json").read_text())["attributes"]
    assert attrs["meta"]["compute_dtype"] == "torch.bfloat16"

    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_tracker_dir, moved)
    fp32 = seg_with(moved, tmp_path / "c")  # another path, float32
    assert fp32.cached_embedding(img, recorded_limits(fp32.store, img)) is not None
    fp32.segment(img, [dict(points=[(50, 50)])], limits=recorded_limits(fp32.store, img))
    assert fp32.encoder_calls == 0
    exact = seg_with(moved, tmp_path / "c")
    exact.exact_dtype = True  # only entries computed in float32
    assert exact.cached_embedding(img, recorded_limits(exact.store, img)) is None


def test_precompute_records_its_limits_for_the_image_wherever_it_lies(tiny_tracker_dir,
                                                                      tmp_path):
    img = cells((150, 150))
    seg = seg_with(tiny_tracker_dir, tmp_path / "c")
    list(seg.precompute(img))
    limits = seg.resolve_limits(img)
    store = EmbeddingStore(tmp_path / "c")
    assert recorded_limits(store, img.copy()) == pytest.approx(limits)
    assert recorded_limits(store, img + 1) is None  # other pixels: no record
    tifffile.imwrite(tmp_path / "img.tif", img)
    from napari_sam3.core.distributed import FileImage

    assert recorded_limits(store, FileImage(tmp_path / "img.tif")) == pytest.approx(limits)
    store.clear()
    assert not list((tmp_path / "c" / "images").iterdir())


# ------------------------------------------------------------------ faults (last: it kills)
def test_a_worker_killed_during_precompute_the_run_completes(client, tiny_tracker_dir, tmp_path):
    import psutil

    img = cells((600, 600), seed=7)  # 7 x 7 tiles
    seg = seg_with(tiny_tracker_dir, tmp_path / "c")
    pids = client.run(os.getpid)
    steps = []
    for step in seg.precompute(img, client=client):
        if not steps:
            psutil.Process(next(iter(pids.values()))).kill()  # mid-run, tiles in flight
        steps.append(step)
    assert [s[0] for s in steps] == list(range(1, 50)) and steps[-1][1] == 49
    store = EmbeddingStore(tmp_path / "c")
    keys = store.disk_entries()
    assert len(keys) == 49 and all(store.get(k) is not None for k in keys)  # valid, complete
    assert not any(e for _, _, e in seg.precompute(img, client=client))  # nothing missing


def test_a_batch_queues_the_next_image_and_a_bad_one_stops_after_the_one_before(
        client, tiny_tracker_dir, tmp_path, capsys):
    folder = tmp_path / "plates"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", cells((120, 150), seed=1))
    (folder / "b.tif").write_bytes(b"not a tiff at all")
    tifffile.imwrite(folder / "c.tif", cells((120, 150), seed=3))
    cache = tmp_path / "cache"
    code = cli.main(["precompute", str(folder), "--cache", str(cache), "--model",
                     str(tiny_tracker_dir), "--scheduler", client.scheduler.address])
    out, err = capsys.readouterr()
    problem = [line for line in err.splitlines() if "dask scheduler" not in line]
    assert code == 2 and len(problem) == 1 and "b.tif" in problem[0]
    assert out.count("precomputed 4 tiles of a 120x150 image: 4 encoded") == 1  # a, counted
    assert "c.tif" not in out
    assert len(EmbeddingStore(cache).disk_entries()) == 4


def test_local_workers_run_torch_on_their_share_of_the_cores():
    from napari_sam3.core.distributed.sources import worker_threads

    with open_client("local", 1, torch_threads=2) as c:
        c.wait_for_workers(1)
        assert c.submit(worker_threads, pure=False).result() == 2  # inside a task
        info = c.scheduler_info()["workers"]
        assert [w["nthreads"] for w in info.values()] == [1]  # one task at a time


def test_cli_precompute_batch_size_fills_the_same_cache(tiny_tracker_dir, tmp_path, capsys):
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, cells((200, 260), seed=4))
    base = ["precompute", str(img), "--model", str(tiny_tracker_dir)]
    assert cli.main([*base, "--cache", str(tmp_path / "one")]) == 0
    assert cli.main([*base, "--cache", str(tmp_path / "four"), "--batch-size", "4"]) == 0
    assert "9 encoded" in capsys.readouterr().out.split("precomputed")[-1]
    one, four = EmbeddingStore(tmp_path / "one"), EmbeddingStore(tmp_path / "four")
    assert one.disk_entries() == four.disk_entries() and len(one.disk_entries()) == 9
    assert cli.main([*base, "--cache", str(tmp_path / "x"), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and err.count("\n") == 1
