#!/usr/bin/env bash
# One short GPU check: the 12-member head-CT ensemble and 64 radiographs on CUDA and TensorRT, with the CPU path in
# the same run; prints seconds per study and the ratio to the CPU. Needs onnxruntime-gpu (the image of
# Dockerfile.gpu, or `pip install onnxruntime-gpu` in place of the CPU builds). Put what it prints in the cards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: no GPU visible"
exec timeout "${GPU_CHECK_TIMEOUT_S:-540}" "$PY" benchmarks/bench_gpu.py --ct-members 12 --radiographs 64 "$@"
