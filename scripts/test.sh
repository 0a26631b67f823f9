#!/usr/bin/env bash
# The test command: sets up if needed, lints, runs the whole suite. Extra args go to pytest.
# Tests that need a real ComfyUI run when MUMU_COMFYUI_DIR / MUMU_COMFYUI_PYTHON are set (docs/COMFYUI.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
# Two pytest workers (pytest-xdist), one per core: the suite is single-threaded CPU work, so this about
# halves the wall time. --dist loadfile keeps each file on one worker (its module fixtures, such as one
# ComfyUI run checked by several tests, are built once); one intra-op thread per worker. Files go out in
# collection order, slow-marked first (tests/conftest.py), so no long file starts last
# (--no-loadscope-reorder is pytest-xdist 3.8+).
# MUMU_TEST_WORKERS=0 runs everything in this process (e.g. for pdb).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${MUMU_TEST_WORKERS:-2}
xdist=()
[ "$workers" = 0 ] || xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
python -m pytest -q "${xdist[@]}" "$@"
