"""Jitted forward of our UNet vs diffusers' PyTorch UNet, same weights, on this CPU.

`python bench/unet_cpu.py [--batch 4 --latent 32 --repeats 10]`. Mid-size config:
block_out_channels (128, 256, 512, 512), 8 input channels, 77 text tokens, float32. Both
models hold the same random weights (saved from diffusers, loaded by uip2p_jax.weights) and
the outputs are checked to agree before timing.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from uip2p_jax import weights

CONFIG = dict(in_channels=8, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              cross_attention_dim=768, attention_head_dim=8, sample_size=32)


def interleaved_medians(fns, repeats):
  """Median seconds of each function, run alternately so machine noise hits all alike."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--latent", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()

  torch.manual_seed(0)
  torch_unet = TorchUNet(**CONFIG).eval()
  folder = tempfile.mkdtemp()
  torch_unet.save_pretrained(folder)
  unet = weights.load_unet(folder, subfolder=None)

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((args.batch, args.latent, args.latent, 8)).astype(np.float32)
  timesteps = np.full((args.batch,), 500, np.int32)
  context = rng.standard_normal((args.batch, 77, 768)).astype(np.float32)
  sample_t = torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2)))
  timesteps_t, context_t = torch.from_numpy(timesteps), torch.from_numpy(context)

  graphdef, state = nnx.split(unet)
  forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
  start = time.perf_counter()
  ours = jax.block_until_ready(forward(state, sample, timesteps, context))
  compile_s = time.perf_counter() - start
  with torch.inference_mode():
    reference = torch_unet(sample_t, timesteps_t, context_t).sample.numpy()
  error = np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - reference).max()

  with torch.inference_mode():
    ours_s, torch_s = interleaved_medians(
        [lambda: jax.block_until_ready(forward(state, sample, timesteps, context)),
         lambda: torch_unet(sample_t, timesteps_t, context_t)], args.repeats)
  print(f"UNet {CONFIG['block_out_channels']}, batch {args.batch}, {args.latent}x{args.latent} "
        f"latent, float32, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
  print(f"  max abs difference ours vs diffusers: {error:.2e}")
  print(f"  uip2p_jax (jit): {ours_s * 1e3:8.1f} ms median of {args.repeats} "
        f"(first call incl. compile {compile_s:.1f} s)")
  print(f"  diffusers/torch: {torch_s * 1e3:8.1f} ms median of {args.repeats}")
  print(f"  ratio ours/torch: {ours_s / torch_s:.2f}")


if __name__ == "__main__":
  main()
