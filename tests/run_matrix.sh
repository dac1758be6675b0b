#!/usr/bin/env bash
# The test suite under every CPU kernel set a user's x86-64 machine may pick, with and without a thread
# limit, and once with every core kept busy by another process (`make test-matrix`).
#   ATEN_CPU_CAPABILITY picks ATen's kernels; ONEDNN_MAX_CPU_ISA picks oneDNN's (its own switch: the
#   channels_last convolutions), so both are set together.
# Usage: bash tests/run_matrix.sh [pytest args...]   (PY=path/to/python; ROWS="default avx2 native")
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROWS=${ROWS:-"default avx2 native"}
declare -A ISA=([default]="ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"
                [avx2]="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" [native]="")
summary=()
failed=0

run_row() {  # name, env assignments...
  local name=$1; shift
  local start=$SECONDS
  if env "$@" "$PY" -m pytest -q tests "${EXTRA[@]}" >"/tmp/matrix_${name// /_}.log" 2>&1; then
    summary+=("$(printf '%-34s passed  %4d s' "$name" $((SECONDS - start)))")
  else
    failed=1
    summary+=("$(printf '%-34s FAILED  %4d s  (%s)' "$name" $((SECONDS - start)) \
      "$(tail -n 1 "/tmp/matrix_${name// /_}.log")")")
  fi
  echo "${summary[-1]}"
}

EXTRA=("$@")
for row in $ROWS; do
  # shellcheck disable=SC2086
  run_row "$row OMP_NUM_THREADS=1" ${ISA[$row]} OMP_NUM_THREADS=1
  # shellcheck disable=SC2086
  run_row "$row threads unset" -u OMP_NUM_THREADS ${ISA[$row]}
done

# Native kernels while every core is busy with another process (a user's loaded laptop or CI runner).
busy=()
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
for _ in $(seq "$(nproc)"); do (while :; do :; done) & busy+=($!); done
run_row "native, all cores busy"
kill "${busy[@]}" 2>/dev/null

printf '\n%s\n' "${summary[@]}"
exit $failed
