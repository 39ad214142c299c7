"""LoRA vs full fine-tuning: the train step of one config, both ways, timed in one process.

  python bench/lora_step.py                      # experiments/smoke.py (CEC, tiny, 64 px, batch 4)
  python bench/lora_step.py --rank 16 --targets attn,ff,conv --rounds 7
  # one config exactly as written, random weights of its preset (bench/device.sh, on a GPU):
  python bench/lora_step.py --config experiments/finetune.py:method=full --as-configured \
      --random-weights

Both steps are compiled first (default XLA options, as `uip2p train` does), then timed in
alternating rounds of `--steps` steps each (the dev VM's timings drift; alternation keeps the
comparison fair) and the median step of each is reported, with the trained parameter count and
the bytes of parameters + optimizer state + EMA the step carries, and the device's peak memory
where it reports one (a GPU; with `--as-configured` the process holds only that one step, so the
peak is that step's). Random synthetic batches.
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
from uip2p_jax.plan import tree_bytes  # noqa: E402
from uip2p_jax.train import config as run_config  # noqa: E402
from uip2p_jax.train import step as train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiled_step(config):
  models = build_models(**run_config.model_kwargs(config))
  graphs, params, frozen = train_step.split_models(models, config.objective)
  mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
  start = time.perf_counter()
  functions, lowered = train_step.lower_step(config, graphs, params, frozen, models.schedule,
                                             models.tokenizer, mesh, config.batch_size)
  step = lowered.compile()
  compile_s = time.perf_counter() - start
  frozen = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
  state = functions.init_state(params, config.seed)
  batch = train_step.synthetic_batch(config, config.batch_size, functions.batch_sharding)
  trained = sum(x.size for x in jax.tree.leaves(state.params))
  carried = tree_bytes((state.params, state.opt_state, state.ema_params))
  return dict(step=step, state=state, frozen=frozen, batch=batch, compile_s=compile_s,
              trained=trained, carried=carried, times=[])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "smoke.py"))
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--targets", default="attn")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
  parser.add_argument("--as-configured", action="store_true",
                      help="time only the config as written (its own LoRA or full fine-tuning)")
  parser.add_argument("--random-weights", action="store_true",
                      help="the preset's random weights instead of config.model.pretrained "
                           "(timing and memory need no download)")
  args = parser.parse_args()

  runs = {}
  for name in ("configured",) if args.as_configured else ("full", "lora"):
    config = run_config.load_config(args.config)
    if name == "lora":
      run_config.apply_override(config, f"lora.rank={args.rank}")
      run_config.apply_override(config, f"lora.targets={args.targets}")
    run_config.check(config)
    if args.random_weights:  # after the check: it refuses LoRA on a random base, rightly
      config.model.pretrained = None
    runs[name] = compiled_step(config)
    run = runs[name]
    run["state"], metrics = run["step"](run["state"], run["frozen"], run["batch"])  # warm-up
    jax.block_until_ready(metrics)
  print(f"{os.path.relpath(args.config, ROOT)}: {config.objective}, preset "
        f"{config.model.preset}, {config.data.resolution} px, batch {config.batch_size}, "
        f"{config.model.compute_dtype}, remat {config.model.remat}; "
        + (f"LoRA rank {config.lora.rank}" if args.as_configured else
           f"LoRA rank {args.rank} on {args.targets}")
        + f"; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs", flush=True)
  for _ in range(args.rounds):
    for run in runs.values():
      for _ in range(args.steps):
        start = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], run["frozen"], run["batch"])
        jax.block_until_ready(metrics)
        run["times"].append(time.perf_counter() - start)
  median = {name: statistics.median(run["times"]) for name, run in runs.items()}
  for name, run in runs.items():
    print(f"  {name:4s}: step {median[name] * 1000:.1f} ms (median of {len(run['times'])}), "
          f"{config.batch_size / median[name]:.2f} images/s, compile {run['compile_s']:.1f} s, "
          f"trained parameters {run['trained']:,}, parameters + optimizer + EMA "
          f"{run['carried'] / 2 ** 20:.2f} MiB")
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  if peak is not None:
    print(f"  device peak memory {peak / 2 ** 30:.2f} GiB"
          + ("" if args.as_configured else " (both steps' state held in this process)"))
  if not args.as_configured:
    print(f"  LoRA / full step time: {median['lora'] / median['full']:.2f}")


if __name__ == "__main__":
  main()
