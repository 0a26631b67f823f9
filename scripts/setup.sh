#!/usr/bin/env bash
# Idempotent setup: a venv in .venv with torch (2.13.0 CPU where torch is missing) and the package with
# all extras. Re-running only installs what changed. Each step says what it does (the first run installs
# torch and the extras, a few minutes; pip shows its progress).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "[setup] $*"; }
if [ ! -x .venv/bin/python ]; then
  step "creating the venv .venv ($("$PY" --version))"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
PIP=(python -m pip install --disable-pip-version-check)
step "pip itself"
"${PIP[@]}" -q --upgrade pip
# torch is pinned only here: 2.13.0 is the CPU build on local disk; any torch already present is kept.
if ! python -c "import torch" 2>/dev/null; then
  step "installing torch 2.13.0 (CPU, about 200 MB)"
  "${PIP[@]}" torch==2.13.0
fi
stamp=.venv/.mumu-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  step "installing the package and its extras (train, data, eval, dev) from pyproject.toml"
  "${PIP[@]}" -e ".[train,data,eval,dev]"
  echo "$want" > "$stamp"
else
  step "packages up to date (pyproject.toml unchanged)"
fi
python -c "import torch, transformers, diffusers, peft; print(f'[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}. Use .venv/bin/python, or run: . .venv/bin/activate')"
