"""LoRA vs full fine-tuning: the train step of one config, both ways, timed in one process.

  python bench/lora_step.py                      # experiments/smoke.py (CEC, tiny, 64 px, batch 4)
  python bench/lora_step.py --rank 16 --targets attn,ff,conv --rounds 7

Both steps are compiled first (default XLA options, as `uip2p train` does), then timed in
alternating rounds of `--steps` steps each (the dev VM's timings drift; alternation keeps the
comparison fair) and the median step of each is reported, with the trained parameter count and
the bytes of parameters + optimizer state + EMA the step carries. Random synthetic batches.
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
  args = parser.parse_args()

  runs = {}
  for name in ("full", "lora"):
    config = run_config.load_config(args.config)
    if name == "lora":
      run_config.apply_override(config, f"lora.rank={args.rank}")
      run_config.apply_override(config, f"lora.targets={args.targets}")
    run_config.check(config)
    runs[name] = compiled_step(config)
    run = runs[name]
    run["state"], metrics = run["step"](run["state"], run["frozen"], run["batch"])  # warm-up
    jax.block_until_ready(metrics)
  print(f"{os.path.relpath(args.config, ROOT)}: {config.objective}, preset "
        f"{config.model.preset}, {config.data.resolution} px, batch {config.batch_size}, "
        f"{config.model.compute_dtype}, remat {config.model.remat}; LoRA rank {args.rank} on "
        f"{args.targets}; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs", flush=True)
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
          f"compile {run['compile_s']:.1f} s, trained parameters {run['trained']:,}, "
          f"parameters + optimizer + EMA {run['carried'] / 2 ** 20:.2f} MiB")
  print(f"  LoRA / full step time: {median['lora'] / median['full']:.2f}")


if __name__ == "__main__":
  main()
