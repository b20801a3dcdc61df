"""napari start-up cost of the plugin: importing what the manifest points to.

In fresh subprocesses, napari itself is imported first (``napari``, ``napari.layers``,
``napari.viewer``, ``napari.qt``, ``npe2``: what the napari GUI has loaded before it
touches a plugin), then every module named by ``napari.yaml`` (``napari_sam3`` and the
``python_name`` modules: ``_widget``, ``_writers``, ``_sample_data``) is imported and
timed with ``time.perf_counter`` in the child. The median over fresh processes is reported, plus a
``python -X importtime`` breakdown of the heaviest imports our modules add on top of napari.

At start-up napari only *discovers* the plugin (npe2 reads the manifest without
importing the package; checked below); each module is imported when its contribution
is first used (widget opened, file saved, sample opened).

The plugin must stay light: torch and transformers are imported only when a model is
loaded. This script exits with status 1 if importing the manifest's modules imported
torch or transformers, and 2 if a module cannot be imported.

Usage::

    python benchmarks/bench_import.py [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "torchvision", "safetensors")
NAPARI_BASELINE = ("napari", "napari.layers", "napari.viewer", "napari.qt", "npe2")
MARKER = "### napari-sam3 imports start"

CHILD = r"""
import importlib, json, sys, time
baseline, ours, marker = json.loads(sys.argv[1])
t0 = time.perf_counter()
baseline_missing = []
for m in baseline:
    try:
        importlib.import_module(m)
    except ImportError:  # e.g. napari.qt without a Qt binding installed
        baseline_missing.append(m)
t_napari = time.perf_counter() - t0
before = set(sys.modules)
print(marker, file=sys.stderr, flush=True)
times, status = {}, {}
t0 = time.perf_counter()
for m in ours:
    t = time.perf_counter()
    try:
        importlib.import_module(m)
        status[m] = "ok"
    except ModuleNotFoundError as e:
        status[m] = "missing" if e.name == m else f"error: {e!r}"
    except Exception as e:
        status[m] = f"error: {e!r}"
    times[m] = time.perf_counter() - t
total = time.perf_counter() - t0
top_before = {n.split(".")[0] for n in before}
added = sorted({n.split(".")[0] for n in sys.modules} - top_before)
print(json.dumps({
    "napari_s": t_napari, "ours_s": total, "per_module_s": times, "status": status,
    "added_top_level": added, "baseline_missing": baseline_missing,
    "heavy_loaded": sorted(n for n in sys.modules if n.split(".")[0] in HEAVY_NAMES),
}))
"""


DISCOVER = r"""
import json, sys, time
import napari, npe2
pm = npe2.PluginManager.instance()
t0 = time.perf_counter()
pm.discover()
print(json.dumps({
    "discover_s": time.perf_counter() - t0,
    "found": "napari-sam3" in pm._manifests,
    "imported": sorted(m for m in sys.modules if m.startswith("napari_sam3")),
}))
"""


def manifest_modules() -> list[str]:
    """``napari_sam3`` plus the modules of every ``python_name`` in the manifest, in order."""
    import napari_sam3

    text = (Path(napari_sam3.__file__).parent / "napari.yaml").read_text()
    mods = ["napari_sam3"]
    for name in re.findall(r"python_name:\s*([\w.]+):", text):
        if name not in mods:
            mods.append(name)
    return mods


def run_child(ours: list[str], importtime: bool = False) -> tuple[dict, str]:
    code = CHILD.replace("HEAVY_NAMES", repr(HEAVY))
    cmd = [
        sys.executable,
        *(["-X", "importtime"] if importtime else []),
        "-c",
        code,
        json.dumps([list(NAPARI_BASELINE), ours, MARKER]),
    ]
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"child process failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def importtime_top(stderr: str, n: int = 12) -> list[tuple[str, float]]:
    """The ``n`` heaviest top-level imports after the marker (cumulative ms)."""
    after = stderr.split(MARKER, 1)[-1]
    top = []
    for line in after.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( +)(\S+)", line)
        if m and len(m.group(3)) == 1:  # one space: imported directly by our child code
            top.append((m.group(4), int(m.group(2)) / 1e3))
    return sorted(top, key=lambda t: -t[1])[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes to time")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    ours = manifest_modules()
    print(f"python {sys.version.split()[0]}; napari baseline: {', '.join(NAPARI_BASELINE)}")
    print(f"manifest modules: {', '.join(ours)}\n")

    run_child(ours)  # warm the file-system cache and .pyc files
    runs = [run_child(ours)[0] for _ in range(args.repeats)]
    first = runs[0]
    if first["baseline_missing"]:
        print(f"note: not importable here: {', '.join(first['baseline_missing'])}\n")

    napari_ms = statistics.median(r["napari_s"] for r in runs) * 1e3
    ours_ms = statistics.median(r["ours_s"] for r in runs) * 1e3
    print(f"| module | status | import ms (median of {args.repeats} fresh processes) |")
    print("|---|---|---|")
    print(f"| napari baseline ({' + '.join(NAPARI_BASELINE)}) | ok | {napari_ms:.0f} |")
    for m in ours:
        ms = statistics.median(r["per_module_s"][m] for r in runs) * 1e3
        print(f"| {m} | {first['status'][m]} | {ms:.1f} |")
    print(f"| **all of ours, on top of napari** | | **{ours_ms:.0f}** |")

    _, stderr = run_child(ours, importtime=True)
    top = importtime_top(stderr)
    print("\nHeaviest imports ours add on top of napari (python -X importtime, cumulative ms):")
    for name, ms in top:
        print(f"  {ms:8.1f}  {name}")
    print(f"\nnew top-level packages: {', '.join(first['added_top_level'])}")

    proc = subprocess.run(
        [sys.executable, "-c", DISCOVER], capture_output=True, text=True, check=True
    )
    disc = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"\nnpe2 plugin discovery (what napari does at start-up): napari-sam3 found: "
        f"{disc['found']}; our modules imported by discovery: "
        f"{', '.join(disc['imported']) or 'none'}; discover() {disc['discover_s'] * 1e3:.0f} ms "
        "for all plugins"
    )

    heavy = first["heavy_loaded"]
    heavy_top = sorted({n.split(".")[0] for n in heavy})
    problems = {m: s for m, s in first["status"].items() if s != "ok"}
    if heavy_top:
        print(f"\nFAIL: importing the manifest's modules imported {', '.join(heavy_top)}")
    else:
        print(f"\nOK: torch and transformers NOT imported ({', '.join(HEAVY)} all absent)")
    for m, s in problems.items():
        print(f"{'MISSING' if s == 'missing' else 'ERROR'}: {m}: {s}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "napari_ms": napari_ms,
                    "ours_ms": ours_ms,
                    "modules": ours,
                    "runs": runs,
                    "discovery": disc,
                    "importtime_top": top,
                    "heavy_loaded": heavy,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    if heavy_top:
        return 1
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
