#!/usr/bin/env bash
# ShapesWorld from nothing, on this machine: render the data, train the world's VAE, CLIP,
# attribute probe and text-to-image prior, then the supervised InstructPix2Pix baseline, then
# evaluate. Every stage resumes where it stopped (training from its last checkpoint) and is
# skipped once its output exists, so rerunning the script after an interruption continues.
#   bash launch/shapes.sh [RUNS_DIR]          # default runs/shapes
#   STAGES="vae clip" bash launch/shapes.sh   # only these stages (in the order given)
#   STAGES=ship bash launch/shapes.sh         # maintainers: the trained models into the package
#   STAGES="cec eval" bash launch/shapes.sh   # UIP2P's CEC from the prior (issue 15); and
#   STAGES="data_recolour ip2p_recolour cec_recolour eval"  # CEC extending a recolour-only editor
# Stage times on the 2-core CPU: BENCHMARKS.md ("ShapesWorld"); results: RESULTS.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-runs/shapes}"
[[ $runs == /* ]] || runs="$PWD/$runs"   # relative to where the script is started
bash "$root/launch/setup.sh"
python="${UIP2P_VENV:-$root/.venv}/bin/python"
uip2p=("$python" -m uip2p_jax)
cd "$root"
log() { echo "[shapes $(date +%H:%M:%S)] $*"; }

stage_data() {
  if [[ -f "$runs/data/scenes_test.jsonl" ]]; then log "data: built"; return; fi
  # scenes_test.jsonl is written last: without it, rebuild whatever a killed build left.
  "${uip2p[@]}" data build shapes --out "$runs/data" --train 20000 --test 500 --seed 0 --overwrite
}

# train NAME CONFIG EXPORTED_FILE: resumes from the run's checkpoints; skipped once exported.
train() {
  local name=$1 config=$2 exported=$3
  if [[ -f "$runs/$name/export/$exported" ]]; then log "$name: exported"; return; fi
  log "$name: training ($config)"
  local start=$SECONDS
  "${uip2p[@]}" train --config "$config" --workdir "$runs/$name"
  log "$name: done in $(( SECONDS - start )) s"
}

stage_vae()   { train vae   experiments/shapes/vae.py            vae/config.json; }
stage_clip()  { train clip  experiments/shapes/clip.py           clip/config.json; }
stage_probe() { train probe experiments/shapes/probe.py          probe/config.json; }
stage_prior() { train prior "experiments/shapes/prior.py:runs=$runs" unet/config.json; }
stage_ip2p()  { train ip2p  "experiments/shapes/ip2p.py:runs=$runs"  unet/config.json; }

# CEC on the world (issue 15; RESULTS.md "CEC on ShapesWorld"). data_recolour: the same scenes,
# pairs of recolour edits only, for the one-kind editor that CEC then extends.
stage_data_recolour() {
  if [[ -f "$runs/data_recolour/scenes_test.jsonl" ]]; then log "data_recolour: built"; return; fi
  "${uip2p[@]}" data build shapes --out "$runs/data_recolour" --train 20000 --test 500 --seed 0 \
    --edit-kinds recolour --overwrite
}
stage_ip2p_recolour() {
  train ip2p_recolour "experiments/shapes/ip2p.py:runs=$runs,kinds=recolour" unet/config.json
}
stage_cec()          { train cec          "experiments/shapes/cec.py:runs=$runs"              unet/config.json; }
stage_cec_recolour() { train cec_recolour "experiments/shapes/cec.py:runs=$runs,init=recolour" unet/config.json; }
# eval: the baselines and every trained editor present (a run's export), in one table.
stage_eval() {
  local models=(identity shapes-sdedit shapes-ip2p) run name
  for run in ip2p_recolour cec cec_recolour; do
    [[ -f "$runs/$run/export/unet/config.json" ]] && models+=("$run")
  done
  for name in "${models[@]}"; do
    if [[ -f "$runs/eval/$name/summary.json" ]]; then log "eval $name: done"; continue; fi
    log "eval $name"
    local model=$name
    [[ $name == shapes-* || $name == identity ]] || model="$runs/$name/export"
    "${uip2p[@]}" eval shapes --data "$runs/data" --out "$runs/eval/$name" --model "$model" \
      --world "$runs" --label "$name"
  done
  "${uip2p[@]}" eval shapes-compare "${models[@]/#/$runs/eval/}" --out "$runs/eval/compare.md"
}
# fewstep: edit accuracy at 5 and 10 sampling steps (20 is `eval`'s), IP2P vs each CEC run.
stage_fewstep() {
  local runs_done=() name steps model
  for name in shapes-ip2p ip2p_recolour cec cec_recolour; do
    model=$name
    [[ $name == shapes-* ]] || model="$runs/$name/export"
    [[ $name == shapes-* || -f "$model/unet/config.json" ]] || continue
    for steps in 5 10; do
      if [[ ! -f "$runs/eval/$name-steps$steps/summary.json" ]]; then
        log "eval $name at $steps steps"
        "${uip2p[@]}" eval shapes --data "$runs/data" --out "$runs/eval/$name-steps$steps" \
          --model "$model" --world "$runs" --steps "$steps" --label "$name, $steps steps"
      fi
      runs_done+=("$runs/eval/$name-steps$steps")
    done
    runs_done+=("$runs/eval/$name")
  done
  "${uip2p[@]}" eval shapes-compare "${runs_done[@]}" --out "$runs/eval/fewstep.md"
}
# Maintainers: copy the trained models into the package (float16, shared parts; MODELS.md).
stage_ship() { "$python" -m uip2p_jax.shapes_models.ship "$runs"; }

for stage in ${STAGES:-data vae clip probe prior ip2p eval}; do  # CEC: see the stages above
  "stage_$stage"
done
log "all stages done: $runs"
