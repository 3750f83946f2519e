#!/usr/bin/env bash
# One part of the benchmark suite on a GPU machine, sized for a time-limited lease (each part < 10 minutes):
#
#   bash bench/gpu_session.sh tests     # install, build the C++ extension, every `gpu`-marked test
#   bash bench/gpu_session.sh kernels   # Triton kernels vs torch (GB/s vs copy), DIMAP (Triton column), slicing (CUDA)
#   bash bench/gpu_session.sh engine    # UP-ViTs KL engine (DeiT-S / Swin-T 224 px, bf16), DAP step
#   bash bench/gpu_session.sh speed     # pruned-model latency / throughput (bs 1 / 64 / 256)
#
# The parts merge into one bench/results/<device>-<date>.json (python -m bench --only ...). Where $OUT is set
# (the device tool), bench/results is packed into $OUT/results.tgz; unpack it here and run `python bench/report.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# installed? (checked outside the checkout: from its root, ./vitprune_fast would import without the kernels)
(cd /tmp && python -c "import vitprune_fast.kernels") 2>/dev/null \
  || pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${1:-}" in
  tests)   python -m bench --only gpu_tests ;;
  kernels) python -m bench --only kernels,dimap,slicing ;;
  engine)  python -m bench --only kl_engine,dap ;;
  speed)   python -m bench --only pruned_speed ;;
  *) echo "usage: bash bench/gpu_session.sh tests|kernels|engine|speed" >&2; exit 2 ;;
esac
rc=$?
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" bench/results; fi
exit $rc
