#!/usr/bin/env bash
# One-command GPU check at real size with random weights (no downloads): Idefics2-8b-shaped encoder,
# SDXL UNet steps with/without the K/V cache, encode -> release -> sample memory, one Table 1 training
# step with MFU. Writes bench/results/gpu.json. Needs a CUDA GPU (~60 GB free; H100/H200: < 8 min).
#   bash bench/gpu_check.sh [--skip-train] [--out FILE]
# CPU smoke run at tiny size: python bench/gpu_check.py --tiny --out /tmp/gpu_tiny.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" bench/gpu_check.py "$@"
