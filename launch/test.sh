#!/usr/bin/env bash
# Set up .venv with the test requirements and run the test suite (extra args go to pytest).
# UIP2P_TEST_WORKERS (default 2) pytest-xdist workers, each taking one test file at a time;
# 0 runs everything in this process (as plain `pytest` does).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh" --test
cd "$root"
workers="${UIP2P_TEST_WORKERS:-2}"
parallel=()
[[ "$workers" != 0 ]] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
exec "${UIP2P_VENV:-$root/.venv}/bin/python" -m pytest tests "${parallel[@]}" "$@"
