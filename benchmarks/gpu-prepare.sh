#!/usr/bin/env bash
# Here, before a GPU slot: puts into ignored folders of this checkout what the offline GPU machine lacks
# (../shared/gpu/README.md), so that one device call runs the suite:
#   .whl/                      wheels of jsonargparse and its helpers, and mlxtend, for the machine's Python 3.12
#   data/cifar10-jpeg.tar.gz   the CIFAR-10 JPEG copy (benchmarks/gpu.sh unpacks it there)
# Then one device call (the tool library's `device` run; $OUT is the folder that comes back):
#   command: bash benchmarks/gpu.sh "$OUT"     carry: [".whl", "data/cifar10-jpeg.tar.gz"]     timeout_s: 420
#
#   bash benchmarks/gpu-prepare.sh [SHARED_DIR]      # SHARED_DIR default: ../shared
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
for needed in "$shared/gpu/fetch-wheels.sh" "$shared/data/cifar10-jpeg.tar.gz"; do
  if [ ! -e "$needed" ]; then echo "gpu-prepare: $needed is missing; pass the shared folder as the first argument" >&2; exit 2; fi
done
bash "$shared/gpu/fetch-wheels.sh" .whl
mkdir -p data
cp "$shared/data/cifar10-jpeg.tar.gz" data/
du -sh .whl data/cifar10-jpeg.tar.gz
