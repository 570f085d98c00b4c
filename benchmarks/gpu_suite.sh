#!/usr/bin/env bash
# The one-call GPU suite: environment, install, build, the whole pytest suite on the GPU, the
# microbenchmarks and the model benchmark. Logs, JSON, markdown and PNGs go into OUTDIR; a short
# summary table is printed last.
#
#   benchmarks/gpu_suite.sh OUTDIR            # full run (< 8 min on an H100, build included)
#   benchmarks/gpu_suite.sh OUTDIR --quick    # one shape per resolution (<= 6 min with the build)
# PYTEST_TIMEOUT and BENCH_TIMEOUT (seconds; default 200 and 320) bound the two phases.
# Both benchmark the forward and the train op (forward + backward, train-mode BN) and, at the model
# level, inference and training images/s.
#
# For a bare GPU machine with a preinstalled stack (torch, triton, timm, pytest): nothing is
# downloaded; the package is installed without build isolation. Then publish the results with
#   python benchmarks/publish.py OUTDIR
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [--quick]}
QUICK=0
[[ "${2:-}" == "--quick" ]] && QUICK=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "== $* (+$(( $(date +%s) - T0 ))s)"; }

stamp environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $PY - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__, "| cudnn", torch.backends.cudnn.version())
PY
  command -v nvcc >/dev/null && nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

stamp "install and build (CUDA extension for the visible GPU)"
export MAX_JOBS=${MAX_JOBS:-16}
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -q -e . >>"$OUT/env.txt" 2>&1; then
  echo "pip install failed (see env.txt): building in place and using the source tree through PYTHONPATH"
  $PY setup.py build_ext --inplace >>"$OUT/env.txt" 2>&1 || echo "in-place build failed too (see env.txt)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -m ghost_kernels.info 2>&1 | tee -a "$OUT/env.txt"

stamp tests
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
JUNIT=$(mktemp --suffix=.xml)
PYTEST_ARGS=(-q -p no:cacheprovider $XDIST --junitxml "$JUNIT" tests)
[[ $QUICK == 1 ]] && PYTEST_ARGS+=(-k "not random_configurations")
timeout "${PYTEST_TIMEOUT:-200}" $PY -m pytest "${PYTEST_ARGS[@]}" >"$OUT/pytest.log" 2>&1
TEST_RC=$?
tail -n 30 "$OUT/pytest.log"

stamp microbenchmarks and model
BENCH_ARGS=(--out "$OUT" --junit "$JUNIT")
if [[ $QUICK == 1 ]]; then
  BENCH_ARGS+=(--quick --compile-budget 30 --model-compile-budget 110)
else
  BENCH_ARGS+=(--compile-budget 90 --max-autotune-budget 30 --model-compile-budget 100
              --dtypes bfloat16,float16,float32 --layouts channels_last,nchw --secondary-shapes quick)
fi
timeout "${BENCH_TIMEOUT:-320}" $PY -m ghost_kernels.bench "${BENCH_ARGS[@]}" 2>"$OUT/bench.err" | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}
[[ $BENCH_RC != 0 ]] && tail -n 20 "$OUT/bench.err"

stamp summary
$PY -m ghost_kernels.bench.summary "$OUT/bench.json" || true
echo "tests rc=$TEST_RC bench rc=$BENCH_RC total $(( $(date +%s) - T0 ))s; outputs in $OUT"
[[ $TEST_RC == 0 && $BENCH_RC == 0 ]]
