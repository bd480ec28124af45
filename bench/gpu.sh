#!/usr/bin/env bash
# The paper preset on a CUDA machine: model time per 40-slice study (Grad-CAM included) and CNN training
# throughput, printing the device. `bench/gpu.sh --device cpu --tiny` runs it at toy sizes (a test does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" bench/bench_gpu.py "$@"
