"""The CEC train step on one device: SD 1.5 size (random weights), bf16 compute, remat per block.

Run by bench/device.sh on a lent GPU (`--preset sd15 --resolution 256 --batch 8`); on a CPU,
`python bench/train_step.py --preset tiny --resolution 32 --batch 4 --steps 3` is a smoke test.
Reports compile time, seconds per step, images/s, model-FLOP MFU (FLOPs of the step without
recomputation, as the trainer logs it), hardware FLOP/s and the device's peak memory.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uip2p_jax import sharding as shd  # noqa: E402
from uip2p_jax.model_set import build_models  # noqa: E402
from uip2p_jax.train import config as run_config  # noqa: E402
from uip2p_jax.train import step as train_step  # noqa: E402
from uip2p_jax.train.loop import peak_flops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="sd15", choices=["sd15", "tiny"])
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = parser.parse_args()

  config = run_config.load_config(os.path.join(ROOT, "experiments", "uip2p.py"))
  run_config.apply_override(config, f"model.preset={args.preset}")
  run_config.apply_override(config, "model.pretrained=")
  run_config.apply_override(config, "model.clip=")  # the preset's CLIP, random
  run_config.apply_override(config, f"model.remat={args.remat}")
  run_config.apply_override(config, f"model.compute_dtype={args.dtype}")
  run_config.apply_override(config, f"model.frozen_dtype={args.dtype}")
  run_config.apply_override(config, f"data.resolution={args.resolution}")
  run_config.apply_override(config, f"batch_size={args.batch}")
  if args.preset == "tiny":
    run_config.apply_override(config, "cycle.attention_level=0")
  device = jax.devices()[0]
  print(f"train step: {args.preset} {args.resolution} px, batch {args.batch}, {args.dtype}, "
        f"remat {args.remat}, K = 1, all four losses, on {device.device_kind}", flush=True)

  start = time.perf_counter()
  models = build_models(**run_config.model_kwargs(config))
  graphs, params, frozen = train_step.split_models(models)
  mesh = shd.make_mesh(1, 1, devices=[device])
  print(f"  models built in {time.perf_counter() - start:.1f} s", flush=True)
  start = time.perf_counter()
  functions, lowered = train_step.lower_step(config, graphs, params, frozen, models.schedule,
                                             models.tokenizer, mesh, args.batch)
  compiled = lowered.compile()
  print(f"  compiled in {time.perf_counter() - start:.1f} s", flush=True)
  model = train_step.model_flops(config, lowered, graphs, params, frozen, models.schedule,
                                 models.tokenizer, mesh)
  hardware = train_step.flops_of(compiled.cost_analysis())

  batch = train_step.synthetic_batch(config, args.batch, functions.batch_sharding)
  frozen = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
  state = functions.init_state(params, 0)
  del params, models
  state, metrics = compiled(state, frozen, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  peak = peak_flops(device)
  stats = device.memory_stats() or {}
  print(f"  step {step_time * 1000:.1f} ms (median of {args.steps}), "
        f"{args.batch / step_time:.2f} images/s, loss {float(metrics['loss']):.4f}")
  print(f"  model FLOPs {model / 1e12:.3f} T per step, hardware {hardware / 1e12:.3f} T; "
        f"{hardware / step_time / 1e12:.1f} TFLOP/s hardware"
        + (f"; MFU {model / step_time / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else
           "; MFU: no peak figure for this device"))
  if "peak_bytes_in_use" in stats:
    print(f"  peak memory {stats['peak_bytes_in_use'] / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
  main()
