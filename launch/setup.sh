#!/usr/bin/env bash
# Create .venv and install the pinned requirements; `--test` adds the test-only ones.
# Idempotent and quick on re-runs: it reinstalls only when a requirements file changed.
# Override the interpreter with PYTHON=python3.11 and the venv folder with UIP2P_VENV=DIR.
# Accelerators: UIP2P_JAX=tpu or UIP2P_JAX=cuda12 installs the matching jax extra (same version);
# tpu adds requirements-gcs.txt (gcsfs: etils.epath reads and writes gs:// workdirs and data).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UIP2P_VENV:-$root/.venv}"
files=("$root/requirements.txt" "$root/requirements-nodeps.txt" "$root/pyproject.toml")
accelerator="${UIP2P_JAX:-cpu}"
[[ "${1:-}" == "--test" ]] && files+=("$root/requirements-test.txt")
[[ "$accelerator" == "tpu" ]] && files+=("$root/requirements-gcs.txt")

# The browser test (tests/test_app.py) drives Debian's chromium through its chromedriver, from
# the system packages (pip's selenium never downloads a browser here).
if [[ "${1:-}" == "--test" ]] && ! [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  as_root=()
  if [[ "$(id -u)" != 0 ]]; then
    if ! sudo -n true 2>/dev/null; then
      echo "setup: the browser test needs /usr/bin/chromium and /usr/bin/chromedriver; install" \
           "them as root (Debian: apt-get install chromium chromium-driver) and run this again" >&2
      exit 1
    fi
    as_root=(sudo -n)
  fi
  if ! command -v apt-get >/dev/null; then
    echo "setup: the browser test needs /usr/bin/chromium and /usr/bin/chromedriver, and this" \
         "machine has no apt-get to install them with (Debian: chromium chromium-driver)" >&2
    exit 1
  fi
  echo "setup: installing chromium and chromium-driver (the browser test)" >&2
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends chromium chromium-driver >/dev/null
fi

[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
stamp="$venv/.uip2p-requirements"
want="$( (cat "${files[@]}"; echo "$accelerator") | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" ]] || ! grep -qx "$want" "$stamp"; then
  echo "setup: installing requirements into $venv (first run takes a few minutes)" >&2
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-warn-conflicts)
  "${pip[@]}" -r "$root/requirements.txt"
  if [[ "${1:-}" == "--test" ]]; then "${pip[@]}" -r "$root/requirements-test.txt"; fi
  if [[ "$accelerator" != "cpu" ]]; then
    jax_version="$(grep -oP '^jax\[cpu\]==\K.*' "$root/requirements.txt")"
    "${pip[@]}" "jax[$accelerator]==$jax_version"
  fi
  if [[ "$accelerator" == "tpu" ]]; then "${pip[@]}" -r "$root/requirements-gcs.txt"; fi
  # Last, so pip's resolver never re-checks its (deliberately skipped) torch dependencies.
  "${pip[@]}" --no-deps -r "$root/requirements-nodeps.txt"
  "${pip[@]}" --no-deps -e "$root"
  echo "$want" >> "$stamp"
fi

