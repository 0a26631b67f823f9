#!/usr/bin/env bash
# MUMU-mini v2: the paper's findings as numbers (docs/MINI.md "Findings"), from trained exports.
#   bash scripts/mini_findings.sh MODEL [OUT]
# MODEL: a model folder: a training export (vlm/, sdxl/, mumu.safetensors; a LoRA run's export, the bundle
#        only, takes its bases from the run's config.json) or the shipped kind,
#        mumu_core/mini/weights/model (mumu.safetensors + bases.json naming its base folders)
# OUT:   results folder (default runs/findings); each evaluation writes OUT/<name>/results.{json,md} + sheets.
# Environment (optional comparisons, each skipped when unset):
#   FINETUNE=DIR         the mini community fine-tune (default runs/finetune/model; made when missing by its
#                        recipe, `python -m mumu_core.mini base-t2i finetune`, ~15 min: its 7 MB UNet is not
#                        shipped). Finding 4 merges MODEL's UNet LoRA into it with `python -m mumu_core fuse`
#                        (the same merge a user runs on a community SDXL) and evaluates the merged model
#   PERCEIVER_KEPT=DIR   an export trained with model.keep_perceiver=true at the same steps (Finding 1)
#   SCRATCH=DIR          an export of the from-scratch recipe (train/configs/mini_scratch.yaml) at the same compute
#   N_SINGLE, N_PAIR, N_STYLE (96, 60, 48)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODEL=${1:?usage: bash scripts/mini_findings.sh MODEL [OUT]}
OUT=${2:-runs/findings}
FINETUNE=${FINETUNE:-runs/finetune/model}
N=(--n-single "${N_SINGLE:-96}" --n-pair "${N_PAIR:-60}" --n-style "${N_STYLE:-48}")
# A model folder is a training export (vlm/, sdxl/, mumu.safetensors) or the shipped kind (mumu.safetensors +
# bases.json naming its base folders); resolve its three parts, with the loader's own message when incomplete.
paths() {  # paths DIR -> its VLM, SDXL and BUNDLE paths, one per line
  python -c 'import sys
from mumu_core.mini.demo import MiniModelError, model_paths
try:
    p = model_paths(sys.argv[1])
except MiniModelError as e:
    sys.exit(f"error: {e}")
print(p.vlm, p.sdxl, p.bundle, sep="\n")' "$1"
}
parts=$(paths "$MODEL") || exit 2
{ read -r M_VLM; read -r M_SDXL; read -r M_BUNDLE; } <<< "$parts"
mkdir -p "$OUT"
ev() {  # ev NAME VLM BUNDLE SDXL [evaluate args...]
  local name=$1 vlm=$2 bundle=$3 sdxl=$4; shift 4
  [ -f "$OUT/$name/results.json" ] && { echo "kept $OUT/$name (delete it to re-run)"; return; }
  python -m mumu_core.mini.evaluate --generator pipeline --vlm "$vlm" --bundle "$bundle" --sdxl "$sdxl" \
    --out "$OUT/$name" "${N[@]}" "$@" > "$OUT/$name.log"
  echo "wrote $OUT/$name"
}
# Single / text-only / pair / style at the demo guidance 1.5 and a sweep; tokens per image at 1.5 (Finding 1-3).
ev main "$M_VLM" "$M_BUNDLE" "$M_SDXL" --guidance-sweep 1.0 3.0 --tokens-demo-only
if [ -n "${PERCEIVER_KEPT:-}" ]; then
  parts=$(paths "$PERCEIVER_KEPT") || exit 2
  { read -r K_VLM; read -r K_SDXL; read -r K_BUNDLE; } <<< "$parts"
  ev perceiver_kept "$K_VLM" "$K_BUNDLE" "$K_SDXL" \
    --suites single tokens pair --guidance-sweep --tokens-demo-only
fi
if [ -n "${SCRATCH:-}" ]; then
  parts=$(paths "$SCRATCH") || exit 2
  { read -r S_VLM; read -r S_SDXL; read -r S_BUNDLE; } <<< "$parts"
  ev scratch "$S_VLM" "$S_BUNDLE" "$S_SDXL" --suites single pair style --guidance-sweep
fi
if [ ! -d "$FINETUNE/unet" ] && [ "$FINETUNE" = runs/finetune/model ]; then
  python -m mumu_core.mini base-t2i finetune --base mumu_core/mini/weights/base/t2i --out runs/finetune
fi
if [ -d "$FINETUNE/unet" ]; then
  # Finding 4: the fine-tune alone (its look, text-only), and MODEL's UNet LoRA merged into it.
  merged="$OUT/finetune_merged"
  [ -d "$merged" ] || python -m mumu_core fuse --bundle "$M_BUNDLE" --sdxl "$FINETUNE" --out "$merged"
  ev merged_finetune "$M_VLM" "$M_BUNDLE" "$merged" --suites single pair style \
    --guidance-sweep --generator-arg lora_scale=0
fi
python -m mumu_core.mini.evaluate --summarise "$OUT"/*/results.json > "$OUT/summary.md"
echo "summary: $OUT/summary.md"
