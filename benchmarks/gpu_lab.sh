#!/usr/bin/env bash
# The one-call GPU lab: environment, install and build, then `python -m ghost_kernels.bench.lab`
# (precompile every Triton variant in a process pool, references, timing of every family x config x
# the 22 GhostNet shapes (then yolov8n-ghost's 14) beside eager_folded / torch_folded / torch.compile / cuda / auto, ncu on a few
# kernels per family, the model level: batch 256, then batches 1, 8 and 32 eager, compiled and under
# reduce-overhead; then yolov8n-ghost at 640, ghostnetv2_100 and ghostnetv3_100 at batches 1, 8 and 32
# where their packages are installed), each phase written under OUTDIR as it finishes. Under 8 minutes on an H200 with
# the GPU image's stack (Python 3.12, torch 2.11, Triton 3.6).
#
#   benchmarks/gpu_lab.sh OUTDIR [--quick]      LAB_BUDGET_S (default 330) bounds the lab itself
#   benchmarks/gpu_lab.sh OUTDIR --phases model the model phase alone (every row the lab's share skips)
#   benchmarks/gpu_lab.sh OUTDIR --phases train training: per shape eager / compile / fused train steps
#                                               with peak memory, GhostNet training images/s under AMP
#   python benchmarks/publish.py OUTDIR         files the results and writes the measured choice table
#
# The GPU test suite is the next call: benchmarks/gpu_suite.sh OUTDIR2 (or pytest tests on the GPU).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_lab.sh OUTDIR [--quick]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton-cache}
T0=$(date +%s)
stamp() { echo "== $* (+$(( $(date +%s) - T0 ))s)"; }

stamp environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__)"
  command -v ncu >/dev/null && ncu --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

stamp "install and build (CUDA extension for sm_90)"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -q -e . >>"$OUT/env.txt" 2>&1; then
  echo "pip install failed (see env.txt): building in place and using the source tree through PYTHONPATH"
  $PY setup.py build_ext --inplace >>"$OUT/env.txt" 2>&1 || echo "in-place build failed too (see env.txt)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

stamp lab
timeout $(( ${LAB_BUDGET_S:-330} + 60 )) $PY -m ghost_kernels.bench.lab --out "$OUT" --budget-s "${LAB_BUDGET_S:-330}" "$@" \
  2>"$OUT/lab.err" | tee "$OUT/lab.log"
RC=${PIPESTATUS[0]}
[[ $RC != 0 ]] && tail -n 30 "$OUT/lab.err"
rm -rf "$OUT/triton-cache"
stamp "done (rc=$RC); outputs in $OUT"
exit $RC
