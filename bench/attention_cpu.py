"""One self-attention layer on this CPU: XLA's dot_product_attention vs our blockwise
attention vs torch's scaled_dot_product_attention.

`python bench/attention_cpu.py [--batch 4 --tokens 1024 --heads 8 --dim 16 --repeats 10]`
(the shapes of the mid-size UNet's 32x32 level in bench/unet_cpu.py). Reports min and median.
"""

import argparse
import statistics
import time

import jax
import numpy as np
import torch

from uip2p_jax.models.attention import blockwise_attention


def timings(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--dim", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  shape = (args.batch, args.tokens, args.heads, args.dim)
  q, k, v = (np.random.default_rng(i).standard_normal(shape).astype(np.float32)
             for i in range(3))
  scale = args.dim ** -0.5
  xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale,
                                                             implementation="xla"))
  ours = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, scale=scale))
  error = np.abs(np.asarray(ours(q, k, v)) - np.asarray(xla(q, k, v))).max()
  tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
  print(f"attention {shape} (batch, tokens, heads, dim), float32; ours vs xla max diff "
        f"{error:.1e}")
  rows = {
      "jax.nn.dot_product_attention (xla)": lambda: xla(q, k, v).block_until_ready(),
      "uip2p_jax blockwise_attention": lambda: ours(q, k, v).block_until_ready(),
      "torch scaled_dot_product_attention": lambda: torch.nn.functional
      .scaled_dot_product_attention(tq, tk, tv),
  }
  with torch.inference_mode():
    for name, fn in rows.items():
      best, median = timings(fn, args.repeats)
      print(f"  {name:<36s} min {best * 1e3:7.1f} ms  median {median * 1e3:7.1f} ms")


if __name__ == "__main__":
  main()
