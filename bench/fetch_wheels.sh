#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root, the wheels the accelerator machine lacks
# for the benchmarks (bench/accelerator.sh installs them there from .whl/ when present).
#
#   bash bench/fetch_wheels.sh
#
# That machine (the device tool's `nvidia-h200`) runs Python 3.12 on x86-64 with jax,
# flax, optax, orbax-checkpoint, numpy, pillow, torch and torchvision, but no package
# registry. What the benchmark path imports beyond its package list: grain (the input
# pipeline), ml_collections (configs), and grain's own imports array_record and
# portpicker. tensorflow-datasets is not needed: swav_jax imports it only for the
# 'tfds' data source, which no benchmark uses.
#
# Versions are the ones the project's tests run with; --no-deps because everything
# else they import is already on that machine. .whl/ is ignored by git (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  grain==0.2.18
  ml-collections==1.1.0
  array-record==0.8.6
  portpicker==1.6.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -1
