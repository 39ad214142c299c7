#!/usr/bin/env bash
# Run a `uip2p` command on every worker of a Cloud TPU VM slice (created if it does not exist).
#
#   bash launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE -- train --config experiments/uip2p.py:data=cc3m \
#       --workdir /gcs/BUCKET/runs/uip2p_cc3m
#
# e.g. NAME=uip2p-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-32. Needs `gcloud` logged in
# with a default project. The repository (this checkout, committed state) is copied to every
# worker, set up with `UIP2P_JAX=tpu bash launch/setup.sh`, and the command runs on all workers
# at once; JAX finds its peers itself (jax.distributed.initialize). The workdir must be shared by
# all workers (a gcsfuse mount such as /gcs/BUCKET, or NFS): checkpoints, logs and samples go
# there; only worker 0 writes logs. Preemption / maintenance (SIGTERM) saves a checkpoint; run
# the same command again to resume. Set TPU_VERSION to override the VM image.
set -euo pipefail
if [[ $# -lt 5 || "$4" != "--" ]]; then
  sed -n '2,4p' "$0" >&2
  exit 2
fi
name="$1" zone="$2" type="$3"
shift 4
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${TPU_VERSION:-v2-alpha-tpuv5-lite}"

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  echo "tpu_pod: creating $name ($type) in $zone" >&2
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" \
      --version "$version"
fi

archive="$(mktemp --suffix .tar.gz)"
git -C "$root" archive --format tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name:uip2p_jax.tar.gz" --zone "$zone" --worker=all
rm -f "$archive"

command="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p ~/uip2p_jax && tar -xzf ~/uip2p_jax.tar.gz -C ~/uip2p_jax && cd ~/uip2p_jax
  UIP2P_JAX=tpu PYTHON=\${PYTHON:-python3} bash launch/setup.sh
  UIP2P_DISTRIBUTED=1 .venv/bin/python -m uip2p_jax $command"
