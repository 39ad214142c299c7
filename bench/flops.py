"""XLA FLOP counts of each model's forward at the full SD 1.5 / CLIP ViT-L/14 sizes.

Abstract shapes only (no weights): `python bench/flops.py [--resolutions 256 512]`.
Reference (docs/method.md, section 6): UNet 0.18 T at 256 px, 0.80 T at 512 px; VAE encoder
0.27/1.11 T, decoder 0.62/2.50 T; CLIP ViT-L/14 vision 0.16 T; text encoder 0.013 T.
"""

import argparse
import time

from uip2p_jax.models.presets import SD15
from uip2p_jax.plan import forward_costs


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
  args = parser.parse_args()
  for resolution in args.resolutions:
    start = time.perf_counter()
    costs = forward_costs(SD15, resolution)
    print(f"{resolution} px, batch 1 ({time.perf_counter() - start:.0f} s to compile):")
    for name, cost in costs.items():
      print(f"  {name:<13s} {cost.tflops:8.3f} TFLOP")


if __name__ == "__main__":
  main()
