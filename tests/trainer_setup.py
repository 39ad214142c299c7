"""The tiny training setup shared by the trainer tests and the sharded-step subprocess."""

import os

import jax
import numpy as np

from uip2p_jax import sharding as shd
from uip2p_jax import train as tr
from uip2p_jax.plan import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """experiments/smoke.py at 32 px, global batch 8, no samples: one compiled shape for the tests."""
  config = load_config(os.path.join(ROOT, "experiments", "smoke.py"))
  config.data.resolution = 32
  config.cycle.attention_resolution = 4
  config.batch_size = 8
  config.sample.every = 0
  config.final_edit = False
  config.export = False
  config.log_every = 1
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 0
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def build_step_setup(data_dir):
  config = tiny_config()
  models = tr.build_models(config.model, config.objective)
  graphs, params, frozen = tr.split_models(models)
  mesh = shd.make_mesh(1, 1)
  functions = tr.make_step_functions(config, graphs, params, frozen, models.schedule, mesh)
  frozen = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
  from uip2p_jax.data import builders
  from uip2p_jax.data.loader import Loader, LoaderConfig
  builders.build_sample(data_dir)
  host = next(Loader(LoaderConfig(data_dir, batch_size=8, resolution=32, num_workers=0)))
  batch = tr.device_batch(host, config, functions.batch_sharding)
  return functions, params, frozen, batch
