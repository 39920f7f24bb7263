#!/usr/bin/env bash
# One-shot GPU run: build, self-test, CUDA tests, the full benchmark set and the table of the Triton
# kernels compiled at run time (registers, spills, shared memory), in at most GSA_GPU_RUN_BUDGET seconds
# (default 480). Offline: it builds against the installed torch and installs nothing from the network.
#
#   benchmarks/gpu_run.sh
#     PYTHON=...           the interpreter (default: python, else python3)
#     GSA_RESULTS_DIR=...  where results go (default benchmarks/results)
#     GSA_SKIP_BUILD=1     skip `pip install -e .` (already built)
#
# Writes <results>/<device>_<date>.{md,json,png} (python -m benchmarks, the full GPU set, one op per
# process merged into one table), <device>_<date>_kernels.{json,md} (every kernel specialisation the run
# compiled), <device>_<date>_selftest.json, and each stage's log in <device>_<date>_logs/.
# Exit status: 0 when the self-test and the CUDA tests pass (or when there is no GPU: it says so and stops
# before building anything), 1 otherwise. A benchmark stage cut by its time limit is reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GSA_GPU_RUN_BUDGET:-480}
START=$(date +%s)

# One probe (importing torch is the slow part): GPU or not, torch version, file-name slug, device name.
PROBE=$("$PY" - 2>/dev/null <<'PYEOF'
import re, torch
if not torch.cuda.is_available():
    print("none", torch.__version__)
else:
    name = torch.cuda.get_device_name()
    try:  # the benchmark suite's own file name for the device, so all result files share one stem
        from benchmarks.harness.environment import device_slug
        slug = device_slug(torch.device("cuda"))
    except Exception:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    print("cuda", torch.__version__, slug, name)
PYEOF
) || { echo "gpu_run: $PY cannot import torch; install the package's requirements first" >&2; exit 2; }
read -r KIND TORCH_VERSION SLUG NAME <<< "$PROBE"
if [[ $KIND != cuda ]]; then
  echo "gpu_run: no CUDA GPU visible to torch ($TORCH_VERSION); nothing to run."
  exit 0
fi
RESULTS=${GSA_RESULTS_DIR:-benchmarks/results}
STEM=$RESULTS/${SLUG}_$(date -u +%Y-%m-%d)
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
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
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
  stage build 180 1 260 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e .
fi
stage selftest 180 1 150 "$PY" -m benchmarks.gpu_kernel_report --json "$KJSON" -- \
  gsa_kernels.selftest --json "${STEM}_selftest.json"
stage cuda-tests 120 1 130 "$PY" -m pytest -m cuda -q -p no:cacheprovider -rs
# The full benchmark set (python -m benchmarks defaults to it on a GPU), one op per process so that an op
# cut by its time limit costs only its own rows (--merge builds one table); each adds its kernels.
bench() {
  local op=$1 cap=$2 reserve=$3
  stage "bench-$op" "$cap" 0 "$reserve" "$PY" -m benchmarks.gpu_kernel_report --json "$KJSON" -- \
    benchmarks --ops "$op" --merge --compile-budget 30 --out "$RESULTS"
}
bench teleport 70 110
bench denoise 70 85
bench score 70 60
bench gmm 90 35
bench delta 90 15
bench overhead 45 15
if [[ -f $KJSON ]]; then
  "$PY" -m benchmarks.gpu_kernel_report --render "$KJSON" >/dev/null && cat "${STEM}_kernels.md"
fi

echo
echo "=== gpu_run summary: $NAME, $(( $(date +%s) - START )) s of ${BUDGET} s ==="
printf '%s\n' "${SUMMARY[@]}"
echo "results: ${STEM}.{md,json,png}, ${STEM}_kernels.{md,json}, ${STEM}_selftest.json, logs in ${LOGS}/"
if (( FAILED )); then
  echo "gpu_run: FAILED (self-test, CUDA tests or build)"
  exit 1
fi
echo "gpu_run: self-test and CUDA tests passed"
