#!/usr/bin/env bash
# One-shot GPU run: build, self-test, CUDA tests, the full benchmark set and the table of the Triton
# kernels compiled at run time (registers, spills, shared memory), in at most GSA_GPU_RUN_BUDGET seconds
# (default 480). Offline: it builds against the installed torch and installs nothing from the network.
#
#   benchmarks/gpu_run.sh            (PYTHON=... picks the interpreter; GSA_SKIP_BUILD=1 skips the build)
#
# Writes benchmarks/results/<device>_<date>.{md,json,png} (python -m benchmarks), <...>_kernels.{json,md}
# and <...>_selftest.json, and logs of every stage under benchmarks/results/<device>_<date>_logs/.
# Exit status: 0 when the self-test and the CUDA tests pass (or when there is no GPU: it says so and stops
# before building anything), 1 otherwise. A benchmark stage cut by its time limit is reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GSA_GPU_RUN_BUDGET:-480}
START=$(date +%s)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_run: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing to run."
    exit 0
  fi
  echo "gpu_run: $PY cannot import torch; install the package's requirements first" >&2
  exit 2
fi

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
# The benchmark suite's own file name for the device (same slug as its result files).
SLUG=$("$PY" -c "import torch; from benchmarks.common import device_slug; print(device_slug(torch.device('cuda')))" \
  2>/dev/null || echo "$NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
STEM=benchmarks/results/${SLUG}_$(date -u +%Y-%m-%d)
LOGS=${STEM}_logs
mkdir -p "$LOGS"
echo "gpu_run: $NAME, budget ${BUDGET} s, results under ${STEM}*"

declare -a SUMMARY
FAILED=0
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME CAP_SECONDS FATAL(1/0) COMMAND...: runs COMMAND under `timeout` (the smaller of CAP and the
# budget left, keeping RESERVE seconds for the later stages), logs it and records the outcome.
stage() {
  local name=$1 cap=$2 fatal=$3 reserve=$4
  shift 4
  local limit
  limit=$(( $(left) - reserve ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then
    SUMMARY+=("$(printf '%-14s skipped (budget spent)' "$name")")
    (( fatal )) && FAILED=1
    return
  fi
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s) ==="
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local verdict=ok
  if (( rc == 124 || rc == 137 )); then verdict="TIME LIMIT"; elif (( rc != 0 )); then verdict="FAILED (rc $rc)"; fi
  SUMMARY+=("$(printf '%-14s %-16s %4d s' "$name" "$verdict" $(( $(date +%s) - t0 )))")
  if [[ $verdict != ok ]] && (( fatal )); then FAILED=1; fi
}

export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
KJSON=${STEM}_kernels.json
rm -f "$KJSON"

if [[ ${GSA_SKIP_BUILD:-0} != 1 ]]; then
  stage build 180 1 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
fi
stage selftest 120 1 200 "$PY" -m benchmarks.gpu_kernel_report --json "$KJSON" -- \
  gsa_kernels.selftest --json "${STEM}_selftest.json"
stage cuda-tests 120 1 160 "$PY" -m pytest -m cuda -q -p no:cacheprovider -rs
# The full benchmark set (python -m benchmarks defaults to it on a GPU), one family per process so that a
# family cut by the time limit keeps the others' rows (--merge); each adds its compiled kernels.
stage bench-gaussian 150 0 110 "$PY" -m benchmarks.gpu_kernel_report --json "$KJSON" -- \
  benchmarks --ops gaussian --merge --compile-budget 45
stage bench-mixture 200 0 35 "$PY" -m benchmarks.gpu_kernel_report --json "$KJSON" -- \
  benchmarks --ops mixture --merge --compile-budget 45
stage bench-overhead 60 0 5 "$PY" -m benchmarks.gpu_kernel_report --json "$KJSON" -- \
  benchmarks --ops overhead --merge
if [[ -f $KJSON ]]; then
  "$PY" -m benchmarks.gpu_kernel_report --render "$KJSON" >/dev/null && cat "${STEM}_kernels.md"
fi

echo
echo "=== gpu_run summary: $NAME, $(( $(date +%s) - START )) s of ${BUDGET} s ==="
printf '%s\n' "${SUMMARY[@]}"
echo "results: ${STEM}.{md,json,png}, ${STEM}_kernels.{md,json}, ${STEM}_selftest.json, logs in $LOGS/"
if (( FAILED )); then
  echo "gpu_run: FAILED (self-test, CUDA tests or build)"
  exit 1
fi
echo "gpu_run: self-test and CUDA tests passed"
