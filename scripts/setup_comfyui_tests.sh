#!/usr/bin/env bash
# Set up a real ComfyUI for the pack's ComfyUI tests (tests/nodes/*_in_comfyui.py, the headless workflow run).
#
#   bash scripts/setup_comfyui_tests.sh SOURCE [WORK]
#
# SOURCE: a ComfyUI checkout (the folder with main.py; used in place, never modified) or a ComfyUI source
#         tarball (*.tar.gz holding ComfyUI/main.py; unpacked once into WORK/ComfyUI).
# WORK:   where the venv (and an unpacked tarball) go; default $MUMU_TEST_CACHE/comfyui
#         (MUMU_TEST_CACHE defaults to ~/.cache/comfyui-mumu-tests).
# Builds WORK/venv with torch + torchvision ($MUMU_COMFY_TORCH, default the pair verified with ComfyUI 0.3.64:
# "torch==2.14.1 torchvision==0.29.1"), ComfyUI's requirements and this pack's requirements.txt, as
# ComfyUI-Manager would install them. Idempotent: a re-run only installs what changed. Then:
#   . WORK/env.sh      # exports MUMU_COMFYUI_DIR and MUMU_COMFYUI_PYTHON
#   bash scripts/test.sh tests/nodes
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -lt 1 ] && exit 2 || exit 0
fi
SOURCE=$1
CACHE=${MUMU_TEST_CACHE:-$HOME/.cache/comfyui-mumu-tests}
WORK=${2:-$CACHE/comfyui}
TORCH_SPEC=${MUMU_COMFY_TORCH:-torch==2.14.1 torchvision==0.29.1}
step() { echo "[setup_comfyui_tests] $*"; }

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
if [ -d "$SOURCE" ]; then
  [ -f "$SOURCE/main.py" ] || { echo "error: $SOURCE has no main.py: give the ComfyUI folder (a checkout of github.com/Comfy-Org/ComfyUI)" >&2; exit 2; }
  COMFY=$(cd "$SOURCE" && pwd)
  step "ComfyUI checkout: $COMFY"
elif [ -f "$SOURCE" ]; then
  COMFY=$WORK/ComfyUI
  want=$(sha256sum "$SOURCE" | cut -c1-16)
  if [ "$(cat "$COMFY/.mumu_source" 2>/dev/null)" != "$want" ]; then
    step "unpacking $SOURCE into $COMFY"
    rm -rf "$COMFY.tmp" && mkdir -p "$COMFY.tmp" && tar -xzf "$SOURCE" -C "$COMFY.tmp"
    main=$(find "$COMFY.tmp" -maxdepth 2 -name main.py -print -quit)
    [ -n "$main" ] || { echo "error: $SOURCE holds no ComfyUI/main.py: give a ComfyUI source tarball" >&2; rm -rf "$COMFY.tmp"; exit 2; }
    rm -rf "$COMFY" && mv "$(dirname "$main")" "$COMFY" && rm -rf "$COMFY.tmp"
    echo "$want" > "$COMFY/.mumu_source"
  fi
  step "ComfyUI from tarball: $COMFY"
else
  echo "error: $SOURCE does not exist: give a ComfyUI checkout folder or a ComfyUI source tarball" >&2
  exit 2
fi

VENV=$WORK/venv
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  step "creating the venv $VENV ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
if [ "$(cat "$VENV/.mumu_torch" 2>/dev/null)" != "$TORCH_SPEC" ]; then
  # ComfyUI imports torchvision at start-up, and transformers' image code needs a real one.
  step "installing $TORCH_SPEC (a few GB the first time)"
  # shellcheck disable=SC2086
  "${PIP[@]}" $TORCH_SPEC
  echo "$TORCH_SPEC" > "$VENV/.mumu_torch"
fi
# Pin what is installed, so neither requirements file can swap torch.
"$VENV/bin/python" -m pip freeze --disable-pip-version-check | grep -E '^(torch|torchvision)==' > "$WORK/constraints.txt"
want=$(cat "$COMFY/requirements.txt" "$REPO/requirements.txt" "$WORK/constraints.txt" | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.mumu_requirements" 2>/dev/null)" != "$want" ]; then
  step "installing ComfyUI's requirements and the pack's requirements.txt"
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFY/requirements.txt" > "$WORK/comfy_requirements.txt"
  "${PIP[@]}" -r "$WORK/comfy_requirements.txt" -r "$REPO/requirements.txt" requests -c "$WORK/constraints.txt"
  echo "$want" > "$VENV/.mumu_requirements"
fi
step "checking that the venv imports what the pack needs"
"$VENV/bin/python" -c "import torch, torchvision, transformers, diffusers, peft, safetensors; print('  torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
cat > "$WORK/env.sh" <<EOF
export MUMU_COMFYUI_DIR=$COMFY
export MUMU_COMFYUI_PYTHON=$VENV/bin/python
EOF
step "done: . $WORK/env.sh   (sets MUMU_COMFYUI_DIR, MUMU_COMFYUI_PYTHON)"
