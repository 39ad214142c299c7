#!/usr/bin/env bash
# ShapesWorld from nothing, on this machine: render the data, train the world's VAE, CLIP,
# attribute probe and text-to-image prior, then the supervised InstructPix2Pix baseline, then
# evaluate. Every stage resumes where it stopped (training from its last checkpoint) and is
# skipped once its output exists, so rerunning the script after an interruption continues.
#   bash launch/shapes.sh [RUNS_DIR]          # default runs/shapes
#   STAGES="vae clip" bash launch/shapes.sh   # only these stages (in the order given)
#   STAGES=ship bash launch/shapes.sh         # maintainers: the trained models into the package
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
stage_eval() {
  local models=(identity shapes-sdedit shapes-ip2p) name
  for name in "${models[@]}"; do
    if [[ -f "$runs/eval/$name/summary.json" ]]; then log "eval $name: done"; continue; fi
    log "eval $name"
    "${uip2p[@]}" eval shapes --data "$runs/data" --out "$runs/eval/$name" --model "$name" \
      --world "$runs"
  done
  "${uip2p[@]}" eval shapes-compare "${models[@]/#/$runs/eval/}" --out "$runs/eval/compare.md"
}
# Maintainers: copy the trained models into the package (float16, shared parts; MODELS.md).
stage_ship() { "$python" -m uip2p_jax.shapes_models.ship "$runs"; }

for stage in ${STAGES:-data vae clip probe prior ip2p eval}; do
  "stage_$stage"
done
log "all stages done: $runs"
