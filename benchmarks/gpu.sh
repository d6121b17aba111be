#!/usr/bin/env bash
# The GPU suite of issue 20 on a GPU machine, from any directory: every method's full training loop on
# device-resident CIFAR-10, eager and compiled, concurrent runs and the plain-torch step bound, in at most
# about 6 minutes on one H200 (python -m distill.tools.gpu_suite --help for the rows).
#
#   bash benchmarks/gpu.sh [OUT_DIR] [suite options...]      # OUT_DIR default: reports/gpu
#
# On the offline GPU machine (../shared/gpu/README.md): the wheels in .whl/ (benchmarks/gpu-prepare.sh) are
# installed into .site/ when it is missing, .site/ is put on PYTHONPATH when it exists, and
# data/cifar10-jpeg.tar.gz is unpacked into data/ when data/cifar10-jpeg/ is missing. PYTHON names the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-reports/gpu}
shift || true
if [ ! -d .site ] && compgen -G ".whl/*.whl" > /dev/null; then  # wheels carried from benchmarks/gpu-prepare.sh
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl
fi
if [ -d .site ]; then export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1
if [ ! -d data/cifar10-jpeg ] && [ -f data/cifar10-jpeg.tar.gz ]; then tar -xzf data/cifar10-jpeg.tar.gz -C data; fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$out"
"${PYTHON:-python3}" -m distill.tools.gpu_suite --json "$out/gpu-suite.json" --markdown "$out/gpu-suite.md" "$@"
