#!/usr/bin/env bash
# The GPU benchmark of issue 13, in one command: on a machine with CUDA it brings what
# that machine lacks, runs benchmarks/bench_gpu.py (under 5 minutes on one H200) and
# writes gpu_bench.json and gpu_bench.md (a table naming the device) into --out.
#
#   bash benchmarks/gpu_run.sh [--out DIR]        # on the GPU machine, from the repo root
#   bash benchmarks/gpu_run.sh --dry-run [--out DIR]   # anywhere: tiny models on the CPU
#   bash benchmarks/gpu_run.sh --fetch-wheels     # here, beforehand: wheels into .whl/
#
# What the GPU machine lacks is found by importing: this package runs from src/ (no
# install); transformers older than MIN_TRANSFORMERS (and regex), zarr and its codecs come from
# wheels in .whl/ (fetched here with --fetch-wheels, carried with the working tree:
# `carry: [".whl"]`), installed with pip --no-index --no-deps into a temporary folder.
# Nothing is downloaded there. PYTHON picks the interpreter (default: python3; for
# --dry-run the repo's .venv when it exists).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MIN_TRANSFORMERS=5.23  # the release the SAM3 facts in this project were checked against
WHEELS="$ROOT/.whl"
SITE="${TMPDIR:-/tmp}/napari-sam3-gpu-site"

mode=run
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry; args+=("$1") ;;
    --fetch-wheels) mode=fetch ;;
    --out) args+=("$1" "$2"); shift ;;
    --out=*) args+=("$1") ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown option $1 (use --dry-run, --out DIR, --fetch-wheels)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ "$mode" != run ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; fi
fi

# the distributions that may be carried, at the versions this checkout is tested with
pinned() {
  "$PYTHON" - <<'EOF'
from importlib.metadata import version
for name in ("transformers", "regex", "zarr", "numcodecs", "donfig", "google-crc32c"):
    print(f"{name}=={version(name)}")
EOF
}

if [ "$mode" = fetch ]; then
  mkdir -p "$WHEELS"
  for spec in $(pinned); do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$WHEELS" "$spec"
  done
  ls -l "$WHEELS"
  echo "carry .whl with the working tree (run's carry: [\".whl\"]), then: bash benchmarks/gpu_run.sh"
  exit 0
fi

# what is missing or too old: one distribution name per line ("!module": not carried)
missing() {
  "$PYTHON" - "$MIN_TRANSFORMERS" <<'EOF'
import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

CARRIED = [("transformers", "transformers", sys.argv[1]),
           ("regex", "regex", "2025.10.22"),  # what transformers 5.24 asks for
           ("zarr", "zarr", "3.0"), ("numcodecs", "numcodecs", None),
           ("donfig", "donfig", None), ("google_crc32c", "google_crc32c", None)]
for dist, module, least in CARRIED:
    try:
        import_module(module)
        if least is not None and Version(version(dist)) < Version(least):
            print(dist)
    except (ImportError, PackageNotFoundError):
        print(dist)
for module in ("torch", "torchvision", "numpy", "scipy", "skimage", "safetensors",
               "huggingface_hub", "tokenizers"):
    try:
        import_module(module)
    except ImportError:
        print(f"!{module}")
EOF
}

if ! "$PYTHON" -c "import napari_sam3" 2>/dev/null; then
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
lacking="$(missing)"
if [ -n "$lacking" ]; then
  echo "gpu_run.sh: this machine lacks: $(echo $lacking)"
  wheels=()
  for dist in $lacking; do
    case "$dist" in
      !*) echo "gpu_run.sh: ${dist#!} is needed and cannot be carried here; install it" >&2; exit 2 ;;
    esac
    found=("$WHEELS"/"$dist"-*.whl)
    file="${found[0]}"
    if [ ! -f "$file" ]; then
      echo "gpu_run.sh: no wheel for $dist in .whl/: run 'bash benchmarks/gpu_run.sh --fetch-wheels' where pip works and carry .whl" >&2
      exit 2
    fi
    wheels+=("$file")
  done
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  still="$(missing)"
  if [ -n "$still" ]; then
    echo "gpu_run.sh: still lacking after installing the wheels: $(echo $still)" >&2
    exit 2
  fi
fi
if ! problem="$("$PYTHON" -c "from transformers import Sam3Model, Sam3TrackerVideoModel; import zarr, napari_sam3.core.segmenter" 2>&1)"; then
  echo "gpu_run.sh: the SAM3 classes do not import here: $(echo "$problem" | tail -1)" >&2
  exit 2
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "$PYTHON" "$ROOT/benchmarks/bench_gpu.py" ${args[@]+"${args[@]}"}
