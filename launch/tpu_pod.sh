#!/usr/bin/env bash
# Run a `uip2p` command on every worker of a Cloud TPU VM slice (created if it does not exist).
#
#   bash launch/tpu_pod.sh [--dry-run] [--spot] [--queued] NAME ZONE ACCELERATOR_TYPE -- \
#       train --config experiments/uip2p.py:data=cc3m --workdir gs://BUCKET/runs/uip2p_cc3m \
#       --config.data.dir=gs://BUCKET/data/cc3m
#
# e.g. NAME=uip2p-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-32 (also v4-32, v5p-64, v6e-16).
# Needs `gcloud` logged in with a default project. `--dry-run` prints every command (gcloud,
# git) instead of running it, one per line as a shell would read it; it needs no gcloud and
# assumes the slice does not exist yet.
#
# Runtime (the VM image): picked from the accelerator type, as Google's "TPU software versions"
# page (cloud.google.com/tpu/docs/runtimes) lists them for JAX: v6e -> v2-alpha-tpuv6e, v5p ->
# v2-alpha-tpuv5, v5e (v5litepod) -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base.
# TPU_VERSION=... overrides it.
# Python: these Ubuntu 22.04 images ship python3 3.10, below the package's >= 3.11. When the
# worker's python3 is older, uv (pip-installed into ~/.local) installs a standalone CPython 3.11
# (`uv python install 3.11`): no sudo, no apt lock (fresh VMs run unattended-upgrades), and its
# venv module is included (deadsnakes would need python3.11-venv from apt as well). A .venv left
# by an older Python is rebuilt.
# The committed state of this checkout (`git archive HEAD`) is copied to every worker, set up
# with `UIP2P_JAX=tpu bash launch/setup.sh`, and the command runs on all workers at once with
# UIP2P_DISTRIBUTED=1 (JAX finds its peers on the slice itself). The workdir and the data must
# be on storage every worker reads and writes: a bucket given as gs:// URLs (read and written
# through etils.epath; setup.sh installs gcsfs for UIP2P_JAX=tpu), the bucket mounted with
# gcsfuse at the same path on each worker (e.g. /gcs/BUCKET), or NFS. Only the committed
# checkout is copied, so a relative data/ folder is not on the workers: build the dataset once
# into the bucket and give config.data.dir as its absolute URL.
#
# Capacity and preemption:
# - `--queued` asks for the slice through a queued resource (`gcloud compute tpus
#   queued-resources create`): the request waits in line until capacity is free; this script
#   polls until it is ACTIVE (FAILED or SUSPENDED stops it). Large slices are often only
#   available this way.
# - `--spot` makes a Spot slice (cheaper, can be preempted at any time, with little notice).
#   A preempted slice does not come back by itself: delete it (`gcloud compute tpus tpu-vm delete
#   NAME`, or `gcloud compute tpus queued-resources delete NAME --force` for a queued one) and run
#   the same command again; training resumes from the last checkpoint in the workdir. SIGTERM
#   makes every process save at one agreed step when the notice leaves time; otherwise the run
#   resumes from the last periodic save, so keep `checkpoint.every` short on Spot capacity.
set -euo pipefail
usage() { sed -n '2,6p' "$0" >&2; exit 2; }

dry_run=0 spot=() queued=0
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --spot) spot=(--spot) ;;
    --queued) queued=1 ;;
    *) echo "tpu_pod: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 5 && "$4" == "--" ]] || usage
name="$1" zone="$2" type="$3"
shift 4
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "$type" in
  v6e-*) runtime=v2-alpha-tpuv6e ;;
  v5p-*) runtime=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) runtime=v2-alpha-tpuv5-lite ;;
  v2-*|v3-*|v4-*) runtime=tpu-ubuntu2204-base ;;
  *) runtime="" ;;
esac
runtime="${TPU_VERSION:-$runtime}"
if [[ -z "$runtime" ]]; then
  echo "tpu_pod: no runtime known for accelerator type $type (expected v4-*, v5litepod-*," \
       "v5p-*, v6e-*); set TPU_VERSION" >&2
  exit 2
fi

# One shell word per argument, single-quoted where needed (Python's shlex.quote does the same).
quote() {
  local words=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}
# Runs a command, or with --dry-run prints it.
run() {
  if (( dry_run )); then quote "$@"; else "$@"; fi
}

if (( queued )); then
  exists=(gcloud compute tpus queued-resources describe "$name" --zone "$zone")
else
  exists=(gcloud compute tpus tpu-vm describe "$name" --zone "$zone")
fi
if (( dry_run )) || ! "${exists[@]}" >/dev/null 2>&1; then
  echo "tpu_pod: creating $name ($type, runtime $runtime${spot:+, spot}) in $zone" >&2
  if (( queued )); then
    run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
        --accelerator-type "$type" --runtime-version "$runtime" "${spot[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" \
        --version "$runtime" "${spot[@]}"
  fi
fi
if (( queued )); then
  state=(gcloud compute tpus queued-resources describe "$name" --zone "$zone"
         --format "value(state.state)")
  if (( dry_run )); then
    quote "${state[@]}"
  else
    while true; do
      current="$("${state[@]}")"
      case "$current" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) echo "tpu_pod: queued resource $name is $current" >&2; exit 1 ;;
        *) echo "tpu_pod: queued resource $name is $current; waiting" >&2; sleep 60 ;;
      esac
    done
  fi
fi

archive="${TMPDIR:-/tmp}/uip2p_jax-$name.tar.gz"
run git -C "$root" archive --format tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:uip2p_jax.tar.gz" --zone "$zone" --worker=all
(( dry_run )) || rm -f "$archive"

at_least_311='import sys; sys.exit(sys.version_info < (3, 11))'
remote=(
  "set -e"
  "mkdir -p ~/uip2p_jax"
  "tar -xzf ~/uip2p_jax.tar.gz -C ~/uip2p_jax"
  "cd ~/uip2p_jax"
  "python=python3"
  "if ! python3 -c \"$at_least_311\"; then python3 -m pip install -q --user uv; ~/.local/bin/uv python install 3.11; python=\"\$(~/.local/bin/uv python find 3.11)\"; fi"
  "if [ -x .venv/bin/python ] && ! .venv/bin/python -c \"$at_least_311\"; then rm -rf .venv; fi"
  "UIP2P_JAX=tpu PYTHON=\"\$python\" bash launch/setup.sh"
  "UIP2P_DISTRIBUTED=1 exec .venv/bin/python -m uip2p_jax $(quote "$@")"
)
printf -v script '%s; ' "${remote[@]}"
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "${script%; }"
