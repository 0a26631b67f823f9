#!/usr/bin/env bash
# Idempotent setup: a venv in .venv with torch (2.13.0 CPU where torch is missing) and the package with
# all extras. Re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
# torch is pinned only here: 2.13.0 is the CPU build on local disk; any torch already present is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q --disable-pip-version-check torch==2.13.0
stamp=.venv/.mumu-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --disable-pip-version-check -e ".[train,data,eval,dev]"
  echo "$want" > "$stamp"
fi
python -c "import torch, transformers, diffusers, peft; print(f'setup ok: torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}')"
