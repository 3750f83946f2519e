#!/usr/bin/env bash
# The GPU check in one command that always ends: `bash bench/gpu_check.sh [--deadline S] [--dry-run]`.
#
# A GPU lease is short (about 15 minutes in all, a machine start included, at most 10 minutes per command), so one
# command does everything: an offline install, then bench/gpu_check.py (environment report, kernel preflight, every
# gpu-marked test, reduced benchmarks by priority), all inside one deadline (default 480 s, counted from the start
# of this script). Results land in bench/results/ and, where $OUT is set (the device tool), in $OUT/results/ with
# the log $OUT/gpu_check.log, copied after every step. Locally: `python bench/report.py` renders them.
#
# Install: `pip install --no-deps --no-build-isolation -e .` (offline: the machine has torch, triton, timm, ninja,
# pybind11). If that fails, a copy of the package with its kernels goes on PYTHONPATH instead (the C++ extension is
# then built with ninja on first use, or the plain-torch fallback runs) and the environment report says so.
# GPU_CHECK_FALLBACK=1 takes that path on purpose (the CPU test of this script does).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch; a bare `python` may not exist there
DEADLINE=480
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --deadline) DEADLINE=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

fallback() {
  local dir
  dir=$(mktemp -d /tmp/vitprune_fast-copy.XXXXXX)
  cp -r vitprune_fast "$dir/" && rm -rf "$dir/vitprune_fast/kernels" && cp -r kernels "$dir/vitprune_fast/kernels" \
    && mkdir -p "$dir/vitprune_fast/csrc" && cp csrc/compact.cpp "$dir/vitprune_fast/csrc/" || return 1
  export PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}"
  export VITPRUNE_FAST_INSTALL="fallback: a copy on PYTHONPATH ($dir)"
  echo "install: $VITPRUNE_FAST_INSTALL"
}

if [ "${GPU_CHECK_FALLBACK:-0}" = 1 ]; then
  fallback || exit 1
elif (cd /tmp && "$PY" -c "import vitprune_fast.kernels") 2>/dev/null; then  # outside the checkout: its root
  export VITPRUNE_FAST_INSTALL="already installed"                          # imports without the kernels
else
  if timeout $((DEADLINE / 3)) "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
    export VITPRUNE_FAST_INSTALL="editable (pip install --no-deps --no-build-isolation -e .)"
  else
    echo "install: pip failed or took too long; falling back to a copy of the package" >&2
    fallback || exit 1
  fi
fi
echo "install done after ${SECONDS} s: $VITPRUNE_FAST_INSTALL"
exec "$PY" bench/gpu_check.py --deadline $((DEADLINE - SECONDS)) "${args[@]+"${args[@]}"}"
