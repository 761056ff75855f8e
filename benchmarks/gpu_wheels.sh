#!/usr/bin/env bash
# Wheels for benchmarks/gpu.py on a GPU machine without a package registry whose python3 has torch,
# torchvision, timm, pandas and matplotlib (and with them numpy, pyyaml, pillow, tqdm, safetensors,
# huggingface_hub) but not open_clip_torch, ftfy or jsonschema. Run where PyPI is reachable, from
# the repository root; the wheels land in .whl/ (ignored by git), which gpu.py installs from when
# an import fails (it picks the wheels its own interpreter can use). Versions are those the project
# is tested with; binary wheels are for each CPython in $PYVERS (default 3.12) on manylinux x86_64.
#
#   bash benchmarks/gpu_wheels.sh                          # CPython 3.12 wheels into .whl/
#   PYVERS="3.11 3.12 3.13" bash benchmarks/gpu_wheels.sh  # when the GPU machine's Python is unknown
#   PYVERS=3.11 DEST=/tmp/w bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYVERS="${PYVERS:-3.12}"
DEST="${DEST:-.whl}"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WHEELS=(
  # open_clip and what it needs beyond timm's dependencies
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19
  # config validation
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  attrs==26.1.0 typing_extensions==4.16.0
  # the CUDA tests
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==25.0
  hypothesis==6.170.17 sortedcontainers==2.4.0
)
mkdir -p "$DEST"
for pyver in $PYVERS; do
  for wheel in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEST" "$wheel"
  done
done
# Each wheel's own requirements, to check that nothing else is missing on the GPU machine.
for f in "$DEST"/*.whl; do
  reqs=$(unzip -p "$f" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed 's/^Requires-Dist: //' | paste -sd ';' - || true)
  echo "$(basename "$f"): ${reqs:-no requirements}"
done
du -sh "$DEST"
