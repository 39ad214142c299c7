"""The tiny training setup shared by the trainer tests and the sharded-step subprocess."""

import os

import jax
import numpy as np

from uip2p_jax import sharding as shd
from uip2p_jax.model_set import build_models
from uip2p_jax.train import config as run_config
from uip2p_jax.train import step as train_step
from uip2p_jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """experiments/smoke.py at 32 px, global batch 8, no samples: one compiled shape for the tests."""
  config = load_config(os.path.join(ROOT, "experiments", "smoke.py"))
  config.data.resolution = 32
  config.batch_size = 8
  config.sample.every = 0
  config.final_edit = False
  config.export = False
  config.log_every = 1
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 0
  for key, value in overrides.items():
    run_config.apply_override(config, f"{key}={value}")
  return config


def host_batch(data_dir, batch_size=8):
  """One host batch of the bundled sample at 32 px (built into data_dir)."""
  from uip2p_jax.data import builders
  from uip2p_jax.data.loader import Loader, LoaderConfig
  builders.build_sample(data_dir)
  return next(Loader(LoaderConfig(data_dir, batch_size=batch_size, resolution=32,
                                  num_workers=0)))


def build_step_setup(data_dir, mesh=None, config=None):
  """(step functions, UNet params, placed frozen params, device batch) of the tiny config."""
  config = config or tiny_config()
  models = build_models(**run_config.model_kwargs(config))
  graphs, params, frozen = train_step.split_models(models)
  mesh = mesh or shd.make_mesh(1, 1)
  functions = train_step.make_step_functions(config, graphs, params, frozen, models.schedule,
                                             models.tokenizer, mesh)
  frozen = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
  batch = shd.global_batch(host_batch(data_dir), functions.batch_sharding,
                           train_step.batch_fields(config.objective))
  return functions, params, frozen, batch
