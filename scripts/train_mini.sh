#!/usr/bin/env bash
# MUMU-mini, one command: random-init base models -> known-boxes bootstrap -> python -m train.
#   bash scripts/train_mini.sh                 # everything under runs/mini (git-ignored)
# Environment: MINI_RUN (default runs/mini), MINI_SCENES (60000), TRAIN_MINUTES (100: wall-clock limit
# of the training step; on SIGTERM the trainer saves a checkpoint and an export, so the recipe always
# finishes within 2 h on 2 CPU cores), extra arguments go to python -m train (e.g. --set optim.max_steps=50).
# Re-running resumes: finished steps (base models, shards, checkpoints) are kept.
# Afterwards: python -m mumu_core.mini ship --export "$MINI_RUN/train/export/step_<N>" copies the
# weights into mumu_core/mini/weights/ with their hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
RUN=${MINI_RUN:-runs/mini}
SCENES=${MINI_SCENES:-60000}
MINUTES=${TRAIN_MINUTES:-100}
start=$(date +%s)
# One intra-op thread: on 2 shared cores, OpenMP's spinning worker threads slow a step ~15x as soon as
# anything else runs (measured: 0.9 s/step with 1 thread vs 14 s with 2, batch 32, under load).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[ -f "$RUN/base/.mumu_tiny_models" ] || python -m mumu_core make-tiny "$RUN/base" --preset mini
[ -f "$RUN/data/manifest.json" ] || python -m mumu_core.mini bootstrap --out "$RUN/data" --count "$SCENES" \
  --images-per-part 5000

rc=0
timeout --signal=TERM --kill-after=300 "${MINUTES}m" python -m train --config train/configs/mini.yaml \
  --set model.vlm="$RUN/base/vlm" model.sdxl="$RUN/base/sdxl" data.shards="$RUN/data/*.tar" \
  out_dir="$RUN/train" "$@" || rc=$?
# 124: the time limit stopped training (it saved an export first); 130: interrupted likewise.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 130 ]; then
  echo "training failed with status $rc" >&2
  exit "$rc"
fi
latest=$(ls -d "$RUN"/train/export/step_* | sort | tail -1)
echo "{\"export\": \"$latest\", \"wall_s\": $(( $(date +%s) - start )), \"train_status\": $rc}" > "$RUN/recipe.json"
echo "done in $(( $(date +%s) - start )) s; latest export: $latest"
