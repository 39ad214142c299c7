"""GPU edit throughput: SD 1.5-size IP2P model (random weights), bf16, 20 steps, 512 px.

Run by bench/device.sh on a lent GPU; also runs on CPU with `--preset tiny --resolution 64` as a
smoke test. Reports seconds per edit after compile, images/s and achieved TFLOP/s against the
card's peak (FLOPs from XLA's cost analysis of each model, x steps x 3 guidance branches).
"""

import argparse
import statistics
import subprocess
import time

import jax
import numpy as np

from uip2p_jax.model_set import build_models
from uip2p_jax.models.presets import preset
from uip2p_jax.pipeline import EditPipeline
from uip2p_jax.plan import forward_costs

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense


def card_peak():
  try:
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return jax.devices()[0].device_kind, None
  return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="sd15")
  parser.add_argument("--resolution", type=int, default=512)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  shapes = preset(args.preset)
  start = time.perf_counter()
  pipe = EditPipeline.from_models(build_models(
      preset=args.preset, compute_dtype="bfloat16", unet_param_dtype="bfloat16",
      frozen_dtype="bfloat16"))
  name, peak = card_peak()
  print(f"device: {name} ({jax.default_backend()}); model init {time.perf_counter() - start:.0f} s")
  for batch in args.batches:
    costs = forward_costs(shapes, args.resolution, batch)
    unet3 = forward_costs(shapes, args.resolution, 3 * batch)["unet"].flops
    flops = (args.steps * unet3 + costs["vae_encoder"].flops + costs["vae_decoder"].flops
             + 2 * costs["text_encoder"].flops)
    images = np.zeros((batch, args.resolution, args.resolution, 3), np.float32)
    run = lambda: pipe.edit(images, ["make it snowy"] * batch, steps=args.steps)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    print(f"batch {batch}: {seconds:.3f} s per call ({seconds / batch:.3f} s per image), "
          f"{batch / seconds:.2f} images/s, first call {first:.1f} s; {flops / 1e12:.1f} TFLOP "
          f"per call -> {achieved:.1f} TFLOP/s"
          + (f" = {100 * achieved / peak:.1f}% of {peak:.0f} bf16 peak" if peak else ""))


if __name__ == "__main__":
  main()
