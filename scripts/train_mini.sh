#!/usr/bin/env bash
# MUMU-mini v2, the MUMU stage in one command: known-boxes bootstrap -> python -m train with
# train/configs/mini.yaml (Table 1's structure) on the shipped pretrained bases:
#   mumu_core/mini/weights/base/t2i   the text-to-image base (stands in for SDXL)
#   mumu_core/mini/weights/base/vlm   the VLM base, perceiver in place (stands in for idefics2-8b)
#   bash scripts/train_mini.sh                 # everything under runs/mini (git-ignored)
# The bases have one-command recipes of their own (run once, their weights ship; docs/MINI.md):
#   python -m mumu_core.mini base-t2i train --out runs/base_t2i        (<= 2 h on 2 CPU cores)
#   python -m mumu_core.mini base-vlm train --out runs/base_vlm        (then two more runs with --init:
#                                      mumu_core/mini/base_vlm.py; <= 2 h on 2 CPU cores in all)
#   python -m mumu_core.mini base-t2i finetune --base runs/base_t2i/model --out runs/finetune
# Environment: MINI_RUN (default runs/mini), MINI_T2I / MINI_VLM (base folders, default the shipped ones),
# MINI_CONFIG (default train/configs/mini.yaml; train/configs/mini_scratch.yaml is the from-scratch
# recipe, which needs random bases: MINI_T2I=... MINI_VLM=... from `python -m mumu_core make-tiny --preset
# mini`), MINI_PROCS (2: training processes, FSDP), MINI_SCENES (60000), TRAIN_MINUTES (70: wall-clock
# limit of the training step; on SIGTERM the trainer saves a checkpoint and an export, so the stage always
# ends within 75 min on 2 CPU cores); extra
# arguments go to python -m train (e.g. --set optim.max_steps=50). Re-running resumes.
# Afterwards: python -m mumu_core.mini ship --export "$MINI_RUN/train/export/step_<N>" --recipe "$MINI_RUN/recipe.json"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
RUN=${MINI_RUN:-runs/mini}
T2I=${MINI_T2I:-mumu_core/mini/weights/base/t2i}
VLM=${MINI_VLM:-mumu_core/mini/weights/base/vlm}
CONFIG=${MINI_CONFIG:-train/configs/mini.yaml}
SCENES=${MINI_SCENES:-60000}
MINUTES=${TRAIN_MINUTES:-70}
PROCS=${MINI_PROCS:-2}
[[ "$PROCS" =~ ^[1-9][0-9]*$ ]] || { echo "error: MINI_PROCS=$PROCS: give the number of training processes (1 or more)" >&2; exit 2; }
start=$(date +%s)
# One intra-op thread: on 2 shared cores, OpenMP's spinning worker threads slow a step ~15x as soon as
# anything else runs (measured: 0.9 s/step with 1 thread vs 14 s with 2, batch 32, under load).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for d in "$T2I/unet" "$VLM"; do
  [ -e "$d" ] || { echo "error: $d is missing: the bases ship in mumu_core/mini/weights/base (see the header of $0)" >&2; exit 2; }
done

[ -f "$RUN/data/manifest.json" ] || python -m mumu_core.mini bootstrap --out "$RUN/data" --count "$SCENES" \
  --images-per-part 5000

rc=0
# FSDP over MINI_PROCS processes (default 2, one per core, as the paper's FSDP over 8 GPUs): measured
# 1.73 s per 2 x 16-sample step against 2.55 s for one process of 32 (docs/MINI.md). optim.batch_size is
# per process; the config's 16 makes 32 per step with 2 processes.
if [ "$PROCS" -gt 1 ]; then
  launch=(python -m torch.distributed.run --standalone --nproc_per_node "$PROCS" -m train)
else
  launch=(python -m train)
fi
timeout --signal=TERM --kill-after=300 "${MINUTES}m" "${launch[@]}" --config "$CONFIG" \
  --set model.vlm="$VLM" model.sdxl="$T2I" data.shards="$RUN/data/*.tar" out_dir="$RUN/train" "$@" || rc=$?
# 124: the time limit stopped training (it saved an export first); 130: interrupted likewise.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 130 ]; then
  echo "training failed with status $rc" >&2
  exit "$rc"
fi
latest=$(ls -d "$RUN"/train/export/step_* | sort | tail -1)
if [ "$rc" -eq 124 ]; then
  # torchrun's agent prints a SignalException traceback for the TERM it forwarded: expected here.
  echo "the ${MINUTES}-minute limit stopped training; it saved a checkpoint and an export first"
fi
# What ran, extra arguments included (a --set override is part of the recipe), for `python -m mumu_core.mini ship`.
python - "$RUN/recipe.json" "$latest" "$(( $(date +%s) - start ))" "$rc" "$PROCS" "$CONFIG" "$T2I" "$VLM" "$@" <<'PY'
import json, sys

out, export, wall, status, procs, config, t2i, vlm, *extra = sys.argv[1:]
record = {"export": export, "wall_s": int(wall), "train_status": int(status), "processes": int(procs),
          "config": config, "t2i": t2i, "vlm": vlm, "extra_args": extra}
open(out, "w").write(json.dumps(record) + "\n")
PY
echo "done in $(( $(date +%s) - start )) s; latest export: $latest"
