#!/usr/bin/env bash
# The README's first command: UIP2P's Cycle Edit Consistency on ShapesWorld, on this CPU, with
# the models the package ships and no download. In order:
#   1. renders ShapesWorld: caption records (image, captions, forward and reverse instruction;
#      no edited image) and test turns with their true edits (RUNS/data);
#   2. scores the starting editor on the first LIMIT test turns (RUNS/eval/before);
#   3. trains CEC from it for STEPS steps of 16 scenes (RUNS/cec: metrics.jsonl, TensorBoard,
#      sample grids RUNS/cec/samples, the EMA UNet exported to RUNS/cec/export);
#   4. scores the result the same way (RUNS/eval/after) and prints both in one table
#      (RUNS/eval/compare.md; each eval folder holds grid.png: input | instruction | edit | truth).
#   bash launch/quickstart.sh [RUNS_DIR]               # default runs/quickstart
#   START=recolour STEPS=300 LIMIT=100 bash launch/quickstart.sh
# START: cec (default: continue the shipped shapes-cec, itself CEC run for longer from the
# recolour-only editor; RESULTS.md has its full run) or recolour (CEC from the shipped
# shapes-ip2p-recolour, supervised on recolour edits only: the experiment from its start).
# Rerunning resumes the training from its last checkpoint and skips the finished steps.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-runs/quickstart}"
[[ $runs == /* ]] || runs="$PWD/$runs"
start="${START:-cec}" steps="${STEPS:-150}" limit="${LIMIT:-100}"
case "$start" in
  cec) before=shapes-cec ;;
  recolour) before=shapes-ip2p-recolour ;;
  *) echo "quickstart: START=$start; expected cec or recolour" >&2; exit 2 ;;
esac
bash "$root/launch/setup.sh"
uip2p=("${UIP2P_VENV:-$root/.venv}/bin/python" -m uip2p_jax)
cd "$root"
log() { echo "[quickstart $(date +%H:%M:%S)] $*"; }

if [[ ! -f "$runs/data/scenes_test.jsonl" ]]; then
  log "rendering ShapesWorld into $runs/data"
  "${uip2p[@]}" data build shapes --out "$runs/data" --train 4000 --test "$limit" --seed 0 \
    --overwrite
fi
score() {  # score NAME MODEL LABEL
  if [[ -f "$runs/eval/$1/summary.json" ]]; then log "eval $1: done"; return; fi
  log "eval $1: $3 on $limit test turns"
  "${uip2p[@]}" eval shapes --data "$runs/data" --out "$runs/eval/$1" --model "$2" \
    --limit "$limit" --label "$3"
}
score before "$before" "before: $before"
log "CEC from $before: $steps steps (the losses, per 10 steps, below)"
# A short run: warm up over a tenth of it and keep an EMA of its last ~50 steps.
"${uip2p[@]}" train --config "experiments/shapes/cec.py:init=$start,models=shipped,runs=$runs,steps=$steps" \
  --workdir "$runs/cec" --config.log_every=10 \
  --config.optim.warmup_steps=$(( steps / 10 )) \
  --config.optim.decay_steps=$(( steps - steps / 10 )) \
  --config.ema_decay=0.98 --config.checkpoint.every=50 --config.sample.every=50
score after "$runs/cec/export" "after: $before + $steps CEC steps"
"${uip2p[@]}" eval shapes-compare "$runs/eval/before" "$runs/eval/after" \
  --out "$runs/eval/compare.md"
log "done: the table $runs/eval/compare.md; edits $runs/eval/after/grid.png (before:" \
    "$runs/eval/before/grid.png); training samples $runs/cec/samples"
