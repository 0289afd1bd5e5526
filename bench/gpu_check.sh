#!/usr/bin/env bash
# The x86-cuda board on a real GPU, as one short check (minutes): #28 item 5, #27 item 5.
# No GPU is on the machine Kiln builds on, and the GPU machine has PyTorch with CUDA but no TVM
# compiler, so it runs in two halves (bench/_gpu_check.py says what each does):
#
#   here, once the app is built (.venv/bin/doit export:traffic_signs):
#       bench/gpu_check.sh prepare            # writes .gpu/ (runner + CUDA runtime, the two
#                                             # libraries, samples, data, pydantic wheels)
#   on the GPU machine (the device tool: carry [".gpu"], timeout_s 600):
#       bench/gpu_check.sh run [--epochs 3]   # runner CUDA vs CPU latency + agreement, then
#                                             # training CPU vs CUDA (+ NCCL DDP on 2 GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-}"; shift || true
case "$step" in
  prepare)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    exec .venv/bin/python bench/_gpu_check.py prepare "$@" ;;
  run)
    [ -f .gpu/meta.json ] || { echo "gpu_check: .gpu/ missing: run 'bench/gpu_check.sh prepare' here first and carry .gpu" >&2; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "gpu_check: nvidia-smi found no GPU"
    py=python3
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .gpu/whl/*.whl
    # the CUDA runtime: the one carried in the bundle, else PyTorch's (nvidia-cuda-runtime)
    cudart="$("$py" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null || true)"
    export LD_LIBRARY_PATH="${cudart:+$cudart:}${LD_LIBRARY_PATH:-}"
    export PYTHONPATH="/tmp/gpu_check_site:$PWD" PYTHONUNBUFFERED=1
    exec "$py" bench/_gpu_check.py run "$@" ;;
  *)
    echo "usage: bench/gpu_check.sh prepare | run [--epochs N]" >&2; exit 2 ;;
esac
