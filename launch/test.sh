#!/usr/bin/env bash
# Set up .venv with the test requirements and run the test suite (extra args go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh" --test
cd "$root"
exec "${UIP2P_VENV:-$root/.venv}/bin/python" -m pytest tests "$@"
