#!/usr/bin/env bash
# UIP2P's ablation chain on ShapesWorld (issue 15, experiment 3): for each loss set
#   base = L_recon + L_clip,  sim = base + L_sim,  full = sim + L_attn (the paper's chain)
# and each seed, CEC from the shipped recolour-only editor (shapes-ip2p-recolour) on the world's
# caption records (no edited image), scored on the first LIMIT test turns; one table of
# mean ± sample standard deviation over the seeds (RUNS/ablation/compare.md).
#   bash launch/shapes_ablation.sh [RUNS_DIR]       # default runs/shapes (renders RUNS/data)
#   SEEDS="0 1 2" STEPS=400 bash launch/shapes_ablation.sh
# LOSSES (base sim full), SEEDS (0 1), STEPS (600), LR (4e-4, cosine to a tenth after STEPS/10
# warm-up steps), EMA (0.995), LIMIT (200 test turns). Every run resumes from its checkpoints
# and is skipped once exported, every eval once scored: rerunning continues the chain.
# Time on the 2-core CPU and the numbers: RESULTS.md ("ablation chain").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-runs/shapes}"
[[ $runs == /* ]] || runs="$PWD/$runs"
losses="${LOSSES:-base sim full}" seeds="${SEEDS:-0 1}" steps="${STEPS:-600}"
lr="${LR:-4e-4}" ema="${EMA:-0.995}" limit="${LIMIT:-200}"
STAGES=data bash "$root/launch/shapes.sh" "$runs"   # the world's data, if not yet rendered
uip2p=("${UIP2P_VENV:-$root/.venv}/bin/python" -m uip2p_jax)
cd "$root"
out="$runs/ablation"
log() { echo "[ablation $(date +%H:%M:%S)] $*"; }

score() {  # score NAME MODEL LABEL
  if [[ -f "$out/eval/$1/summary.json" ]]; then log "eval $1: done"; return; fi
  log "eval $1: $3 on $limit test turns"
  "${uip2p[@]}" eval shapes --data "$runs/data" --out "$out/eval/$1" --model "$2" \
    --limit "$limit" --label "$3"
}

score start shapes-ip2p-recolour "start: shapes-ip2p-recolour"
evals=("$out/eval/start")
for loss in $losses; do
  for seed in $seeds; do
    name="${loss}_seed${seed}"
    if [[ ! -f "$out/$name/export/unet/config.json" ]]; then
      log "$name: CEC ($loss losses, seed $seed), $steps steps"
      start=$SECONDS
      "${uip2p[@]}" train --workdir "$out/$name" --config \
        "experiments/shapes/cec.py:init=recolour,models=shipped,runs=$runs,losses=$loss,seed=$seed,steps=$steps,lr=$lr,warmup=$(( steps / 10 )),ema=$ema" \
        --config.checkpoint.every=100
      log "$name: trained in $(( SECONDS - start )) s"
    fi
    score "$name" "$out/$name/export" "CEC $loss, $steps steps"
    evals+=("$out/eval/$name")
  done
done
"${uip2p[@]}" eval shapes-compare "${evals[@]}" --out "$out/compare.md"
log "done: $out/compare.md"
