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
# The paper's open switches (issue 15, experiment 4) as VARIANTS, each NAME:OVERRIDES (comma-
# separated config overrides) run for every loss set and seed as LOSS_NAME_seedS; the chain's
# own runs (no override) are the variant "-", the default VARIANTS. The sweep in RESULTS.md:
#   LOSSES=full SEEDS=0 VARIANTS="k1-3:cycle.num_steps_max=3 t0-500:cycle.timestep_max=500" \
#       bash launch/shapes_ablation.sh       # writes RUNS/ablation/compare_sweep.md (COMPARE)
# Time on the 2-core CPU and the numbers: RESULTS.md ("ablation chain").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-runs/shapes}"
[[ $runs == /* ]] || runs="$PWD/$runs"
losses="${LOSSES:-base sim full}" seeds="${SEEDS:-0 1}" steps="${STEPS:-600}"
lr="${LR:-4e-4}" ema="${EMA:-0.995}" limit="${LIMIT:-200}" variants="${VARIANTS:--}"
STAGES=data bash "$root/launch/shapes.sh" "$runs"   # the world's data, if not yet rendered
uip2p=("${UIP2P_VENV:-$root/.venv}/bin/python" -m uip2p_jax)
cd "$root"
out="$runs/ablation"
compare="${COMPARE:-$out/compare.md}"
log() { echo "[ablation $(date +%H:%M:%S)] $*"; }

score() {  # score NAME MODEL LABEL
  if [[ -f "$out/eval/$1/summary.json" ]]; then log "eval $1: done"; return; fi
  log "eval $1: $3 on $limit test turns"
  "${uip2p[@]}" eval shapes --data "$runs/data" --out "$out/eval/$1" --model "$2" \
    --limit "$limit" --label "$3"
}

score start shapes-ip2p-recolour "start: shapes-ip2p-recolour"
evals=("$out/eval/start")
for variant in $variants; do
  vname="${variant%%:*}" overrides=()
  if [[ $variant == *:* ]]; then
    IFS=, read -ra list <<< "${variant#*:}"
    for o in "${list[@]}"; do overrides+=("--config.$o"); done
  fi
  for loss in $losses; do
    for seed in $seeds; do
      name="${loss}_seed${seed}" label="CEC $loss, $steps steps"
      [[ $vname != - ]] && name="${loss}_${vname}_seed${seed}" label="CEC $loss $vname, $steps steps"
      if [[ ! -f "$out/$name/export/unet/config.json" ]]; then
        log "$name: CEC ($loss losses, seed $seed${overrides:+, ${overrides[*]}}), $steps steps"
        start=$SECONDS
        "${uip2p[@]}" train --workdir "$out/$name" --config \
          "experiments/shapes/cec.py:init=recolour,models=shipped,runs=$runs,losses=$loss,seed=$seed,steps=$steps,lr=$lr,warmup=$(( steps / 10 )),ema=$ema" \
          --config.checkpoint.every=100 "${overrides[@]}"
        log "$name: trained in $(( SECONDS - start )) s"
      fi
      score "$name" "$out/$name/export" "$label"
      evals+=("$out/eval/$name")
    done
  done
done
"${uip2p[@]}" eval shapes-compare "${evals[@]}" --out "$compare"
log "done: $compare"
