#!/bin/bash
# Fills .gpu_carry/ with what benchmarks/gpu_run.sh needs on a GPU machine that
# can fetch nothing: the bottle category, a DTD subset and the wheels of the
# pure-Python packages that machine lacks (its image has JAX, Flax, Optax,
# Orbax, scikit-image and PyTorch; not ml_collections, dm-pix, tensorboardX).
#
#   benchmarks/gpu_carry.sh [MVTEC_DIR] [DTD_DIR] [DTD_EVERY]
#
# MVTEC_DIR holds bottle/ (default ../shared/data/mvtec_ad), DTD_DIR the
# textures (default ../shared/data/dtd), of which every DTD_EVERY-th file in
# sorted order is kept (default 2: 600 of 1,200, about 19 MB), so that the
# working tree and .gpu_carry stay within the machine's 64 MiB transfer.
# The wheels' versions are those of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mvtec=${1:-../shared/data/mvtec_ad}
dtd=${2:-../shared/data/dtd}
every=${3:-2}
carry=.gpu_carry
rm -rf $carry
mkdir -p $carry/mvtec_ad $carry/dtd $carry/wheels
cp -r "$mvtec/bottle" $carry/mvtec_ad/
(cd "$dtd" && find . -type f | sort | awk -v n="$every" 'NR % n == 1') | while read -r f; do
  mkdir -p "$carry/dtd/$(dirname "$f")"
  cp "$dtd/$f" "$carry/dtd/$f"
done
for name in ml-collections dm-pix tensorboardx; do
  version=$(grep -i "^$name==" requirements.txt | cut -d= -f3)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d $carry/wheels "$name==$version"
done
du -sh $carry $carry/*
