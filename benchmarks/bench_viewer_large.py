"""A huge image in a real napari viewer: labels layer, clicks, commit, undo (issue 10).

Runs napari (shown, so under Xvfb: ``QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0
1920x1080x24"``), opens a ``--size`` x ``--size`` uint16 Zarr image lazily (written
block by block to a temporary folder, never whole in memory; ``--pyramid``: as 4
levels, each halving the last, given to napari as a multiscale image), docks the widget
as napari's Plugins menu does and loads the model (default: the tiny random tracker,
112 px input, with ``--tile`` px tiles squashed into it: the plumbing is the real one).

Each phase runs inside napari's event loop and reports, from one run:

* ``ms``: the phase's own duration (from its start until what it waits for: the
  labels layer made, the preview layer's data set, the call returned);
* ``until idle``: until the event loop ticks regularly again (the end of the last gap
  over ``LONG_GAP_MS``): what the user waits for, redraws included;
* ``gap``: the longest interval between two ticks of a 5 ms timer in the GUI thread
  (:class:`EventLoopProbe`): how long napari was frozen at most;
* ``RSS +`` (resident memory at the end of the phase's window minus before it) and
  ``peak +`` (the highest resident memory during it minus before it: ``VmHWM`` reset
  through ``/proc/self/clear_refs``; where that is refused, the process peak so far);
* ``GUI thread CPU ms`` (the GUI thread's own CPU time in the phase) and ``others' CPU``
  (the share of all cores other processes used: on a shared 2-core VM it moves the
  figures a lot).

Phases: opening the image (napari's own cost, for information), making the managed
layers (the image chosen -> ``binder.ensure_layers``), zooming in on the click, a cold
click (its tile not encoded) and warm clicks (a point added in the same tile) until the
preview layer's data is set, a commit, undo and redo. The bare core call on the same
plane and prompt (``segmenter.predict_objects``, cold on a tile not encoded yet, warm on
the clicked one) is timed outside napari; the table gives click - core.

Usage::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1920x1080x24" \\
        .venv/bin/python benchmarks/bench_viewer_large.py --size 20000 --single
    ... --size 20000 --pyramid --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _machine import cpu_snapshot, loadavg, machine_info, other_load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BLOCK = 1024  # chunk side of the image, and of the blocks it is written in
LEVELS = 4  # levels of the --pyramid image
TICK_MS = 5  # the probe's timer interval
LONG_GAP_MS = 50  # a gap longer than this counts as "not idle"
SETTLE_S = 1.0  # the loop runs this long after a phase's end (redraws land in it)
WAIT_S = 900.0  # longest wait for any phase


# -- memory ----------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def hwm_mb() -> float:
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset the peak resident memory (VmHWM) to the current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def thread_cpu_s(tid: int) -> float:
    """CPU seconds (user + system) of thread ``tid`` of this process so far."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


GUI_TID = threading.get_native_id()  # the module is imported on the GUI thread


# -- the freeze probe ------------------------------------------------------------------------
class EventLoopProbe:
    """A 5 ms timer in the GUI thread recording the gaps between its ticks: a gap is a
    time the event loop could not run (napari frozen). ``reset()`` starts a window;
    ``max_gap_ms``, ``gaps`` ((end time, ms) of gaps over ``LONG_GAP_MS``) and
    ``first_tick_after(t)`` describe it."""

    def __init__(self, interval_ms: int = TICK_MS):
        from qtpy.QtCore import Qt, QTimer

        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.reset()

    def start(self) -> None:
        self.reset()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def reset(self) -> None:
        self.last = time.perf_counter()
        self.max_gap_ms = 0.0
        self.gaps: list[tuple[float, float]] = []
        self.ticks: list[float] = []

    def _tick(self) -> None:
        now = time.perf_counter()
        gap = (now - self.last) * 1000
        self.max_gap_ms = max(self.max_gap_ms, gap)
        if gap > LONG_GAP_MS:
            self.gaps.append((now, gap))
        self.ticks.append(now)
        self.last = now

    def first_tick_after(self, t: float) -> float | None:
        return next((x for x in self.ticks if x > t), None)


def run_loop(until, timeout_s: float = WAIT_S, settle_s: float = SETTLE_S) -> float | None:
    """Run Qt's event loop until ``until()`` is true, then ``settle_s`` more; returns the
    time ``until()`` was first seen true (None on timeout)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop, seen = QEventLoop(), []
    start = time.perf_counter()

    def poll():
        now = time.perf_counter()
        if not seen and until():
            seen.append(now)
        if (seen and now - seen[0] >= settle_s) or now - start > timeout_s:
            loop.quit()

    timer = QTimer()
    timer.setInterval(2)
    timer.timeout.connect(poll)
    timer.start()
    loop.exec()
    timer.stop()
    return seen[0] if seen else None


def phase(name: str, probe: EventLoopProbe, action, done=lambda: True, done_time=None,
          settle_s: float = SETTLE_S) -> dict:
    """Run ``action()`` inside the event loop and wait for ``done()``; ``done_time()``
    (optional) gives the exact time of the end (e.g. from a layer's event)."""
    from qtpy.QtCore import QTimer

    result: dict = {}
    before = rss_mb()
    peak_reset = reset_peak()
    probe.reset()
    cpu = cpu_snapshot()
    gui_cpu = thread_cpu_s(GUI_TID)
    t0 = time.perf_counter()

    def call():
        a = time.perf_counter()
        try:
            result["value"] = action()
        except Exception as exc:  # noqa: BLE001 - reported in the table
            result["error"] = repr(exc)
        result["call_s"] = time.perf_counter() - a

    QTimer.singleShot(0, call)
    seen = run_loop(lambda: "call_s" in result and done(), settle_s=settle_s)
    end = (done_time() if done_time is not None else None) or seen
    row = {"phase": name, "error": result.get("error")}
    if end is None:
        row["error"] = row["error"] or "timed out"
        end = time.perf_counter()
    row["ms"] = (end - t0) * 1000
    row["call_ms"] = result.get("call_s", float("nan")) * 1000
    tick = probe.first_tick_after(end)
    row["ms_to_tick"] = ((tick or end) - t0) * 1000
    last_gap = max((g[0] for g in probe.gaps), default=t0)
    row["until_idle_ms"] = (max(end, last_gap) - t0) * 1000
    row["gap_ms"] = probe.max_gap_ms
    row["rss_mb"] = rss_mb() - before
    row["peak_mb"] = hwm_mb() - before
    row["peak_reset"] = peak_reset
    row["rss_after_mb"] = rss_mb()
    row["other_load"] = other_load(cpu)
    row["gui_cpu_ms"] = (thread_cpu_s(GUI_TID) - gui_cpu) * 1000
    row["value"] = result.get("value")
    return row


# -- the image -------------------------------------------------------------------------------
def texture(rows: np.ndarray, cols: np.ndarray, seed: int) -> np.ndarray:
    """Cell-like discs on a smooth background, at level-0 coordinates ``rows``, ``cols``."""
    r, c = rows[:, None].astype(np.float32), cols[None, :].astype(np.float32)
    base = 3000 + 1500 * np.sin(r / 230.0) * np.cos(c / 310.0)
    cell = ((r % 80) - 40) ** 2 + ((c % 80) - 40) ** 2 < 22.0 ** 2
    noise = np.random.default_rng(seed).normal(0, 300, cell.shape).astype(np.float32)
    return np.clip(base + cell * 12000 + noise, 0, 65535).astype(np.uint16)


def write_image(folder: Path, size: int, levels: int) -> list:
    """A size^2 uint16 Zarr image (one array per level; level k samples every 2^k-th
    pixel of level 0), written block by block."""
    import zarr

    out = []
    for k in range(levels):
        f = 2 ** k
        side = -(-size // f)
        arr = zarr.create_array(folder / f"image{k}.zarr", shape=(side, side),
                                chunks=(min(BLOCK, side),) * 2, dtype="uint16",
                                fill_value=0)
        for i in range(0, side, BLOCK):
            for j in range(0, side, BLOCK):
                rows = np.arange(i, min(i + BLOCK, side)) * f
                cols = np.arange(j, min(j + BLOCK, side)) * f
                arr[i:i + len(rows), j:j + len(cols)] = texture(rows, cols, seed=i * side + j)
        out.append(arr)
    return out


# -- the widget ------------------------------------------------------------------------------
def unwrap(obj):
    return getattr(obj, "__wrapped__", obj)


def tile_centre(index: int, tile: int, overlap: int, size: int) -> int:
    """Level-0 coordinate of the centre of tile ``index`` of an axis (the last tile is
    shifted to end at the image's edge by the tiler; stay clear of it)."""
    stride = tile - overlap
    return min(index * stride + tile // 2, size - tile // 2)


def core_times(widget, point, far_point, repeats: int) -> dict:
    """``predict_objects`` on the plane the widget segments, with the widget's prompt for
    the current object (warm: its tile is encoded) and one point in a tile not encoded
    yet (cold); also + ``masks_to_labels`` (the click job's whole work)."""
    from napari_sam3 import ObjectPrompt
    from napari_sam3.core.postprocess import masks_to_labels

    session, binder = widget.session, widget.binder
    seg = session.segmenter
    src = binder.source()
    lead = binder.current_slice(src)
    plane = src.plane_at(lead)
    prompt = binder.object_prompts(session.object_id, src, only=lead)[lead][0]
    post = session.post
    out = {}
    with session.model_lock:
        t = time.perf_counter()
        seg.predict_objects(plane, [ObjectPrompt(points=[far_point])], src.limits)
        out["core_cold_ms"] = (time.perf_counter() - t) * 1000
        warm, job = [], []
        for _ in range(repeats):
            plane = src.plane_at(lead)  # a new plane object, as each click's request has
            t = time.perf_counter()
            obj = seg.predict_objects(plane, [prompt], src.limits)[0]
            warm.append(time.perf_counter() - t)
            masks_to_labels(obj.logits[None], ids=[session.object_id],
                            max_hole_area=post.max_hole_area,
                            max_sprinkle_area=post.max_sprinkle_area)
            job.append(time.perf_counter() - t)
    threaded = []

    def in_thread():
        for _ in range(repeats):
            with session.model_lock:
                t = time.perf_counter()
                seg.predict_objects(plane, [prompt], src.limits)
                threaded.append(time.perf_counter() - t)

    worker = threading.Thread(target=in_thread)
    worker.start()
    run_loop(lambda: not worker.is_alive(), settle_s=0.0)
    worker.join()
    out["core_thread_ms"] = statistics.median(threaded) * 1000
    out["core_warm_ms"] = statistics.median(warm) * 1000
    out["core_job_ms"] = statistics.median(job) * 1000
    out["prompt_points"] = len(prompt.points)
    return out


def undo(widget, labels, redo: bool = False):
    """What Ctrl+Z (Ctrl+Shift+Z) on the labels layer calls: the pyramid's own region
    history, or napari's undo for a single-resolution layer."""
    target = widget.binder.target(labels)
    return target.redo() if redo else target.undo()


def count_id(widget, labels, obj_id: int, region) -> int:
    """Pixels of ``obj_id`` in ``region`` (row slice, col slice) of the labels layer."""
    return int(np.count_nonzero(widget.binder.target(labels).read(region) == obj_id))


def run(args, tmp: Path) -> dict:
    import napari
    from napari.qt import get_qapp

    get_qapp()
    info: dict = {"args": vars(args), "notes": []}
    model = args.model
    if model is None:
        from napari_sam3.testing import save_random_tracker

        model = str(save_random_tracker(tmp / "model"))
    t = time.perf_counter()
    levels = write_image(tmp, args.size, LEVELS if args.pyramid else 1)
    info["write_image_s"] = time.perf_counter() - t
    print(f"image written in {info['write_image_s']:.1f} s: "
          f"{[tuple(lv.shape) for lv in levels]}", flush=True)

    viewer = napari.Viewer(show=True)
    probe = EventLoopProbe()
    probe.start()
    run_loop(lambda: True, settle_s=1.0)

    def napari_layers():  # napari alone, before the plugin: the four kinds of layer we add
        return [viewer.add_labels([np.zeros((1250, 1250), np.int32),
                                   np.zeros((625, 625), np.int32)], multiscale=True),
                viewer.add_labels(np.zeros((1, 1), np.int32)),
                viewer.add_shapes(ndim=2), viewer.add_points(ndim=2)]

    first = phase("4 layers added (napari alone)", probe, napari_layers, settle_s=2.0)
    viewer.layers.clear()
    run_loop(lambda: True, settle_s=1.0)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam3", "SAM3 segmentation")
    run_loop(lambda: True, settle_s=1.0)
    cache = "" if args.cache == "memory" else str(tmp / "cache")
    widget.cache_section.cache_edit.setText(cache)
    widget.model_section.model_edit.setText(model)
    widget.model_section.device_combo.setCurrentText("cpu")
    widget.model_section.load_model()
    run_loop(lambda: widget.model_section.load_worker is None, settle_s=0.2)
    seg = widget.session.segmenter
    if seg is None:
        raise SystemExit(f"model not loaded: {widget.status}")
    # as a user would: the spins show the model's tiling once it is loaded; typing other
    # values applies them from the next job on
    spins = widget.cache_section
    for spin, value in ((spins.tile_spin, args.tile), (spins.overlap_spin, args.overlap)):
        spin.setValue(value + 1)
        spin.setValue(value)
    rows = [first]
    binder = widget.binder

    def open_image():
        data = levels if args.pyramid else levels[0]
        layer = viewer.add_image(data, name="image", multiscale=args.pyramid)
        # choosing the image started the binder's 0 ms timer for ensure_layers: stop it,
        # the next phase runs ensure_layers itself, so it is measured on its own
        binder._ensure_timer.stop()
        return layer

    rows.append(phase("open image (napari)", probe, open_image, settle_s=2.0))
    rows.append(phase("labels layer creation", probe, binder.ensure_layers,
                      lambda: binder.labels_layer is not None and not widget.busy,
                      settle_s=2.0))
    labels = binder.labels_layer
    raw_labels = unwrap(labels)
    info["labels"] = {
        "multiscale": bool(raw_labels.multiscale),
        "levels": ([tuple(lv.shape) for lv in raw_labels.data] if raw_labels.multiscale
                   else [tuple(raw_labels.data.shape)]),
        "type": type(raw_labels.data[0] if raw_labels.multiscale else raw_labels.data).__name__,
    }

    size, tile, overlap = args.size, args.tile, args.overlap
    n_tiles = max(1, -(-(size - tile) // (tile - overlap)) + 1)
    mid = max(0, n_tiles // 2 - 1) if n_tiles > 2 else 0
    r = c = tile_centre(mid, tile, overlap, size)
    far = tile_centre(n_tiles - 1, tile, overlap, size) if n_tiles > 1 else None
    far_point = (float(far), float(far)) if far is not None and abs(far - r) > tile else None
    info["click"] = (r, c)

    def zoom():
        cam = viewer.camera if getattr(viewer, "scene", None) is None else viewer.scene.camera
        cam.center = (float(r), float(c))
        cam.zoom = 1.0

    rows.append(phase("zoom in on the click (napari)", probe, zoom, settle_s=2.0))

    def pan(k):  # napari's own cost of one frame here: the floor of any visible update
        cam = viewer.camera if getattr(viewer, "scene", None) is None else viewer.scene.camera
        cam.center = (float(r), float(c) + (k % 2))

    for k in range(3):
        rows.append(phase(f"redraw {k + 1}: pan 1 px (napari)", probe, lambda k=k: pan(k),
                          settle_s=0.5))

    points = unwrap(binder.points_layer)
    clicks = widget.object_section.clicks
    seen: list[float] = []

    def on_preview(event=None):
        seen.append(time.perf_counter())

    preview = unwrap(binder.preview_layer)
    preview.events.data.connect(on_preview)  # the data replaced (another tile)
    preview.events.paint.connect(on_preview)  # or only its changed pixels written

    edits: list[float] = []
    jobs: list[float] = []
    runner = widget.runner
    binder.prompts_edited.connect(lambda: edits.append(time.perf_counter()))
    steps: list[tuple[float, str]] = []
    last_worker = [None]

    def on_runner_changed():
        worker = runner.current_worker
        now = time.perf_counter()
        if worker is not None and worker is not last_worker[0]:
            jobs.append(now)
        if worker is not None and (not steps or steps[-1][1] != runner.click_step):
            steps.append((now, runner.click_step))
        last_worker[0] = worker

    runner.changed.connect(on_runner_changed)

    def click_phase(name, where):
        n, ne, nj, ns = len(seen), len(edits), len(jobs), len(steps)
        t0 = time.perf_counter()
        row = phase(name, probe, lambda: points.add(np.array([where], float)),
                    lambda: len(seen) > n and clicks.preview is not None and not widget.busy,
                    done_time=lambda: seen[n] if len(seen) > n else None, settle_s=0.5)
        row["ms"] = row["ms_to_tick"]  # the data set and its refresh handled
        row["edits_ms"] = [round((t - t0) * 1000, 1) for t in edits[ne:]]
        row["jobs_ms"] = [round((t - t0) * 1000, 1) for t in jobs[nj:]]
        row["data_ms"] = [round((t - t0) * 1000, 1) for t in seen[n:]]
        row["steps_ms"] = [(round((t - t0) * 1000, 1), step) for t, step in steps[ns:]]
        return row

    rows.append(click_phase("cold click -> preview", (r, c)))
    info["tiling"] = (seg.tile_size, seg.overlap, seg.input_size)
    warm = []
    rng = np.random.default_rng(0)
    profiler = None
    if args.profile_clicks:  # the GUI thread only (cProfile follows the thread enabling it)
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for i in range(args.warm_clicks):
        dr, dc = rng.integers(-60, 61, 2)
        warm.append(click_phase(f"warm click {i + 1} -> preview", (r + dr, c + dc)))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_clicks)
        info["notes"].append(f"GUI-thread profile of the warm clicks: {args.profile_clicks}")
    rows += warm
    preview_obj = clicks.preview
    info["preview_px"] = int(np.count_nonzero(preview_obj.labels)) if preview_obj else 0
    if far_point is None:
        far_point = (float(r), float(c))
        info["notes"].append("one tile only: the cold core call hits the cached tile")
    info.update(core_times(widget, (r, c), far_point, args.core_repeats))

    obj_id = widget.session.object_id
    region = preview_obj.region if preview_obj else (slice(r - 200, r + 200),
                                                     slice(c - 200, c + 200))
    profiler = None
    if args.profile_clicks:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    rows.append(phase("commit", probe, widget.object_section.commit, lambda: not widget.busy))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_clicks + ".commit")
    after_commit = count_id(widget, labels, obj_id, region)
    rows.append(phase("undo (Ctrl+Z)", probe, lambda: undo(widget, labels),
                      lambda: not widget.busy))
    after_undo = count_id(widget, labels, obj_id, region)
    rows.append(phase("redo (Ctrl+Shift+Z)", probe, lambda: undo(widget, labels, True),
                      lambda: not widget.busy))
    after_redo = count_id(widget, labels, obj_id, region)
    info["undo_check"] = {"committed_px": after_commit, "after_undo": after_undo,
                          "after_redo": after_redo,
                          "ok": after_commit > 0 and after_undo == 0
                          and after_redo == after_commit}
    info["process_peak_mb"] = hwm_mb()
    info["target"] = type(binder.target(labels)).__name__
    probe.stop()
    preview.events.data.disconnect(on_preview)
    preview.events.paint.disconnect(on_preview)
    folder = binder.scratch.folder_of(labels)
    viewer.close()
    run_loop(lambda: True, settle_s=0.2)
    if folder is not None:
        from napari_sam3.widget import scratch_labels

        scratch_labels.remove(folder)
    for row in rows:
        row.pop("value", None)
    info["rows"] = rows
    return info


# -- report ----------------------------------------------------------------------------------
def git_state() -> list[str]:
    root = Path(__file__).resolve().parents[1]
    out = []
    for cmd in (["git", "log", "--oneline", "-3"], ["git", "status", "--short"]):
        try:
            out.append(subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                                      timeout=30).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            out.append("n/a")
    return out


def print_report(info: dict) -> None:
    rows = info["rows"]
    head = ["phase", "ms", "until idle ms", "longest gap ms", "RSS + MB", "peak + MB",
            "GUI thread CPU ms", "others' CPU", "error"]
    body = [[r["phase"], f"{r['ms']:.0f}", f"{r['until_idle_ms']:.0f}", f"{r['gap_ms']:.0f}",
             f"{r['rss_mb']:+.0f}", f"{r['peak_mb']:+.0f}" + ("" if r["peak_reset"] else "*"),
             f"{r['gui_cpu_ms']:.0f}", f"{r['other_load']:.0%}", r["error"] or ""] for r in rows]
    warm = [r["ms"] for r in rows if r["phase"].startswith("warm click")]
    cold = next(r["ms"] for r in rows if r["phase"].startswith("cold click"))
    extra = [
        ["core predict_objects, cold (tile not encoded)", f"{info['core_cold_ms']:.0f}"],
        ["core predict_objects, warm (median)", f"{info['core_warm_ms']:.1f}"],
        ["core + masks_to_labels (the click job), warm", f"{info['core_job_ms']:.1f}"],
        ["core warm in a worker thread, napari's loop running",
         f"{info['core_thread_ms']:.1f}"],
        ["cold click - core cold", f"{cold - info['core_cold_ms']:.0f}"],
    ]
    if warm:
        med = statistics.median(warm)
        extra += [["warm click median / max", f"{med:.0f} / {max(warm):.0f}"],
                  ["warm click median - core warm", f"{med - info['core_warm_ms']:.0f}"],
                  ["warm click median / core warm", f"{med / info['core_warm_ms']:.1f}x"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(b, widths, strict=True)) + " |")
    print()
    for name, value in extra:
        print(f"{name}: {value} ms" if not value.endswith("x") else f"{name}: {value}")
    print(f"labels layer: {info['labels']}; writes through {info['target']}")
    print(f"undo check: {info['undo_check']}; preview {info['preview_px']} px")
    print(f"tiling (tile, overlap, model input): {info['tiling']}; click at {info['click']}")
    print(f"process peak RSS {info['process_peak_mb']:.0f} MB; image written in "
          f"{info['write_image_s']:.1f} s; load average at the end {loadavg()}")
    if not all(r["peak_reset"] for r in rows):
        print("* VmHWM could not be reset: peak + is the process peak so far")
    for r in rows:
        if "jobs_ms" in r:
            print(f"{r['phase']}: prompt edits at {r['edits_ms']} ms, jobs started at "
                  f"{r['jobs_ms']} ms, job steps {r['steps_ms']}, preview data set at "
                  f"{r['data_ms']} ms")
    for note in info["notes"]:
        print("note:", note)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="image side in pixels")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--pyramid", action="store_true",
                      help=f"the image as {LEVELS} levels (multiscale)")
    kind.add_argument("--single", action="store_true", help="one level (default)")
    ap.add_argument("--tile", type=int, default=1008)
    ap.add_argument("--overlap", type=int, default=252)
    ap.add_argument("--model", help="checkpoint folder or id (default: tiny random tracker)")
    ap.add_argument("--cache", choices=("disk", "memory"), default="disk",
                    help="embedding cache: a fresh Zarr folder (default) or memory only")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: "
                                                        "torch's own)")
    ap.add_argument("--warm-clicks", type=int, default=5)
    ap.add_argument("--profile-clicks", metavar="PATH",
                    help="write a cProfile of the GUI thread during the warm clicks (and "
                         "PATH.commit: during the commit)")
    ap.add_argument("--core-repeats", type=int, default=5)
    ap.add_argument("--tmp", help="folder for the image, model and cache (default: a new "
                                  "temporary folder, deleted at the end)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        print("no DISPLAY: run under xvfb-run (see the docstring)", file=sys.stderr)
        return 2

    from napari_sam3.core.torch_import import prepare_torch_import

    prepare_torch_import()
    import torch

    torch.set_flush_denormal(True)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: python {' '.join(['benchmarks/bench_viewer_large.py', *sys.argv[1:]])}")
    log, status = git_state()
    print("code:", log.replace("\n", " | "))
    if status:
        print("working tree:", status.replace("\n", "; "))
    print(flush=True)
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, tmp)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"], result["git"] = info, {"log": log, "status": status}
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
