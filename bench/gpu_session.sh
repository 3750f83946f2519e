#!/usr/bin/env bash
# Parts of the benchmark suite on a GPU machine, sized for a time-limited lease (one device command <= 10 min):
#
#   bash bench/gpu_session.sh tests     # install, build the C++ extension, every `gpu`-marked test     (~3 min)
#   bash bench/gpu_session.sh kernels   # Triton kernels vs torch (GB/s vs copy), DIMAP (Triton column),
#                                       # slicing (CUDA)                                                 (~6-7 min)
#   bash bench/gpu_session.sh engine    # DAP step, UP-ViTs KL engine (DeiT-S / Swin-T 224 px, bf16)     (~7-8 min)
#   bash bench/gpu_session.sh speed     # pruned-model latency / throughput (bs 1 / 64 / 256), ONNX      (~3 min)
#   bash bench/gpu_session.sh tests speed   # several parts in one command: one machine start, one install
#
# Times are H100 estimates including the install (~1 min on a fresh machine). A fresh machine per command costs
# a start too, so run parts that fit together in one command (e.g. `tests speed`, then `kernels`, then `engine`).
# The whole command stops itself before GPU_SESSION_LIMIT seconds (default 570): a benchmark still running then
# is stopped (status "timeout"), the rest skipped. Each benchmark's results are merged into
# bench/results/<device>-<date>.json (python -m bench); where $OUT is set (the device tool), bench/results is
# packed into $OUT/results.tgz after every benchmark (so a stopped command still returns what finished) and the
# whole log goes to $OUT/gpu_session.log. Unpack results.tgz at the repo root here (before the next part, so the
# day's summary keeps merging) and run `python bench/report.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch; a bare `python` may not exist there
LIMIT=${GPU_SESSION_LIMIT:-570}

declare -A PARTS=([tests]="gpu_tests" [kernels]="kernels dimap slicing" [engine]="dap kl_engine"
                  [speed]="pruned_speed")
usage() { echo "usage: bash bench/gpu_session.sh tests|kernels|engine|speed [more parts...]" >&2; exit 2; }
[ $# -gt 0 ] || usage
for part in "$@"; do [ -n "${PARTS[$part]:-}" ] || usage; done
if [ -n "${OUT:-}" ]; then exec > >(tee -a "$OUT/gpu_session.log") 2>&1; fi

# installed? (checked outside the checkout: from its root, ./vitprune_fast would import without the kernels)
(cd /tmp && "$PY" -c "import vitprune_fast.kernels") 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "install done after ${SECONDS} s"

rc=0
for part in "$@"; do
  for name in ${PARTS[$part]}; do
    left=$((LIMIT - SECONDS))
    if [ "$left" -lt 20 ]; then
      echo "== $name: skipped, ${left} s left of ${LIMIT} s" >&2
      rc=1
      continue
    fi
    "$PY" -m bench --only "$name" --timeout "$left" || rc=1
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" bench/results; fi
  done
done
echo "done after ${SECONDS} s (exit code $rc)"
exit $rc
