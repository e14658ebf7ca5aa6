#!/usr/bin/env bash
# The one prepared run on a lent GPU machine: build the library with nvcc there, then correctness,
# benchmark and compute-sanitizer through benchmarks/gpu_check.py. Everything lands in
# $OUT/gpu_report.json (plus build.log); a short summary goes to stdout. Budget: ~8 min on an H100.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine
#   DRY_RUN=1 FLASH_EXPORT_LIBRARY=cpu_build/libflash_export.so OUT=/tmp/x \
#     bash benchmarks/gpu_check.sh                        # rehearsal without a GPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
BUILD=${BUILD:-/tmp/flash_export_build}
PY=${PYTHON:-python3}
DRY=()
[ -n "${DRY_RUN:-}" ] && DRY=(--dry-run)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # flash_export, installed or not
mkdir -p "$OUT" "$BUILD"
LOG=$OUT/build.log
: >"$LOG"
# A PATH nvcc may be a wrapper script; build.py finds the static cudart next to the real one.
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH

has_cuda_entry() {  # through the binding, which also checks the params layout
  "$PY" - "$1" 2>>"$LOG" <<'PY'
import sys
from flash_export.runtime.native import NativeLibrary
sys.exit(not NativeLibrary(sys.argv[1]).has_cuda)
PY
}

t0=$(date +%s)
LIB=${FLASH_EXPORT_LIBRARY:-}  # set: test that library, build nothing
if [ -z "$LIB" ]; then
  echo "== custom_ops/build.py --cuda on" | tee -a "$LOG"
  if timeout 150 "$PY" custom_ops/build.py --out "$BUILD/full" --cuda on --verbose >>"$LOG" 2>&1 \
      && has_cuda_entry "$BUILD/full/libflash_export.so"; then
    LIB=$BUILD/full/libflash_export.so
  fi
fi
echo "== build: ${LIB:-FAILED} ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
if [ -z "$LIB" ]; then
  tail -40 "$LOG"
  printf '{"errors": ["build failed; see build.log"]}\n' >"$OUT/gpu_report.json"
  exit 1
fi

timeout 420 "$PY" benchmarks/gpu_check.py "${DRY[@]}" --lib "$LIB" --out "$OUT/gpu_report.json" \
  --build-log "$LOG"
rc=$?
echo "== total $(( $(date +%s) - t0 )) s, gpu_check.py rc=$rc"
exit $rc
