#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch but not this project's other dependencies (and cannot reach PyPI):
# downloads, for CPython 3.12 on x86-64 Linux, the pinned versions (images/requirements.txt) of the packages
# such an image usually lacks or holds at other versions, into .whl/ (git-ignored). scripts/gpu_bench.sh installs
# them from there when the folder is present. Run it on a machine with pip access, then carry .whl along.
#   bash scripts/gpu_wheels.sh         # ~32 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pkgs=(diffusers transformers huggingface-hub tokenizers peft pydantic pydantic-core annotated-types
      typing-inspection imagehash pywavelets)
pins=()
for p in "${pkgs[@]}"; do
  pin=$(grep -i -E "^${p}==" images/requirements.txt) || { echo "no pin for $p in images/requirements.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
