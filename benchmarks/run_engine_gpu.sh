#!/usr/bin/env bash
# Engine decode benchmark on a multi-GPU machine: runs benchmarks/engine.py with the project's
# dependencies installed (`pip install -e .`), or, on an image that lacks Ray and DeepSpeed, with
# a tarball of their site-packages for that machine placed at .devbundle/site.tar.xz (unpacked to
# /tmp/site and put first on PYTHONPATH).
#   bash benchmarks/run_engine_gpu.sh OUT_DIR [engine.py args...]
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
if [ -f .devbundle/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devbundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# Compiled Triton kernels kept under build/ (git-ignored), so a later call on a warm machine skips compiling.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpus.txt"
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/engine.py --out "$out" "$@" 2>&1 | tee "$out/engine.log"
