#!/usr/bin/env bash
# The README's main command: set up, then generate the bundled multimodal prompts (reference crops from
# different held-out images, background-style references) with the shipped MUMU-mini model.
# Writes outputs/demo/*.png, outputs/demo/contact_sheet.png (references | samples | text-only, every sample
# marked right/wrong by the analyser) and summary.txt/.json (the three lines it prints). CPU only; about a minute.
#   bash scripts/demo.sh [--out DIR] [--samples N] [--guidance G] [--steps S]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One intra-op thread: on 2 shared cores spinning OpenMP workers slow everything down many times.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=outputs/demo
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
python -m mumu_core.mini demo --out "$out" "${args[@]}"
