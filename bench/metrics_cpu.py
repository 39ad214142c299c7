"""Metric-model throughput on this CPU: images/s for MagicBrush's CLIP ViT-B/32 (CLIP-I/CLIP-T)
and DINO ViT-S/16, and IP2P's CLIP ViT-L/14, at their real sizes (random weights: speed only).

  .venv/bin/python bench/metrics_cpu.py [--batch 16] [--repeats 3]

Two figures per model: the model alone on preprocessed 224 px batches, and end to end from
512 px PIL images (PIL resize/crop/normalise on the host + the model).
"""

import argparse
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  from uip2p_jax.eval.metrics import MetricModels
  from uip2p_jax.models import CLIPModel, ViTConfig, ViTModel
  from uip2p_jax.models.random_init import random_init
  from uip2p_jax.models.presets import VIT_B32, VIT_L14
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
            for _ in range(args.batch)]
  pixels = rng.normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
  models = {
      "CLIP ViT-B/32 (CLIP-I, CLIP-T)": MetricModels(
          clip=random_init(lambda: CLIPModel(VIT_B32, rngs=nnx.Rngs(0)), 0)),
      "DINO ViT-S/16": MetricModels(dino=random_init(lambda: ViTModel(ViTConfig(),
                                                                      rngs=nnx.Rngs(0)), 1)),
      "CLIP ViT-L/14 (IP2P curves)": MetricModels(
          clip=random_init(lambda: CLIPModel(VIT_L14, rngs=nnx.Rngs(0)), 2)),
  }
  print(f"{jax.default_backend()}, batch {args.batch}, median of {args.repeats}")
  for name, m in models.items():
    if m.clip is not None:
      alone = lambda: jax.block_until_ready(m._clip_images(m.clip, pixels))
      full = lambda: m.clip_image_features(images)
    else:
      alone = lambda: jax.block_until_ready(m._dino(m.dino, pixels))
      full = lambda: m.dino_features(images)
    rates = []
    for fn in (alone, full):
      fn()  # compile
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
      rates.append(args.batch / float(np.median(times)))
    print(f"{name}: {rates[0]:.1f} images/s (model alone), {rates[1]:.1f} images/s "
          "(512 px PIL images, host preprocessing included)")


if __name__ == "__main__":
  main()
