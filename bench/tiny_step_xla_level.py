"""The tests' shared tiny CEC step (tests/trainer_setup.py, one CPU device): its compile and
per-step time under the XLA_FLAGS it is started with. tests/conftest.py compiles it optimised
and everything else at level 0; this is the measurement behind that choice.

  XLA_FLAGS=--xla_backend_optimization_level=0 python bench/tiny_step_xla_level.py
  python bench/tiny_step_xla_level.py
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from trainer_setup import build_step_setup  # noqa: E402


def main(steps: int = 5):
  start = time.perf_counter()
  functions, params, frozen, batch = build_step_setup(tempfile.mkdtemp())
  state = functions.init_state(params, seed=1)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"set-up {time.perf_counter() - start:.1f} s", flush=True)
  start = time.perf_counter()
  state, metrics = functions.step(state, frozen, batch)
  float(metrics["loss"])
  print(f"first step (compile) {time.perf_counter() - start:.1f} s", flush=True)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = functions.step(state, frozen, batch)
    float(metrics["loss"])
  print(f"per step {(time.perf_counter() - start) / steps:.2f} s")


if __name__ == "__main__":
  main()
