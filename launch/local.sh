#!/usr/bin/env bash
# Run a `uip2p` command on this machine, setting up .venv first if needed.
#   bash launch/local.sh demo                 # the embedded default: no downloads
#   bash launch/local.sh demo --preset sd15   # full-size shapes, random weights
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
exec "${UIP2P_VENV:-$root/.venv}/bin/python" -m uip2p_jax "$@"
