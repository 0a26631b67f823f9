#!/usr/bin/env bash
# The test command: sets up if needed, lints, runs the whole suite. Extra args go to pytest.
# Tests that need a real ComfyUI run when MUMU_COMFYUI_DIR / MUMU_COMFYUI_PYTHON are set (docs/COMFYUI.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
