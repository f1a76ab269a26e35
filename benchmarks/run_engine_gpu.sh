#!/usr/bin/env bash
# Engine decode benchmark on a multi-GPU machine whose image lacks Ray: unpack the bundle built by
# shared/tools/device-bundle.sh (carried as .devbundle), then run benchmarks/engine.py.
#   bash benchmarks/run_engine_gpu.sh OUT_DIR [engine.py args...]
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p /tmp/site "$out" && tar xJf .devbundle/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
# Compiled Triton kernels kept under build/ (git-ignored), so a later call on a warm machine skips compiling.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpus.txt"
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/engine.py --out "$out" "$@" 2>&1 | tee "$out/engine.log"
